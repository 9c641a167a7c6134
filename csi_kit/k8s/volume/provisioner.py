"""The provisioner: PersistentVolumeClaim → CreateVolume → PersistentVolume, and back.

What the upstream external-provisioner does for one driver, with its object
protocol byte for byte so either can take over the other's objects:

* A claim is ours when its `volume.kubernetes.io/storage-provisioner` (or the
  beta) annotation names the driver, it is not bound, and its StorageClass
  names the driver.  Under WaitForFirstConsumer we wait for the scheduler's
  `volume.kubernetes.io/selected-node`.
* CreateVolume is named like the PV, `pvc-<claim UID>`: the name is the
  idempotency key, so a retry after a timeout, a restart, or a new leader asks
  for the same volume and never makes a second one.
* The class parameters go to the driver minus the `csi.storage.k8s.io/` keys
  (secrets, fstype), which are resolved here; unknown keys under that prefix
  are refused, as upstream does.
* Data sources: a VolumeSnapshot (restore) is protected by the
  `provisioner.storage.kubernetes.io/volumesnapshot-as-source-protection`
  finalizer, a PVC (clone) by `provisioner.storage.kubernetes.io/cloning-
  protection`, each added before CreateVolume and removed when no claim is
  still being provisioned from it.  A source in another namespace needs a
  ReferenceGrant (and `cross_namespace=True`, upstream's feature gate).
* The PV carries the CSI source, the returned capacity and topology (as node
  affinity), the class's reclaim policy and mount options, the secret
  references, `pv.kubernetes.io/provisioned-by`, and -- for reclaim Delete --
  the `external-provisioner.volume.kubernetes.io/finalizer`, so that deleting
  the PV object cannot leak the volume.  Binding is the PV controller's job.
* A released PV with reclaim policy Delete gets DeleteVolume (with the secrets
  recorded on it at creation), then the PV object goes.
* CANCELLED / DEADLINE_EXCEEDED / UNAVAILABLE / ABORTED (and RESOURCE_EXHAUSTED
  when rescheduling is not possible) mean "may exist": the request is kept
  and repeated with the same name until a final answer -- even if the claim is
  deleted meanwhile, after which the volume is deleted rather than leaked.
  RESOURCE_EXHAUSTED for a claim with a selected node on a topology-aware
  driver removes the selected-node annotation: the scheduler picks another
  node (the upstream reschedule protocol).
* Per-node mode (`node_name`): only claims selected onto this node, and only
  PVs whose node affinity matches it -- what node-local backends need.  Its
  PVs' node affinity also names the node by `kubernetes.io/hostname` (assumed
  equal to the node name, the kubelet's default), the key distributed
  snapshotting routes snapshots by.  With
  `immediate_binding` the node also claims Immediate-mode claims by writing
  its own name as selected node with an optimistic (resourceVersion) write, so
  exactly one node wins.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from typing import Any, Protocol

import attrs

from csi_kit.k8s.objects.meta import set_finalizers_patch
from csi_kit.k8s.objects.names import is_dns1123_label, is_dns1123_subdomain
from csi_kit.k8s.objects.quantity import format_quantity, parse_quantity, storage_of
from csi_kit.k8s.objects.resources import (
    CSI_NODE,
    NODE,
    PV,
    PVC,
    REFERENCE_GRANT,
    SECRET,
    STORAGE_CLASS,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CONTENT,
)
from csi_kit.k8s.objects.templates import TemplateError, expand
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.controller import Loop, Retry
from csi_kit.k8s.runtime.csi import (
    NON_FINAL_CODES,
    Capability,
    CreatedVolume,
    CSICallError,
    DriverInfo,
    TopologyRequirement,
)
from csi_kit.k8s.runtime.events import EventRecorder
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.volume.protocol import capabilities_for

log = logging.getLogger(__name__)

# Annotations and finalizers (upstream names).
ANN_STORAGE_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_STORAGE_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
ANN_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
ANN_DELETION_SECRET_NAME = "volume.kubernetes.io/provisioner-deletion-secret-name"
ANN_DELETION_SECRET_NAMESPACE = "volume.kubernetes.io/provisioner-deletion-secret-namespace"
PV_FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"
SNAPSHOT_SOURCE_FINALIZER = "provisioner.storage.kubernetes.io/volumesnapshot-as-source-protection"
CLONE_SOURCE_FINALIZER = "provisioner.storage.kubernetes.io/cloning-protection"
PROVISIONER_IDENTITY_KEY = "storage.kubernetes.io/csiProvisionerIdentity"
HOSTNAME_LABEL = "kubernetes.io/hostname"

PREFIX = "csi.storage.k8s.io/"
FSTYPE_KEY = PREFIX + "fstype"
META_PVC_NAME = PREFIX + "pvc/name"
META_PVC_NAMESPACE = PREFIX + "pvc/namespace"
META_PV_NAME = PREFIX + "pv/name"

# (name key, namespace key) of every secret a class may name, and where the PV records it.
SECRET_KINDS: dict[str, tuple[str, str, str | None]] = {
    "provisioner": (PREFIX + "provisioner-secret-name", PREFIX + "provisioner-secret-namespace", None),
    "controller-publish": (
        PREFIX + "controller-publish-secret-name",
        PREFIX + "controller-publish-secret-namespace",
        "controllerPublishSecretRef",
    ),
    "node-stage": (
        PREFIX + "node-stage-secret-name",
        PREFIX + "node-stage-secret-namespace",
        "nodeStageSecretRef",
    ),
    "node-publish": (
        PREFIX + "node-publish-secret-name",
        PREFIX + "node-publish-secret-namespace",
        "nodePublishSecretRef",
    ),
    "controller-expand": (
        PREFIX + "controller-expand-secret-name",
        PREFIX + "controller-expand-secret-namespace",
        "controllerExpandSecretRef",
    ),
    "node-expand": (
        PREFIX + "node-expand-secret-name",
        PREFIX + "node-expand-secret-namespace",
        "nodeExpandSecretRef",
    ),
}
KNOWN_KEYS = {FSTYPE_KEY} | {key for kind in SECRET_KINDS.values() for key in kind[:2]}

SNAPSHOT_GROUP = "snapshot.storage.k8s.io"


class VolumeDriver(Protocol):
    """The CSI calls the provisioner makes (`runtime.csi.CSIClient` implements it)."""

    async def create_volume(
        self,
        name: str,
        *,
        required_bytes: int,
        limit_bytes: int,
        capabilities: list[Capability],
        parameters: dict[str, str],
        secrets: dict[str, str],
        source: tuple[str, str] | None = None,
        topology: TopologyRequirement | None = None,
    ) -> CreatedVolume: ...

    async def delete_volume(self, volume_id: str, secrets: dict[str, str]) -> None: ...


class ProvisioningError(Exception):
    """A claim that cannot be provisioned as written; reported as a ProvisioningFailed event, retried."""


@attrs.frozen
class CreateRequest:
    """Everything CreateVolume is called with, kept while the answer may still be "in progress"."""

    name: str
    required_bytes: int
    limit_bytes: int
    capabilities: tuple[Capability, ...]
    parameters: dict[str, str]
    secrets: dict[str, str] = attrs.field(repr=False)
    source: tuple[str, str] | None
    topology: TopologyRequirement | None
    source_ref: tuple[str, str, str] | None = None  # (kind, namespace, name) of the claim's data source


def _resolve(template: str, values: dict[str, str], what: str) -> str:
    try:
        return expand(template, values)
    except TemplateError as e:
        raise ProvisioningError(f"{what}: invalid tokens {e.missing} in {template!r}") from None


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
    ns_values = {"pv.name": pv_name}
    name_values = {"pv.name": pv_name}
    if pvc is not None:
        ns_values["pvc.namespace"] = str(k.namespace_of(pvc))
        name_values["pvc.namespace"] = str(k.namespace_of(pvc))
        name_values["pvc.name"] = k.name_of(pvc)
        if kind != "provisioner":
            for ak, av in k.annotations_of(pvc).items():
                name_values[f"pvc.annotations['{ak}']"] = av
    ns = _resolve(params[ns_key], ns_values, f"{kind} secret namespace")
    name = _resolve(params[name_key], name_values, f"{kind} secret name")
    if not is_dns1123_label(ns):
        raise ProvisioningError(f"{kind} secret namespace {params[ns_key]!r} resolved to invalid {ns!r}")
    if not is_dns1123_subdomain(name):
        raise ProvisioningError(f"{kind} secret name {params[name_key]!r} resolved to invalid {name!r}")
    return name, ns


def driver_parameters(params: dict[str, str]) -> dict[str, str]:
    """Class parameters minus the `csi.storage.k8s.io/` keys; an unknown key there is an error."""
    out: dict[str, str] = {}
    for key, v in params.items():
        if key.startswith(PREFIX):
            if key not in KNOWN_KEYS:
                raise ProvisioningError(
                    f"found unknown parameter key {key!r} with reserved namespace {PREFIX}"
                )
            continue
        out[key] = v
    return out


def node_affinity(topologies: tuple[dict[str, str], ...]) -> Obj | None:
    """Accessible topology → PV node affinity: one term per segment, all its keys `In` its value."""
    terms = [
        {
            "matchExpressions": [
                {"key": key, "operator": "In", "values": [val]} for key, val in sorted(t.items())
            ]
        }
        for t in topologies
        if t
    ]
    return {"required": {"nodeSelectorTerms": terms}} if terms else None


def affinity_matches(pv: Obj, topology: dict[str, str]) -> bool:
    """Whether a node with `topology` labels satisfies the PV's required node affinity."""
    terms = (((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}).get(
        "nodeSelectorTerms"
    )
    if not terms:
        return False
    for term in terms:
        exprs = term.get("matchExpressions") or []
        if exprs and all(
            e.get("operator") == "In" and topology.get(e.get("key", "")) in (e.get("values") or [])
            for e in exprs
        ):
            return True
    return False


def pvc_data_source(pvc: Obj) -> dict[str, Any] | None:
    """dataSourceRef wins over dataSource (the API server mirrors one into the other)."""
    spec = pvc.get("spec") or {}
    ref = spec.get("dataSourceRef") or spec.get("dataSource")
    return dict(ref) if ref else None


def source_kind(ds: dict[str, Any]) -> str | None:
    if ds.get("kind") == "VolumeSnapshot" and ds.get("apiGroup") == SNAPSHOT_GROUP:
        return "snapshot"
    if ds.get("kind") == "PersistentVolumeClaim" and not ds.get("apiGroup"):
        return "pvc"
    return None


class Provisioner(Loop):
    name = "provisioner"

    def __init__(
        self,
        api: KubeAPI,
        driver: VolumeDriver,
        info: DriverInfo,
        *,
        informers: InformerFactory | None = None,
        node_name: str | None = None,
        node_topology: dict[str, str] | None = None,
        immediate_binding: bool = True,
        extra_create_metadata: bool = False,
        volume_name_prefix: str = "pvc",
        volume_name_uuid_length: int = -1,
        default_fstype: str = "",
        cross_namespace: bool = False,
        events: bool = True,
        workers: int = 10,
        resync_period: float = 900.0,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
    ) -> None:
        super().__init__(informers=informers, workers=workers, base_delay=base_delay, max_delay=max_delay)
        self.api = api
        self.driver = driver
        self.driver_name = info.name
        self.topology_aware = "VOLUME_ACCESSIBILITY_CONSTRAINTS" in info.plugin_capabilities
        self.multi_writer = "SINGLE_NODE_MULTI_WRITER" in info.controller_capabilities
        self.can_delete = "CREATE_DELETE_VOLUME" in info.controller_capabilities
        self.node_name = node_name
        self.node_topology = node_topology
        self.immediate_binding = immediate_binding
        self.extra_create_metadata = extra_create_metadata
        self.volume_name_prefix = volume_name_prefix
        self.volume_name_uuid_length = volume_name_uuid_length
        self.default_fstype = default_fstype
        self.cross_namespace = cross_namespace
        self.identity = f"{int(time.time() * 1000)}-{uuid.uuid4().int % 10000}-{self.driver_name}"
        self.events = EventRecorder(api, f"{self.driver_name}_csi-kit-provisioner", enabled=events)
        self.pvcs = self.informer(api, PVC, resync_period=resync_period)
        self.pvs = self.informer(api, PV, resync_period=resync_period)
        self.classes = self.informer(api, STORAGE_CLASS)
        self.claim_queue = self.queue("claim", self.sync_claim)
        self.volume_queue = self.queue("volume", self.sync_volume)
        self.source_queue = self.queue("source", self.sync_source)
        self.pvcs.add_handler(self._on_claim)
        self.pvs.add_handler(self._on_volume)
        self.classes.add_handler(self._on_class)
        # Claims whose CreateVolume may still be running on the storage side.
        self.in_progress: dict[str, CreateRequest] = {}
        # Snapshots known to carry no finalizer of ours (saves a GET on every later sync).
        self._released_snapshots: set[tuple[str, str]] = set()

    # ------------------------------------------------------------ event routing

    def _on_claim(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        key = k.key_of(obj)
        if event == "DELETED":
            if key in self.in_progress:
                self.claim_queue.add(key)  # finish the create, then delete what it made
            self._requeue_sources_of(obj)
            return
        self.claim_queue.add(key)

    def _on_volume(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        if (
            event != "DELETED"
            and ((obj.get("spec") or {}).get("csi") or {}).get("driver") == self.driver_name
        ):
            self.volume_queue.add(k.name_of(obj))
        ref = (obj.get("spec") or {}).get("claimRef") or {}
        if event == "ADDED" and ref.get("name") and ref.get("namespace"):
            # A new PV may finish a clone/restore: let its claim release the source.
            self.claim_queue.add(f"{ref['namespace']}/{ref['name']}")

    def _on_class(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        if event in ("ADDED", "MODIFIED") and obj is not None and obj.get("provisioner") == self.driver_name:
            for pvc in self.pvcs.items():
                if (pvc.get("spec") or {}).get("storageClassName") == k.name_of(obj) and not (
                    pvc.get("spec") or {}
                ).get("volumeName"):
                    self.claim_queue.add(k.key_of(pvc))

    def _requeue_sources_of(self, pvc: Obj) -> None:
        """A claim went: its source may no longer be needed (even if it was never provisioned)."""
        ref = self._source_ref(pvc)
        if ref is not None:
            self.source_queue.add("|".join(ref))

    async def sync_source(self, key: str) -> None:
        """Release a data source (`kind|namespace|name`) nobody is being provisioned from any more."""
        kind, ns, name = key.split("|", 2)
        if self._still_needed(ns, name, kind):
            return
        if kind == "snapshot":
            await self._release_snapshot(ns, name)
            return
        src = self.pvcs.get(f"{ns}/{name}")
        if src is not None:
            patch = set_finalizers_patch(src, remove={CLONE_SOURCE_FINALIZER})
            if patch is not None:
                try:
                    await self._patch(PVC, src, patch)
                except ApiError as e:
                    if not k.is_not_found(e):
                        raise

    # ---------------------------------------------------------------- helpers

    def pv_name(self, pvc: Obj) -> str:
        uid = k.uid_of(pvc)
        if self.volume_name_uuid_length >= 0:
            uid = uid[: self.volume_name_uuid_length]
        return f"{self.volume_name_prefix}-{uid}"

    def _is_ours(self, pvc: Obj) -> bool:
        ann = k.annotations_of(pvc)
        return self.driver_name in (ann.get(ANN_STORAGE_PROVISIONER), ann.get(ANN_BETA_STORAGE_PROVISIONER))

    async def _secrets(self, ref: tuple[str, str] | None) -> dict[str, str]:
        if ref is None:
            return {}
        try:
            secret = await self.api.get(SECRET, ref[0], ref[1])
        except ApiError as e:
            if k.is_not_found(e):
                raise ProvisioningError(f"secret {ref[1]}/{ref[0]} not found") from None
            raise
        return {key: base64.b64decode(v).decode() for key, v in (secret.get("data") or {}).items()}

    async def _patch(self, res: k.Resource, obj: Obj, patch: Obj) -> Obj:
        updated = await self.api.patch(res, k.name_of(obj), patch, k.namespace_of(obj))
        if res == PVC:
            self.pvcs.store_update(updated)
        elif res == PV:
            self.pvs.store_update(updated)
        return updated

    async def _fail(self, pvc: Obj, message: str) -> None:
        await self.events.event(pvc, "Warning", "ProvisioningFailed", message)

    # ------------------------------------------------------------ claim sync

    async def sync_claim(self, key: str) -> None:
        pvc = self.pvcs.get(key)
        if pvc is None:
            await self._finish_orphan(key)
            return
        await self._release_sources(pvc)
        if not self._should_provision(pvc):
            return
        cls = self.classes.get(str((pvc.get("spec") or {}).get("storageClassName") or ""))
        if cls is None:
            msg = f'storageclass.storage.k8s.io "{(pvc.get("spec") or {}).get("storageClassName")}" not found'
            await self._fail(pvc, msg)
            raise Retry(msg)
        if cls.get("provisioner") != self.driver_name:
            return
        selected = k.annotations_of(pvc).get(ANN_SELECTED_NODE)
        late = cls.get("volumeBindingMode") == "WaitForFirstConsumer"
        if self.node_name is not None:
            if selected is None and not late and self.immediate_binding:
                pvc = await self._claim_for_this_node(pvc)
                if pvc is None:
                    return
                selected = self.node_name
            if selected != self.node_name:
                return
        elif late and not selected:
            return  # the scheduler has not picked a node yet
        pv_name = self.pv_name(pvc)
        if self.pvs.get(pv_name) is not None:
            return
        try:
            request = await self._build_request(pvc, cls, pv_name, selected)
        except ProvisioningError as e:
            await self._fail(pvc, f"failed to provision volume with StorageClass {k.name_of(cls)!r}: {e}")
            raise
        if request is None:
            return
        created = await self._create(key, pvc, request, reschedulable=bool(selected) and self.topology_aware)
        if created is None:
            return
        await self._save_pv(pvc, cls, pv_name, created, request)

    def _should_provision(self, pvc: Obj) -> bool:
        spec = pvc.get("spec") or {}
        if spec.get("volumeName") or k.is_deleting(pvc) or not self._is_ours(pvc):
            return False
        ds = pvc_data_source(pvc)
        # A claim for a volume populator is the populator's to fill.
        return not (ds and source_kind(ds) is None)

    async def _claim_for_this_node(self, pvc: Obj) -> Obj | None:
        """Per-node, Immediate binding: race the other nodes for the claim with an optimistic write."""
        try:
            return await self._patch(
                PVC,
                pvc,
                {
                    "metadata": {
                        "annotations": {ANN_SELECTED_NODE: self.node_name},
                        "resourceVersion": k.rv_of(pvc),
                    }
                },
            )
        except ApiError as e:
            if k.is_conflict(e) or k.is_not_found(e):
                return None  # another node was faster, or the claim is gone; its next event decides
            raise

    async def _build_request(
        self, pvc: Obj, cls: Obj, pv_name: str, selected: str | None
    ) -> CreateRequest | None:
        spec = pvc.get("spec") or {}
        try:
            required = storage_of(pvc, "spec", "resources", "requests")
            limit = storage_of(pvc, "spec", "resources", "limits") or 0
        except ValueError as e:
            raise ProvisioningError(str(e)) from None
        if required is None:
            raise ProvisioningError("the claim requests no storage")
        if limit and limit < required:
            raise ProvisioningError(f"storage limit {limit} is below the request {required}")
        params_in = {str(a): str(b) for a, b in (cls.get("parameters") or {}).items()}
        params = driver_parameters(params_in)
        block = spec.get("volumeMode") == "Block"
        fs_type = params_in.get(FSTYPE_KEY, self.default_fstype)
        try:
            caps = capabilities_for(
                list(spec.get("accessModes") or []),
                block=block,
                fs_type=fs_type,
                mount_flags=list(cls.get("mountOptions") or []),
                single_node_multi_writer=self.multi_writer,
            )
        except ValueError as e:
            raise ProvisioningError(str(e)) from None
        if self.extra_create_metadata:
            params[META_PVC_NAME] = k.name_of(pvc)
            params[META_PVC_NAMESPACE] = str(k.namespace_of(pvc))
            params[META_PV_NAME] = pv_name
        source = await self._data_source(pvc, required)
        if isinstance(source, bool):
            return None
        for kind in SECRET_KINDS:
            secret_ref(params_in, kind, pv_name, pvc)  # refuse bad templates before any volume exists
        secrets = await self._secrets(secret_ref(params_in, "provisioner", pv_name, pvc))
        topology = await self._topology(cls, selected) if self.topology_aware else None
        return CreateRequest(
            name=pv_name,
            required_bytes=required,
            limit_bytes=limit,
            capabilities=tuple(caps),
            parameters=params,
            secrets=secrets,
            source=source,
            topology=topology,
            source_ref=self._source_ref(pvc),
        )

    @staticmethod
    def _source_ref(pvc: Obj) -> tuple[str, str, str] | None:
        ds = pvc_data_source(pvc)
        kind = source_kind(ds) if ds else None
        if ds is None or kind is None:
            return None
        return kind, str(ds.get("namespace") or k.namespace_of(pvc)), str(ds.get("name") or "")

    # ----------------------------------------------------------- data sources

    async def _granted(self, pvc: Obj, ds: dict[str, Any]) -> bool:
        """A ReferenceGrant in the source namespace lets claims in ours use this kind (and name)."""
        src_ns = str(ds.get("namespace"))
        try:
            grants = await self.api.list(REFERENCE_GRANT, src_ns)
        except ApiError as e:
            if k.is_not_found(e):
                return False  # the ReferenceGrant CRD is not installed
            raise
        group = ds.get("apiGroup") or ""
        for g in grants.items:
            gspec = g.get("spec") or {}
            from_ok = any(
                (f.get("group") or "") == ""
                and f.get("kind") == "PersistentVolumeClaim"
                and f.get("namespace") == k.namespace_of(pvc)
                for f in gspec.get("from") or []
            )
            to_ok = any(
                (t.get("group") or "") == group
                and t.get("kind") == ds.get("kind")
                and (not t.get("name") or t.get("name") == ds.get("name"))
                for t in gspec.get("to") or []
            )
            if from_ok and to_ok:
                return True
        return False

    async def _data_source(self, pvc: Obj, required: int) -> tuple[str, str] | bool | None:
        """The CSI content source for the claim's data source (None: none; False: not ours to fill)."""
        ds = pvc_data_source(pvc)
        if not ds:
            return None
        kind = source_kind(ds)
        if kind is None:
            return False
        ns = str(ds.get("namespace") or k.namespace_of(pvc))
        if ns != k.namespace_of(pvc):
            if not self.cross_namespace:
                raise ProvisioningError(
                    f"data source {ds.get('kind')} {ns}/{ds.get('name')} is in another namespace "
                    "and cross-namespace data sources are not enabled"
                )
            if not await self._granted(pvc, ds):
                raise ProvisioningError(
                    f"accessing {ds.get('kind')} {ns}/{ds.get('name')} from namespace {k.namespace_of(pvc)} "
                    "is not allowed by any ReferenceGrant"
                )
        name = str(ds.get("name") or "")
        if not name:
            raise ProvisioningError("the data source has no name")
        if kind == "snapshot":
            return ("snapshot", await self._snapshot_source(pvc, ns, name, required))
        return ("volume", await self._clone_source(pvc, ns, name, required))

    async def _snapshot_source(self, pvc: Obj, ns: str, name: str, required: int) -> str:
        try:
            snap = await self.api.get(VOLUME_SNAPSHOT, name, ns)
        except ApiError as e:
            if k.is_not_found(e):
                raise ProvisioningError(
                    f'volumesnapshot.snapshot.storage.k8s.io "{name}" not found'
                ) from None
            raise
        if k.is_deleting(snap) and SNAPSHOT_SOURCE_FINALIZER not in k.finalizers_of(snap):
            raise ProvisioningError(f"snapshot {ns}/{name} is being deleted")
        st = snap.get("status") or {}
        if st.get("readyToUse") is not True:
            raise ProvisioningError(f"snapshot {ns}/{name} is not Ready")
        content_name = st.get("boundVolumeSnapshotContentName")
        if not content_name:
            raise ProvisioningError(f"snapshot {ns}/{name} is not bound to a content")
        try:
            content = await self.api.get(VOLUME_SNAPSHOT_CONTENT, str(content_name))
        except ApiError as e:
            if k.is_not_found(e):
                raise ProvisioningError(f"content {content_name} of snapshot {ns}/{name} not found") from None
            raise
        cspec, cst = content.get("spec") or {}, content.get("status") or {}
        ref = cspec.get("volumeSnapshotRef") or {}
        if (
            ref.get("name") != name
            or ref.get("namespace") != ns
            or (ref.get("uid") and ref["uid"] != k.uid_of(snap))
        ):
            raise ProvisioningError(f"content {content_name} is not bound to snapshot {ns}/{name}")
        if cspec.get("driver") != self.driver_name:
            raise ProvisioningError(f"snapshot {ns}/{name} belongs to driver {cspec.get('driver')!r}")
        handle = cst.get("snapshotHandle") or (cspec.get("source") or {}).get("snapshotHandle")
        if not handle:
            raise ProvisioningError(f"content {content_name} has no snapshot handle yet")
        restore = st.get("restoreSize")
        if restore is not None:
            try:
                size = parse_quantity(restore)
            except ValueError:
                size = 0
            if required < size:
                raise ProvisioningError(
                    f"requested volume size {required} is less than the size {size} of the source snapshot"
                )
        self._released_snapshots.discard((ns, name))
        patch = set_finalizers_patch(snap, add={SNAPSHOT_SOURCE_FINALIZER})
        if patch is not None:
            await self.api.patch(VOLUME_SNAPSHOT, name, patch, ns)
        return str(handle)

    async def _clone_source(self, pvc: Obj, ns: str, name: str, required: int) -> str:
        src = self.pvcs.get(f"{ns}/{name}")
        if src is None:
            raise ProvisioningError(f'persistentvolumeclaim "{name}" not found')
        if k.is_deleting(src) and CLONE_SOURCE_FINALIZER not in k.finalizers_of(src):
            raise ProvisioningError(f"the source claim {ns}/{name} is being deleted")
        sspec = src.get("spec") or {}
        if (src.get("status") or {}).get("phase") != "Bound" or not sspec.get("volumeName"):
            raise ProvisioningError(f"the source claim {ns}/{name} is not bound")
        if sspec.get("storageClassName") != (pvc.get("spec") or {}).get("storageClassName"):
            raise ProvisioningError(
                "the source and destination claims must be in the same storage class for cloning"
            )
        if (sspec.get("volumeMode") or "Filesystem") != (
            (pvc.get("spec") or {}).get("volumeMode") or "Filesystem"
        ):
            raise ProvisioningError("the source and destination claims must have the same volume mode")
        pv = self.pvs.get(str(sspec["volumeName"]))
        if pv is None:
            raise ProvisioningError(f"the volume {sspec['volumeName']} of claim {ns}/{name} not found")
        csi = (pv.get("spec") or {}).get("csi") or {}
        if csi.get("driver") != self.driver_name:
            raise ProvisioningError(f"the source claim {ns}/{name} belongs to driver {csi.get('driver')!r}")
        try:
            size = (
                storage_of(src, "status", "capacity") or storage_of(src, "spec", "resources", "requests") or 0
            )
        except ValueError:
            size = 0
        if required < size:
            raise ProvisioningError(
                f"error getting handle for DataSource Type PersistentVolumeClaim by Name {name}: "
                "new PVC request must be greater than or equal in size to the specified PVC data source"
            )
        patch = set_finalizers_patch(src, add={CLONE_SOURCE_FINALIZER})
        if patch is not None:
            await self._patch(PVC, src, patch)
        return str(csi["volumeHandle"])

    def _still_needed(
        self, source_ns: str, source_name: str, kind: str, *, besides: str | None = None
    ) -> bool:
        """Whether some claim is still being provisioned from this source (cache only, no request)."""
        for pvc in self.pvcs.items():
            key = k.key_of(pvc)
            if key == besides:
                continue
            ds = pvc_data_source(pvc)
            if not ds or source_kind(ds) != kind or ds.get("name") != source_name:
                continue
            if str(ds.get("namespace") or k.namespace_of(pvc)) != source_ns:
                continue
            if not (pvc.get("spec") or {}).get("volumeName") and self.pvs.get(self.pv_name(pvc)) is None:
                return True
        return any(
            key != besides and r.source_ref == (kind, source_ns, source_name)
            for key, r in self.in_progress.items()
        )

    async def _release_sources(self, pvc: Obj) -> None:
        """Drop our finalizers from the claim's source, and from the claim as a source, once unneeded."""
        ds = pvc_data_source(pvc)
        done = bool((pvc.get("spec") or {}).get("volumeName")) or self.pvs.get(self.pv_name(pvc)) is not None
        if ds and done and self._is_ours(pvc) and k.key_of(pvc) not in self.in_progress:
            kind = source_kind(ds)
            ns = str(ds.get("namespace") or k.namespace_of(pvc))
            name = str(ds.get("name") or "")
            if kind == "pvc":
                src = self.pvcs.get(f"{ns}/{name}")
                if (
                    src is not None
                    and CLONE_SOURCE_FINALIZER in k.finalizers_of(src)
                    and not self._still_needed(ns, name, "pvc")
                ):
                    patch = set_finalizers_patch(src, remove={CLONE_SOURCE_FINALIZER})
                    if patch is not None:
                        await self._patch(PVC, src, patch)
            elif kind == "snapshot" and not self._still_needed(ns, name, "snapshot"):
                await self._release_snapshot(ns, name)
        if CLONE_SOURCE_FINALIZER in k.finalizers_of(pvc) and not self._still_needed(
            str(k.namespace_of(pvc)), k.name_of(pvc), "pvc"
        ):
            patch = set_finalizers_patch(pvc, remove={CLONE_SOURCE_FINALIZER})
            if patch is not None:
                await self._patch(PVC, pvc, patch)

    async def _release_snapshot(self, ns: str, name: str) -> None:
        """Drop our finalizer from a snapshot (a GET the first time only: snapshots are not watched)."""
        if (ns, name) in self._released_snapshots:
            return
        try:
            snap = await self.api.get(VOLUME_SNAPSHOT, name, ns)
            patch = set_finalizers_patch(snap, remove={SNAPSHOT_SOURCE_FINALIZER})
            if patch is not None:
                await self.api.patch(VOLUME_SNAPSHOT, name, patch, ns)
        except ApiError as e:
            if not k.is_not_found(e):
                raise
        self._released_snapshots.add((ns, name))

    # --------------------------------------------------------------- topology

    async def _node_segment(self, node_name: str) -> dict[str, str]:
        """The selected node's topology: its labels under the keys its CSINode lists for the driver."""
        if node_name == self.node_name and self.node_topology is not None:
            return dict(self.node_topology)
        try:
            csinode = await self.api.get(CSI_NODE, node_name)
            node = await self.api.get(NODE, node_name)
        except ApiError as e:
            if k.is_not_found(e):
                raise ProvisioningError(f"node {node_name!r} or its CSINode not found") from None
            raise
        keys: list[str] = []
        for d in (csinode.get("spec") or {}).get("drivers") or []:
            if d.get("name") == self.driver_name:
                keys = list(d.get("topologyKeys") or [])
        if not keys:
            raise ProvisioningError(f"driver {self.driver_name} is not registered on node {node_name!r}")
        labels = k.labels_of(node)
        missing = [key for key in keys if key not in labels]
        if missing:
            raise ProvisioningError(f"node {node_name!r} lacks topology labels {missing}")
        return {key: labels[key] for key in keys}

    async def _topology(self, cls: Obj, selected: str | None) -> TopologyRequirement | None:
        allowed: list[dict[str, str]] = []
        for term in cls.get("allowedTopologies") or []:
            seg: list[dict[str, str]] = [{}]
            for expr in term.get("matchLabelExpressions") or []:
                seg = [dict(s, **{expr["key"]: v}) for s in seg for v in expr.get("values") or []]
            allowed.extend(s for s in seg if s)
        if selected:
            mine = await self._node_segment(selected)
            if allowed and not any(all(mine.get(a) == b for a, b in t.items()) for t in allowed):
                raise ProvisioningError(
                    f"selected node {selected!r} is outside the class's allowedTopologies"
                )
            return TopologyRequirement((mine,), (mine,))
        if allowed:
            return TopologyRequirement(tuple(allowed), tuple(allowed))
        return None

    # ------------------------------------------------------------ create/save

    async def _create(
        self, key: str, pvc: Obj, req: CreateRequest, *, reschedulable: bool
    ) -> CreatedVolume | None:
        self.in_progress[key] = req
        try:
            created = await self.driver.create_volume(
                req.name,
                required_bytes=req.required_bytes,
                limit_bytes=req.limit_bytes,
                capabilities=list(req.capabilities),
                parameters=req.parameters,
                secrets=req.secrets,
                source=req.source,
                topology=req.topology,
            )
        except CSICallError as e:
            final = e.code not in NON_FINAL_CODES
            if e.code.name == "RESOURCE_EXHAUSTED" and reschedulable:
                self._settled(key)
                await self._fail(pvc, f"failed to provision volume: {e}; rescheduling")
                await self._reschedule(pvc)
                return None
            if final:
                self._settled(key)
            await self._fail(pvc, f"failed to provision volume with StorageClass: {e}")
            raise
        self._settled(key)
        return created

    def _settled(self, key: str) -> None:
        """CreateVolume for `key` has a final answer: its source may be released now."""
        req = self.in_progress.pop(key, None)
        if req is not None and req.source_ref is not None:
            self.source_queue.add("|".join(req.source_ref))

    async def _reschedule(self, pvc: Obj) -> None:
        """Give the scheduler the claim back: without a selected node it picks one again."""
        if ANN_SELECTED_NODE not in k.annotations_of(pvc):
            return
        try:
            await self._patch(PVC, pvc, {"metadata": {"annotations": {ANN_SELECTED_NODE: None}}})
        except ApiError as e:
            if not k.is_not_found(e):
                raise

    def _pv_object(self, pvc: Obj, cls: Obj, pv_name: str, vol: CreatedVolume, req: CreateRequest) -> Obj:
        spec = pvc.get("spec") or {}
        params_in = {str(a): str(b) for a, b in (cls.get("parameters") or {}).items()}
        policy = cls.get("reclaimPolicy") or "Delete"
        annotations = {ANN_PROVISIONED_BY: self.driver_name}
        ref = secret_ref(params_in, "provisioner", pv_name, pvc)
        if ref is not None:
            annotations[ANN_DELETION_SECRET_NAME] = ref[0]
            annotations[ANN_DELETION_SECRET_NAMESPACE] = ref[1]
        attributes = dict(vol.volume_context)
        attributes[PROVISIONER_IDENTITY_KEY] = self.identity
        csi: Obj = {"driver": self.driver_name, "volumeHandle": vol.volume_id, "volumeAttributes": attributes}
        fs_type = params_in.get(FSTYPE_KEY, self.default_fstype)
        if fs_type and spec.get("volumeMode") != "Block":
            csi["fsType"] = fs_type
        for kind, (_, _, field) in SECRET_KINDS.items():
            if field is None:
                continue
            r = secret_ref(params_in, kind, pv_name, pvc)
            if r is not None:
                csi[field] = {"name": r[0], "namespace": r[1]}
        capacity = vol.capacity_bytes or req.required_bytes
        pv_spec: Obj = {
            "capacity": {"storage": format_quantity(capacity)},
            "accessModes": list(spec.get("accessModes") or []),
            "volumeMode": spec.get("volumeMode") or "Filesystem",
            "persistentVolumeReclaimPolicy": policy,
            "storageClassName": k.name_of(cls),
            "claimRef": {
                "kind": "PersistentVolumeClaim",
                "apiVersion": "v1",
                "namespace": k.namespace_of(pvc),
                "name": k.name_of(pvc),
                "uid": k.uid_of(pvc),
                "resourceVersion": k.rv_of(pvc),
            },
            "csi": csi,
        }
        if cls.get("mountOptions"):
            pv_spec["mountOptions"] = list(cls["mountOptions"])
        topologies = vol.accessible_topology if self.topology_aware else ()
        if self.node_name is not None and self.node_topology is not None:
            # Per node the volume is here by construction.  The hostname term is what
            # distributed snapshotting keys on (upstream's snapshot-controller reads only
            # kubernetes.io/hostname) to send the volume's snapshots to this node.
            topologies = tuple(
                dict(t, **{HOSTNAME_LABEL: self.node_name}) if t == self.node_topology else t
                for t in topologies
            ) or ({**self.node_topology, HOSTNAME_LABEL: self.node_name},)
        affinity = node_affinity(topologies)
        if affinity is not None:
            pv_spec["nodeAffinity"] = affinity
        meta: Obj = {"name": pv_name, "annotations": annotations}
        if policy == "Delete":
            meta["finalizers"] = [PV_FINALIZER]
        return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": meta, "spec": pv_spec}

    async def _save_pv(
        self, pvc: Obj, cls: Obj, pv_name: str, vol: CreatedVolume, req: CreateRequest
    ) -> None:
        pv = self._pv_object(pvc, cls, pv_name, vol, req)
        try:
            created = await self.api.create(PV, pv)
            self.pvs.store_update(created)
        except ApiError as e:
            if not k.is_already_exists(e):
                await self._fail(pvc, f"failed to save the PersistentVolume {pv_name}: {e}")
                raise  # retried: CreateVolume with the same name answers the same volume
        await self.events.event(
            pvc, "Normal", "ProvisioningSucceeded", f"Successfully provisioned volume {pv_name}"
        )
        await self._release_sources(pvc)

    async def _finish_orphan(self, key: str) -> None:
        """The claim went while CreateVolume was in progress: get the final answer, delete what it made."""
        req = self.in_progress.get(key)
        if req is None:
            return
        try:
            vol = await self.driver.create_volume(
                req.name,
                required_bytes=req.required_bytes,
                limit_bytes=req.limit_bytes,
                capabilities=list(req.capabilities),
                parameters=req.parameters,
                secrets=req.secrets,
                source=req.source,
                topology=req.topology,
            )
        except CSICallError as e:
            if e.code in NON_FINAL_CODES:
                raise
            self._settled(key)
            return
        if self.pvs.get(req.name) is None:
            await self.driver.delete_volume(vol.volume_id, req.secrets)
        self._settled(key)

    # ----------------------------------------------------------- volume sync

    def _mine(self, pv: Obj) -> bool:
        if ((pv.get("spec") or {}).get("csi") or {}).get("driver") != self.driver_name:
            return False
        if k.annotations_of(pv).get(ANN_PROVISIONED_BY) != self.driver_name:
            return False
        if self.node_name is not None:
            return self.node_topology is not None and affinity_matches(
                pv, {**self.node_topology, HOSTNAME_LABEL: self.node_name}
            )
        return True

    async def sync_volume(self, name: str) -> None:
        pv = self.pvs.get(name)
        if pv is None or not self._mine(pv):
            return
        spec = pv.get("spec") or {}
        phase = (pv.get("status") or {}).get("phase")
        policy = spec.get("persistentVolumeReclaimPolicy")
        if policy != "Delete":
            if k.is_deleting(pv) and PV_FINALIZER in k.finalizers_of(pv):
                patch = set_finalizers_patch(pv, remove={PV_FINALIZER})
                if patch is not None:
                    await self._patch(PV, pv, patch)
            return
        if phase != "Released" and not (
            k.is_deleting(pv) and phase in (None, "Pending", "Available", "Failed")
        ):
            return
        await self._delete_volume(pv)

    async def _delete_volume(self, pv: Obj) -> None:
        if not self.can_delete:
            return
        ann = k.annotations_of(pv)
        ref = None
        if ann.get(ANN_DELETION_SECRET_NAME) and ann.get(ANN_DELETION_SECRET_NAMESPACE):
            ref = (ann[ANN_DELETION_SECRET_NAME], ann[ANN_DELETION_SECRET_NAMESPACE])
        handle = str(((pv.get("spec") or {}).get("csi") or {}).get("volumeHandle") or "")
        try:
            secrets = await self._secrets(ref)
            await self.driver.delete_volume(handle, secrets)
        except (CSICallError, ProvisioningError, ApiError) as e:
            await self.events.event(pv, "Warning", "VolumeFailedDelete", str(e))
            raise
        try:
            patch = set_finalizers_patch(pv, remove={PV_FINALIZER})
            if patch is not None:
                pv = await self._patch(PV, pv, patch)
            if not k.is_deleting(pv):
                await self.api.delete(PV, k.name_of(pv), uid=k.uid_of(pv))
            self.pvs.store_delete(pv)
        except ApiError as e:
            if not k.is_not_found(e):
                raise
