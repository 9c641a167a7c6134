"""The snapshot.storage.k8s.io object protocol shared by the two loops.

Names here are the upstream ones, byte for byte: they are the contract that
lets our loops and the upstream snapshot-controller / csi-snapshotter take
over each other's objects on a live cluster.
"""

from __future__ import annotations

import hashlib
from typing import Any

from csi_kit.k8s.objects.meta import (
    Obj,
    annotations_of,
    name_of,
    namespace_of,
    rv_of,
    spec_of,
    status_of,
    uid_of,
)
from csi_kit.k8s.objects.names import is_dns1123_label, is_dns1123_subdomain
from csi_kit.k8s.objects.resources import Resource
from csi_kit.k8s.objects.templates import TemplateError, expand
from csi_kit.k8s.objects.times import rfc3339

GROUP = "snapshot.storage.k8s.io"

# Finalizers.
CONTENT_BOUND_FINALIZER = "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection"
SNAPSHOT_BOUND_FINALIZER = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection"
SNAPSHOT_AS_SOURCE_FINALIZER = "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection"
PVC_AS_SOURCE_FINALIZER = "snapshot.storage.kubernetes.io/pvc-as-source-protection"

# Annotations.
ANN_BEING_CREATED = "snapshot.storage.kubernetes.io/volumesnapshot-being-created"
ANN_BEING_DELETED = "snapshot.storage.kubernetes.io/volumesnapshot-being-deleted"
ANN_DELETION_SECRET_NAME = "snapshot.storage.kubernetes.io/deletion-secret-name"
ANN_DELETION_SECRET_NAMESPACE = "snapshot.storage.kubernetes.io/deletion-secret-namespace"
ANN_IS_DEFAULT_CLASS = "snapshot.storage.kubernetes.io/is-default-class"

# Label the controller puts on contents in distributed (per-node) mode.
LABEL_MANAGED_BY = "snapshot.storage.kubernetes.io/managed-by"

# Class parameters.
PARAM_PREFIX = "csi.storage.k8s.io/"
SECRET_NAME_KEY = PARAM_PREFIX + "snapshotter-secret-name"
SECRET_NAMESPACE_KEY = PARAM_PREFIX + "snapshotter-secret-namespace"
LIST_SECRET_NAME_KEY = PARAM_PREFIX + "snapshotter-list-secret-name"
LIST_SECRET_NAMESPACE_KEY = PARAM_PREFIX + "snapshotter-list-secret-namespace"
META_SNAPSHOT_NAME = PARAM_PREFIX + "volumesnapshot/name"
META_SNAPSHOT_NAMESPACE = PARAM_PREFIX + "volumesnapshot/namespace"
META_CONTENT_NAME = PARAM_PREFIX + "volumesnapshotcontent/name"

DELETE = "Delete"
RETAIN = "Retain"

# Volume group snapshots (groupsnapshot.storage.k8s.io; loops in group_controller.py and
# group_snapshotter.py; names at the end of this module).
GROUP_GROUP = "groupsnapshot.storage.k8s.io"
GROUP_CAPABILITY = "CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT"
GROUP_CONTENT_BOUND_FINALIZER = (
    "groupsnapshot.storage.kubernetes.io/volumegroupsnapshotcontent-bound-protection"
)
GROUP_BOUND_FINALIZER = "groupsnapshot.storage.kubernetes.io/volumegroupsnapshot-bound-protection"
SNAPSHOT_IN_GROUP_FINALIZER = "snapshot.storage.kubernetes.io/volumesnapshot-in-group-protection"
ANN_GROUP_BEING_CREATED = "groupsnapshot.storage.kubernetes.io/volumegroupsnapshot-being-created"
ANN_GROUP_BEING_DELETED = "groupsnapshot.storage.kubernetes.io/volumegroupsnapshot-being-deleted"
ANN_GROUP_DELETION_SECRET_NAME = "groupsnapshot.storage.kubernetes.io/deletion-secret-name"
ANN_GROUP_DELETION_SECRET_NAMESPACE = "groupsnapshot.storage.kubernetes.io/deletion-secret-namespace"
ANN_GROUP_IS_DEFAULT_CLASS = "groupsnapshot.storage.kubernetes.io/is-default-class"
GROUP_SECRET_NAME_KEY = PARAM_PREFIX + "group-snapshotter-secret-name"
GROUP_SECRET_NAMESPACE_KEY = PARAM_PREFIX + "group-snapshotter-secret-namespace"
META_GROUP_NAME = PARAM_PREFIX + "volumegroupsnapshot/name"
META_GROUP_NAMESPACE = PARAM_PREFIX + "volumegroupsnapshot/namespace"
META_GROUP_CONTENT_NAME = PARAM_PREFIX + "volumegroupsnapshotcontent/name"


