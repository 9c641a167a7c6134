"""The core/v1 and storage.k8s.io/v1 volume object protocol the volume loops share.

What `snapshot/protocol.py` is to the snapshot loops: PV, PVC, StorageClass
and VolumeAttachment names (annotations, finalizers, labels, class
parameter keys) and the pure helpers over those objects -- secret
references, parameter stripping, claim conditions, topology, data-source
references, access modes → CSI capabilities.  Names are upstream's byte for
byte (external-provisioner, -attacher, -resizer): they are the contract
that lets our loops and the upstream sidecars take over each other's
objects on a live cluster.

Rule: no I/O here -- no API calls, no CSI calls; every loop module reads
the objects its informers hold and asks these functions what they mean.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from csi_kit.k8s.objects.meta import spec_of, status_of
from csi_kit.k8s.objects.names import is_dns1123_label, is_dns1123_subdomain
from csi_kit.k8s.objects.templates import TemplateError, expand
from csi_kit.k8s.objects.times import rfc3339
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import Obj
from csi_kit.k8s.runtime.csi import Capability

log = logging.getLogger(__name__)

# ------------------------------------------------------------------- names

# Claims.
ANN_STORAGE_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_STORAGE_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
ANN_STORAGE_RESIZER = "volume.kubernetes.io/storage-resizer"
ANN_NODE_EXPANSION_NOT_REQUIRED = "volume.kubernetes.io/node-expansion-not-required"
# Volumes: who made them, the secret DeleteVolume needs, the finalizer that keeps the volume.
ANN_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
ANN_DELETION_SECRET_NAME = "volume.kubernetes.io/provisioner-deletion-secret-name"
ANN_DELETION_SECRET_NAMESPACE = "volume.kubernetes.io/provisioner-deletion-secret-namespace"
PV_FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"
PROVISIONER_IDENTITY_KEY = "storage.kubernetes.io/csiProvisionerIdentity"
# Data sources: the finalizers that keep a snapshot or claim while a volume is made from it.
SNAPSHOT_SOURCE_FINALIZER = "provisioner.storage.kubernetes.io/volumesnapshot-as-source-protection"
CLONE_SOURCE_FINALIZER = "provisioner.storage.kubernetes.io/cloning-protection"
SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
# VolumeAttachments: the CSI node ID recorded at attach time.
ANN_NODE_ID = "csi.alpha.kubernetes.io/node-id"
# Nodes: the label per-node PVs name their node by (distributed snapshotting keys on it).
HOSTNAME_LABEL = "kubernetes.io/hostname"
# StorageClasses.
WAIT_FOR_FIRST_CONSUMER = "WaitForFirstConsumer"
PREFIX = "csi.storage.k8s.io/"
FSTYPE_KEY = PREFIX + "fstype"
META_PVC_NAME = PREFIX + "pvc/name"
META_PVC_NAMESPACE = PREFIX + "pvc/namespace"
META_PV_NAME = PREFIX + "pv/name"


def _secret_keys(kind: str) -> tuple[str, str]:
    return PREFIX + kind + "-secret-name", PREFIX + kind + "-secret-namespace"


#: (name key, namespace key, PV `spec.csi` field or None) of every secret a class may name.
SECRET_KINDS: dict[str, tuple[str, str, str | None]] = {
    "provisioner": (*_secret_keys("provisioner"), None),
    "controller-publish": (*_secret_keys("controller-publish"), "controllerPublishSecretRef"),
    "node-stage": (*_secret_keys("node-stage"), "nodeStageSecretRef"),
    "node-publish": (*_secret_keys("node-publish"), "nodePublishSecretRef"),
    "controller-expand": (*_secret_keys("controller-expand"), "controllerExpandSecretRef"),
    "node-expand": (*_secret_keys("node-expand"), "nodeExpandSecretRef"),
}
KNOWN_KEYS = {FSTYPE_KEY} | {key for kind in SECRET_KINDS.values() for key in kind[:2]}


class ProvisioningError(Exception):
    """A claim or class that cannot be provisioned as written (a ProvisioningFailed Event; retried)."""


# ------------------------------------------------------- classes and secrets


def class_parameters(cls: Obj) -> dict[str, str]:
    """A StorageClass's parameters, as strings."""
    return {str(a): str(b) for a, b in (cls.get("parameters") or {}).items()}


