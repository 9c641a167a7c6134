"""Where each kind lives in the API: group, version, plural, scope.

Kinds of both loop families are here, not in their protocol modules, because
both families read PVCs, PVs and snapshots and neither may import the other.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Resource:
    """Where a kind lives in the API (group/version/plural) and whether it is namespaced."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    has_status: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


# core, coordination, and the snapshot CRDs
PVC = Resource("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", True)
PV = Resource("", "v1", "PersistentVolume", "persistentvolumes", False)
SECRET = Resource("", "v1", "Secret", "secrets", True, has_status=False)
NODE = Resource("", "v1", "Node", "nodes", False)
EVENT = Resource("", "v1", "Event", "events", True, has_status=False)
LEASE = Resource("coordination.k8s.io", "v1", "Lease", "leases", True, has_status=False)
VOLUME_SNAPSHOT = Resource("snapshot.storage.k8s.io", "v1", "VolumeSnapshot", "volumesnapshots", True)
VOLUME_SNAPSHOT_CONTENT = Resource(
    "snapshot.storage.k8s.io",
    "v1",
    "VolumeSnapshotContent",
    "volumesnapshotcontents",
    False,
)
VOLUME_SNAPSHOT_CLASS = Resource(
    "snapshot.storage.k8s.io",
    "v1",
    "VolumeSnapshotClass",
    "volumesnapshotclasses",
    False,
    has_status=False,
)

# storage.k8s.io and the Gateway API's ReferenceGrant (cross-namespace data sources)
STORAGE_CLASS = Resource("storage.k8s.io", "v1", "StorageClass", "storageclasses", False, has_status=False)
VOLUME_ATTACHMENT = Resource("storage.k8s.io", "v1", "VolumeAttachment", "volumeattachments", False)
CSI_NODE = Resource("storage.k8s.io", "v1", "CSINode", "csinodes", False, has_status=False)
CSI_DRIVER = Resource("storage.k8s.io", "v1", "CSIDriver", "csidrivers", False, has_status=False)
CSI_STORAGE_CAPACITY = Resource(
    "storage.k8s.io", "v1", "CSIStorageCapacity", "csistoragecapacities", True, has_status=False
)
REFERENCE_GRANT = Resource(
    "gateway.networking.k8s.io", "v1beta1", "ReferenceGrant", "referencegrants", True, has_status=False
)

# group snapshots (CRDs)
_GROUP_SNAPSHOT = "groupsnapshot.storage.k8s.io"
VOLUME_GROUP_SNAPSHOT = Resource(_GROUP_SNAPSHOT, "v1", "VolumeGroupSnapshot", "volumegroupsnapshots", True)
VOLUME_GROUP_SNAPSHOT_CONTENT = Resource(
    _GROUP_SNAPSHOT, "v1", "VolumeGroupSnapshotContent", "volumegroupsnapshotcontents", False
)
VOLUME_GROUP_SNAPSHOT_CLASS = Resource(
    "groupsnapshot.storage.k8s.io",
    "v1",
    "VolumeGroupSnapshotClass",
    "volumegroupsnapshotclasses",
    False,
    has_status=False,
)

# VolumeAttributesClass (ModifyVolume)
VOLUME_ATTRIBUTES_CLASS = Resource(
    "storage.k8s.io", "v1", "VolumeAttributesClass", "volumeattributesclasses", False, has_status=False
)

# SnapshotMetadata (CBT) and the review APIs its server calls
SNAPSHOT_METADATA_SERVICE = Resource(
    "cbt.storage.k8s.io",
    "v1beta1",
    "SnapshotMetadataService",
    "snapshotmetadataservices",
    False,
    has_status=False,
)
TOKEN_REVIEW = Resource("authentication.k8s.io", "v1", "TokenReview", "tokenreviews", False)
SUBJECT_ACCESS_REVIEW = Resource(
    "authorization.k8s.io", "v1", "SubjectAccessReview", "subjectaccessreviews", False
)