def content_name_for(snapshot: Obj) -> str:
    """Dynamic contents are named after the snapshot's UID, so a restarted controller finds them again."""
    return "snapcontent-" + str(snapshot["metadata"]["uid"])


def csi_snapshot_name(content: Obj, prefix: str = "snapshot", uuid_length: int = -1) -> str:
    """The CreateSnapshot name: `snapshot-<VolumeSnapshot UID>`, as upstream, so retries are idempotent."""
    uid = str(content["spec"]["volumeSnapshotRef"].get("uid", ""))
    if uuid_length >= 0:
        uid = uid[:uuid_length]
    return f"{prefix}-{uid}"


def error_status(message: str) -> dict[str, str]:
    return {"time": rfc3339(), "message": message}


SNAPSHOTTER_KEYS = frozenset(
    {SECRET_NAME_KEY, SECRET_NAMESPACE_KEY, LIST_SECRET_NAME_KEY, LIST_SECRET_NAMESPACE_KEY}
)


def strip_prefixed(params: dict[str, str], known: frozenset[str] = SNAPSHOTTER_KEYS) -> dict[str, str]:
    """Class parameters for the driver: `csi.storage.k8s.io/` keys are for the sidecar only.

    Unknown keys under the prefix (not in `known`) are rejected as upstream
    does, so a typo in a secret key is not silently ignored.
    """
    out: dict[str, str] = {}
    for k, v in params.items():
        if k.startswith(PARAM_PREFIX):
            if k not in known:
                raise ValueError(f"found unknown parameter key {k!r} with reserved namespace {PARAM_PREFIX}")
            continue
        out[k] = v
    return out


def _expand(template: str, params: dict[str, str]) -> str:
    try:
        return expand(template, params)
    except TemplateError as e:
        raise ValueError(f"invalid tokens: {e.missing}") from None


def secret_ref(
    params: dict[str, str],
    content_name: str,
    snapshot_name: str | None,
    snapshot_namespace: str | None,
    *,
    name_key: str = SECRET_NAME_KEY,
    namespace_key: str = SECRET_NAMESPACE_KEY,
    kind: str = "volumesnapshot",
    sidecar: str = "Snapshotter",
) -> tuple[str, str] | None:
    """Resolve the class's secret templates to (name, namespace), or None when there is no secret.

    Namespace templates may use the content name and the snapshot namespace;
    name templates also the snapshot name (which the snapshot's user controls).
    `kind` names the template tokens (``${volumesnapshot.name}``...) and
    `sidecar` the errors, as upstream words them; group snapshots pass their own.
    """
    has_name, has_ns = name_key in params, namespace_key in params
    if has_name != has_ns:
        raise ValueError(f"either name and namespace for {sidecar} secrets specified, Both must be specified")
    if not has_name:
        return None
    name_t, ns_t = params[name_key], params[namespace_key]
    if not name_t or not ns_t:
        raise ValueError(
            f"{sidecar} secrets specified in parameters but value of either namespace or name is empty"
        )
    ns_params = {f"{kind}content.name": content_name}
    if snapshot_namespace is not None:
        ns_params[f"{kind}.namespace"] = snapshot_namespace
    ns = _expand(ns_t, ns_params)
    if not is_dns1123_label(ns):
        raise ValueError(f"{ns_t!r} resolved to {ns!r} which is not a valid namespace name")
    name_params = dict(ns_params)
    if snapshot_name is not None:
        name_params[f"{kind}.name"] = snapshot_name
    name = _expand(name_t, name_params)
    if not is_dns1123_subdomain(name):
        raise ValueError(f"{name_t!r} resolved to {name!r} which is not a valid secret name")
    return name, ns


def is_default_class(cls: Obj, annotation: str = ANN_IS_DEFAULT_CLASS) -> bool:
    """Whether a (group) snapshot class is marked default (`annotation` names which kind's mark)."""
    return annotations_of(cls).get(annotation) == "true"


#: The object's spec / status ({} when absent or null): the loops spell them p.spec, p.status.
spec = spec_of
status = status_of


def source_pvc_name(snapshot: Obj) -> str | None:
    v = (spec(snapshot).get("source") or {}).get("persistentVolumeClaimName")
    return str(v) if v else None


def source_content_name(snapshot: Obj) -> str | None:
    v = (spec(snapshot).get("source") or {}).get("volumeSnapshotContentName")
    return str(v) if v else None


def is_ready(obj: Obj) -> bool:
    return status(obj).get("readyToUse") is True