def driver_parameters(params: dict[str, str]) -> dict[str, str]:
    """Class parameters minus the `csi.storage.k8s.io/` keys; an unknown key there is an error."""
    out: dict[str, str] = {}
    for key, v in params.items():
        if not key.startswith(PREFIX):
            out[key] = v
        elif key not in KNOWN_KEYS:
            raise ProvisioningError(f"found unknown parameter key {key!r} with reserved namespace {PREFIX}")
    return out


def is_late_binding(cls: Obj) -> bool:
    """Whether the class binds at first consumer (unset means Immediate, the API server's default)."""
    return cls.get("volumeBindingMode") == WAIT_FOR_FIRST_CONSUMER


def _resolve(template: str, values: dict[str, str], what: str) -> str:
    try:
        return expand(template, values)
    except TemplateError as e:
        raise ProvisioningError(f"{what}: invalid tokens {e.missing} in {template!r}") from None


def _template_values(kind: str, pv_name: str, pvc: Obj | None) -> tuple[dict[str, str], dict[str, str]]:
    """(namespace template values, name template values) for a `kind` secret."""
    ns_values = {"pv.name": pv_name}
    if pvc is None:
        return ns_values, dict(ns_values)
    ns_values["pvc.namespace"] = str(k.namespace_of(pvc))
    name_values = dict(ns_values, **{"pvc.name": k.name_of(pvc)})
    if kind != "provisioner":
        name_values.update({f"pvc.annotations['{a}']": v for a, v in k.annotations_of(pvc).items()})
    return ns_values, name_values


def secret_ref(params: dict[str, str], kind: str, pv_name: str, pvc: Obj | None) -> tuple[str, str] | None:
    """Resolve one of the class's secret templates to (name, namespace), as upstream does.

    Namespace templates may use ${pv.name} and ${pvc.namespace}; name templates
    also ${pvc.name} and ${pvc.annotations['key']} -- except the provisioner
    secret, whose name may not depend on claim-controlled values beyond those.
    """
    name_key, ns_key, _ = SECRET_KINDS[kind]
    has_name, has_ns = name_key in params, ns_key in params
    if has_name != has_ns:
        raise ProvisioningError(f"{kind} secrets: both {name_key} and {ns_key} must be given")
    if not has_name:
        return None
    ns_values, name_values = _template_values(kind, pv_name, pvc)
    ns = _resolve(params[ns_key], ns_values, f"{kind} secret namespace")
    name = _resolve(params[name_key], name_values, f"{kind} secret name")
    if not is_dns1123_label(ns):
        raise ProvisioningError(f"{kind} secret namespace {params[ns_key]!r} resolved to invalid {ns!r}")
    if not is_dns1123_subdomain(name):
        raise ProvisioningError(f"{kind} secret name {params[name_key]!r} resolved to invalid {name!r}")
    return name, ns


def pv_secret_refs(params: dict[str, str], pv_name: str, pvc: Obj | None) -> dict[str, Obj]:
    """Every secret the PV records (`spec.csi.*SecretRef` field → reference); checks all the kinds."""
    out: dict[str, Obj] = {}
    for kind, (_, _, field) in SECRET_KINDS.items():
        ref = secret_ref(params, kind, pv_name, pvc)
        if ref is not None and field is not None:
            out[field] = {"name": ref[0], "namespace": ref[1]}
    return out


def deletion_secret_ref(pv: Obj) -> tuple[str, str] | None:
    """(name, namespace) of the provisioner secret recorded on a PV for DeleteVolume, if any."""
    ann = k.annotations_of(pv)
    name, ns = ann.get(ANN_DELETION_SECRET_NAME), ann.get(ANN_DELETION_SECRET_NAMESPACE)
    return (name, ns) if name and ns else None


# ------------------------------------------------------------------ claims


def claims_driver(pvc: Obj, driver: str) -> bool:
    """Whether the claim's storage-provisioner annotation (or the beta one) names `driver`."""
    ann = k.annotations_of(pvc)
    return driver in (ann.get(ANN_STORAGE_PROVISIONER), ann.get(ANN_BETA_STORAGE_PROVISIONER))


def volume_name_of(pvc: Obj) -> str:
    """The PV a claim is bound to ('' while unbound)."""
    return str(spec_of(pvc).get("volumeName") or "")


def pv_name_for(pvc: Obj, prefix: str, uuid_length: int) -> str:
    """The PV (and CreateVolume) name of a claim: `<prefix>-<claim UID>`, as upstream."""
    uid = k.uid_of(pvc)
    if uuid_length >= 0:
        uid = uid[:uuid_length]
    return f"{prefix}-{uid}"


