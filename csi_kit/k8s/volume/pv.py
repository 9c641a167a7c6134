"""The PersistentVolume the provisioner writes for a claim: one pure function, no I/O.

It carries the CSI source (handle, attributes plus the provisioner identity,
fsType, the secret references), the capacity the driver returned, the
class's reclaim policy and mount options, the claimRef that pre-binds it,
the accessible topology as node affinity, `pv.kubernetes.io/provisioned-by`
with the deletion secret annotations, and -- for reclaim Delete --
`external-provisioner.volume.kubernetes.io/finalizer`, so deleting the PV
object cannot leak the volume.  All upstream's fields, so external-provisioner
can delete what we made and the other way round.
"""

from __future__ import annotations

import attrs

from csi_kit.k8s.objects.meta import spec_of
from csi_kit.k8s.objects.quantity import format_quantity
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import Obj
from csi_kit.k8s.runtime.csi import CreatedVolume
from csi_kit.k8s.volume.protocol import (
    ANN_DELETION_SECRET_NAME,
    ANN_DELETION_SECRET_NAMESPACE,
    ANN_PROVISIONED_BY,
    FSTYPE_KEY,
    HOSTNAME_LABEL,
    PROVISIONER_IDENTITY_KEY,
    PV_FINALIZER,
    claim_ref_for,
    class_parameters,
    node_affinity,
    pv_secret_refs,
    secret_ref,
)


@attrs.frozen
class PVMaker:
    """What a provisioner puts into each PV beyond the claim, its class and the created volume."""

    driver: str
    identity: str  # the provisioner identity attribute (upstream: <start ms>-<random>-<driver>)
    default_fstype: str = ""
    topology_aware: bool = False
    node_name: str | None = None  # per-node mode: the node whose PVs these are
    node_topology: dict[str, str] | None = None

    def topologies(self, vol: CreatedVolume) -> tuple[dict[str, str], ...]:
        """The segments the PV's node affinity names."""
        topologies = vol.accessible_topology if self.topology_aware else ()
        if self.node_name is None or self.node_topology is None:
            return topologies
        # Per node the volume is here by construction.  The hostname term is what
        # distributed snapshotting keys on (upstream's snapshot-controller reads only
        # kubernetes.io/hostname) to send the volume's snapshots to this node.
        mine = {**self.node_topology, HOSTNAME_LABEL: self.node_name}
        return tuple(mine if t == self.node_topology else t for t in topologies) or (mine,)

    def csi_source(self, pvc: Obj, params: dict[str, str], pv_name: str, vol: CreatedVolume) -> Obj:
        attributes = dict(vol.volume_context)
        attributes[PROVISIONER_IDENTITY_KEY] = self.identity
        csi: Obj = {"driver": self.driver, "volumeHandle": vol.volume_id, "volumeAttributes": attributes}
        fs_type = params.get(FSTYPE_KEY, self.default_fstype)
        if fs_type and spec_of(pvc).get("volumeMode") != "Block":
            csi["fsType"] = fs_type
        csi.update(pv_secret_refs(params, pv_name, pvc))
        return csi

    def annotations(self, pvc: Obj, params: dict[str, str], pv_name: str) -> dict[str, str]:
        annotations = {ANN_PROVISIONED_BY: self.driver}
        ref = secret_ref(params, "provisioner", pv_name, pvc)
        if ref is not None:
            annotations[ANN_DELETION_SECRET_NAME] = ref[0]
            annotations[ANN_DELETION_SECRET_NAMESPACE] = ref[1]
        return annotations

    def pv(self, pvc: Obj, cls: Obj, pv_name: str, vol: CreatedVolume, required_bytes: int) -> Obj:
        """The PV object for `vol`, made for `pvc` from `cls` (ProvisioningError on bad secret templates)."""
        spec = spec_of(pvc)
        params = class_parameters(cls)
        policy = cls.get("reclaimPolicy") or "Delete"
        pv_spec: Obj = {
            "capacity": {"storage": format_quantity(vol.capacity_bytes or required_bytes)},
            "accessModes": list(spec.get("accessModes") or []),
            "volumeMode": spec.get("volumeMode") or "Filesystem",
            "persistentVolumeReclaimPolicy": policy,
            "storageClassName": k.name_of(cls),
            "claimRef": claim_ref_for(pvc),
            "csi": self.csi_source(pvc, params, pv_name, vol),
        }
        if cls.get("mountOptions"):
            pv_spec["mountOptions"] = list(cls["mountOptions"])
        affinity = node_affinity(self.topologies(vol))
        if affinity is not None:
            pv_spec["nodeAffinity"] = affinity
        meta: Obj = {"name": pv_name, "annotations": self.annotations(pvc, params, pv_name)}
        if policy == "Delete":
            meta["finalizers"] = [PV_FINALIZER]
        return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": meta, "spec": pv_spec}