def managed_by_node(pv: Obj) -> str | None:
    """The node a local PV lives on (its required node affinity on the hostname label): the value
    of `LABEL_MANAGED_BY` on its snapshots' contents in distributed (per-node) mode."""
    terms = ((spec(pv).get("nodeAffinity") or {}).get("required") or {}).get("nodeSelectorTerms") or []
    for term in terms:
        for expr in term.get("matchExpressions") or []:
            node = _one_hostname(expr)
            if node is not None:
                return node
    return None


def _one_hostname(expr: dict[str, Any]) -> str | None:
    """The node of a `kubernetes.io/hostname In [node]` expression (exactly one value), else None."""
    values = expr.get("values") or []
    if expr.get("key") == "kubernetes.io/hostname" and expr.get("operator") == "In" and len(values) == 1:
        return str(values[0])
    return None


def object_ref(res: Resource, obj: Obj, *, with_version: bool = False) -> dict[str, str]:
    """The reference a content keeps to its snapshot (or group): kind, name, namespace, uid."""
    ref = {
        "apiVersion": res.api_version,
        "kind": res.kind,
        "name": name_of(obj),
        "namespace": str(namespace_of(obj)),
        "uid": uid_of(obj),
    }
    if with_version:
        ref["resourceVersion"] = rv_of(obj)
    return ref


def refers_to(content: Obj, ref_field: str, obj: Obj) -> bool:
    """Whether `content`'s `spec.<ref_field>` names `obj` (and its uid, once the binding has one)."""
    ref = spec(content).get(ref_field) or {}
    if ref.get("name") != name_of(obj) or ref.get("namespace") != namespace_of(obj):
        return False
    return not ref.get("uid") or ref.get("uid") == uid_of(obj)


# ------------------------------------------------------------ volume group snapshots


def group_content_name_for(group: Obj) -> str:
    """Dynamic group contents are named after the group's UID, as single ones after the snapshot's."""
    return "groupsnapcontent-" + uid_of(group)


def csi_group_name(content: Obj, prefix: str = "groupsnapshot") -> str:
    """The CreateVolumeGroupSnapshot name, `groupsnapshot-<VolumeGroupSnapshot UID>` as upstream."""
    return f"{prefix}-{(spec(content).get('volumeGroupSnapshotRef') or {}).get('uid', '')}"


def _member_hash(group_uid: str, volume_handle: str) -> str:
    return hashlib.sha256((group_uid + volume_handle).encode()).hexdigest()


def member_snapshot_name(group_uid: str, volume_handle: str) -> str:
    """The member VolumeSnapshot of one volume of a group: `snapshot-<sha256(group UID + handle)>`."""
    return "snapshot-" + _member_hash(group_uid, volume_handle)


def member_content_name(group_uid: str, volume_handle: str) -> str:
    """The member VolumeSnapshotContent: `snapcontent-<sha256(group UID + handle)>`."""
    return "snapcontent-" + _member_hash(group_uid, volume_handle)


GROUP_SNAPSHOTTER_KEYS = frozenset({GROUP_SECRET_NAME_KEY, GROUP_SECRET_NAMESPACE_KEY})


def group_secret_ref(
    params: dict[str, str], content_name: str, group_name: str | None, group_namespace: str | None
) -> tuple[str, str] | None:
    """The class's `group-snapshotter-secret-*` templates resolved to (name, namespace), or None."""
    return secret_ref(
        params,
        content_name,
        group_name,
        group_namespace,
        name_key=GROUP_SECRET_NAME_KEY,
        namespace_key=GROUP_SECRET_NAMESPACE_KEY,
        kind="volumegroupsnapshot",
        sidecar="GroupSnapshotter",
    )


def strip_group_params(params: dict[str, str]) -> dict[str, str]:
    """Group class parameters for the driver (`strip_prefixed` with the group sidecar's keys)."""
    return strip_prefixed(params, GROUP_SNAPSHOTTER_KEYS)


def group_owner(obj: Obj) -> str | None:
    """`namespace/name` of the VolumeGroupSnapshot that owns a member VolumeSnapshot, if any."""
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "VolumeGroupSnapshot" and str(ref.get("apiVersion", "")).startswith(
            GROUP_GROUP
        ):
            return f"{namespace_of(obj)}/{ref.get('name')}"
    return None


def deletion_secret(content: Obj, name_key: str, namespace_key: str) -> tuple[str, str] | None:
    """The (name, namespace) of the secret a content's annotations name for its deletion, if both are set."""
    ann = annotations_of(content)
    if ann.get(name_key) and ann.get(namespace_key):
        return ann[name_key], ann[namespace_key]
    return None