def pvc_data_source(pvc: Obj) -> dict[str, Any] | None:
    """dataSourceRef wins over dataSource (the API server mirrors one into the other)."""
    spec = spec_of(pvc)
    ref = spec.get("dataSourceRef") or spec.get("dataSource")
    return dict(ref) if ref else None


def source_kind(ds: dict[str, Any]) -> str | None:
    """'snapshot', 'pvc', or None for a kind a volume populator fills."""
    if ds.get("kind") == "VolumeSnapshot" and ds.get("apiGroup") == SNAPSHOT_GROUP:
        return "snapshot"
    if ds.get("kind") == "PersistentVolumeClaim" and not ds.get("apiGroup"):
        return "pvc"
    return None


def source_ref(pvc: Obj) -> tuple[str, str, str] | None:
    """(kind, namespace, name) of the claim's snapshot or claim data source, else None."""
    ds = pvc_data_source(pvc)
    kind = source_kind(ds) if ds else None
    if ds is None or kind is None:
        return None
    return kind, str(ds.get("namespace") or k.namespace_of(pvc)), str(ds.get("name") or "")


def claim_key_of(pv: Obj) -> str | None:
    """`namespace/name` of the claim a PV's claimRef names, if it names both."""
    ref = spec_of(pv).get("claimRef") or {}
    if ref.get("name") and ref.get("namespace"):
        return f"{ref['namespace']}/{ref['name']}"
    return None


def claim_ref_for(pvc: Obj) -> Obj:
    """The PV's `spec.claimRef` pre-binding it to `pvc`."""
    return {
        "kind": "PersistentVolumeClaim",
        "apiVersion": "v1",
        "namespace": k.namespace_of(pvc),
        "name": k.name_of(pvc),
        "uid": k.uid_of(pvc),
        "resourceVersion": k.rv_of(pvc),
    }


# ----------------------------------------------------------------- volumes


def csi_of(pv: Obj) -> dict[str, Any]:
    """A PV's (or inline volume spec's) `csi` source ({} if none)."""
    c: dict[str, Any] = spec_of(pv).get("csi") or {}
    return c


def volume_handle(pv: Obj) -> str:
    return str(csi_of(pv).get("volumeHandle") or "")


def is_driver_volume(pv: Obj, driver: str) -> bool:
    return csi_of(pv).get("driver") == driver


def pv_capability(
    spec: dict[str, Any], *, multi_writer: bool, default_modes: Iterable[str] = ()
) -> Capability:
    """The CSI capability of a PV spec (its first access mode, as the sidecars pass it).

    Raises ValueError for a spec without a known access mode.
    """
    return capabilities_for(
        list(spec.get("accessModes") or default_modes),
        block=spec.get("volumeMode") == "Block",
        fs_type=str((spec.get("csi") or {}).get("fsType") or ""),
        mount_flags=list(spec.get("mountOptions") or []),
        single_node_multi_writer=multi_writer,
    )[0]


def attachment_pv_name(va: Obj) -> str:
    """The PV a VolumeAttachment attaches ('' for an inline volume)."""
    return str((spec_of(va).get("source") or {}).get("persistentVolumeName") or "")


def attacher_finalizer(driver: str) -> str:
    """external-attacher's finalizer: the driver name with anything but [a-zA-Z0-9-] made '-'."""
    name = re.sub(r"[^a-zA-Z0-9-]", "-", driver)
    return "external-attacher/" + (name + "X" if name.endswith("-") else name)


# ---------------------------------------------------------------- topology


def node_affinity(topologies: Iterable[dict[str, str]]) -> Obj | None:
    """Accessible topology → PV node affinity: one term per segment, all its keys `In` its value."""
    terms = [
        {"matchExpressions": [{"key": a, "operator": "In", "values": [b]} for a, b in sorted(t.items())]}
        for t in topologies
        if t
    ]
    return {"required": {"nodeSelectorTerms": terms}} if terms else None


def _expression_holds(expr: Obj, topology: dict[str, str]) -> bool:
    return expr.get("operator") == "In" and topology.get(expr.get("key", "")) in (expr.get("values") or [])


def affinity_matches(pv: Obj, topology: dict[str, str]) -> bool:
    """Whether a node with `topology` labels satisfies the PV's required node affinity."""
    required = (spec_of(pv).get("nodeAffinity") or {}).get("required") or {}
    for term in required.get("nodeSelectorTerms") or []:
        exprs = term.get("matchExpressions") or []
        if exprs and all(_expression_holds(e, topology) for e in exprs):
            return True
    return False


def _driver_entry(csinode: Obj | None, driver: str) -> dict[str, Any]:
    """The CSINode's entry for the driver ({} if it does not list the driver; the last one wins)."""
    entry: dict[str, Any] = {}
    for d in spec_of(csinode or {}).get("drivers") or []:
        if d.get("name") == driver:
            entry = d
    return entry


def topology_keys(csinode: Obj | None, driver: str) -> list[str]:
    """The topology keys a CSINode lists for the driver ([] if it does not list the driver)."""
    return list(_driver_entry(csinode, driver).get("topologyKeys") or [])


def csi_node_id(csinode: Obj | None, driver: str) -> str | None:
    """The driver's node ID on a CSINode (what NodeGetInfo answered there), if registered."""
    node_id = _driver_entry(csinode, driver).get("nodeID")
    return str(node_id) if node_id else None


def allowed_topologies(cls: Obj) -> list[dict[str, str]]:
    """A class's allowedTopologies as segments (every combination of each term's values)."""
    allowed: list[dict[str, str]] = []
    for term in cls.get("allowedTopologies") or []:
        segments: list[dict[str, str]] = [{}]
        for expr in term.get("matchLabelExpressions") or []:
            segments = [dict(s, **{expr["key"]: v}) for s in segments for v in expr.get("values") or []]
        allowed.extend(s for s in segments if s)
    return allowed


def within(segment: dict[str, str], allowed: list[dict[str, str]]) -> bool:
    """Whether `segment` lies in one of the `allowed` segments (an empty list allows all)."""
    return not allowed or any(all(segment.get(a) == b for a, b in t.items()) for t in allowed)


# ------------------------------------------------------------ access modes

#: PVC access mode → (CSI mode without, with the driver's SINGLE_NODE_MULTI_WRITER).
_MODES = {
    "ReadWriteOnce": ("SINGLE_NODE_WRITER", "SINGLE_NODE_MULTI_WRITER"),
    "ReadWriteOncePod": ("SINGLE_NODE_WRITER", "SINGLE_NODE_SINGLE_WRITER"),
    "ReadOnlyMany": ("MULTI_NODE_READER_ONLY", "MULTI_NODE_READER_ONLY"),
    "ReadWriteMany": ("MULTI_NODE_MULTI_WRITER", "MULTI_NODE_MULTI_WRITER"),
}


def capabilities_for(
    access_modes: list[str],
    *,
    block: bool,
    fs_type: str,
    mount_flags: list[str],
    single_node_multi_writer: bool,
) -> list[Capability]:
    """PVC access modes → CSI capabilities, as external-provisioner maps them.

    With the driver's SINGLE_NODE_MULTI_WRITER capability, ReadWriteOnce means
    SINGLE_NODE_MULTI_WRITER and ReadWriteOncePod SINGLE_NODE_SINGLE_WRITER;
    without it both mean SINGLE_NODE_WRITER.
    """
    if not access_modes:
        raise ValueError("the claim has no access modes")
    modes: list[str] = []
    for am in access_modes:
        if am not in _MODES:
            raise ValueError(f"unknown access mode {am!r}")
        m = _MODES[am][single_node_multi_writer]
        if m not in modes:
            modes.append(m)
    return [
        Capability(
            m, block=block, fs_type="" if block else fs_type, mount_flags=() if block else tuple(mount_flags)
        )
        for m in modes
    ]


# ------------------------------------------------------- claim conditions


def claim_condition(type_: str, message: str = "") -> dict[str, Any]:
    """A PVC condition of `type_` with status True, as the resizer's loops write them."""
    c: dict[str, Any] = {"type": type_, "status": "True", "lastTransitionTime": rfc3339()}
    if message:
        c["message"] = message
    return c


def has_claim_condition(pvc: Obj, type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True" for c in status_of(pvc).get("conditions") or []
    )


def merge_claim_conditions(
    pvc: Obj, new: Iterable[dict[str, Any]], kinds: Iterable[str], *, keep_old: bool = False
) -> list[dict[str, Any]]:
    """The claim's conditions with `new` merged in by type (upstream's Merge*ConditionsOfPVC).

    Conditions whose type is not one of `kinds` (another loop's) stay; old
    conditions of `kinds` stay only with `keep_old`; a new condition
    replaces an old one of its type.
    """
    mine = set(kinds)
    by_type = {c["type"]: c for c in new}
    out: list[dict[str, Any]] = []
    for c in status_of(pvc).get("conditions") or []:
        t = c.get("type")
        if t not in mine:
            out.append(c)
        elif t in by_type:
            out.append(by_type.pop(t))
        elif keep_old:
            out.append(c)
    return out + list(by_type.values())
