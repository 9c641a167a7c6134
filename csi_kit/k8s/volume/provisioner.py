"""The provisioner: PersistentVolumeClaim → CreateVolume → PersistentVolume, and back.

What the upstream external-provisioner does for one driver, with its object
protocol byte for byte (`volume.protocol`) so either can take over the
other's objects:

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
* Data sources (restore from a VolumeSnapshot, clone from a claim, their
  protection finalizers, cross-namespace sources with a ReferenceGrant) are
  `volume.datasource`'s; the PV it writes is `volume.pv`'s.  Binding is the
  PV controller's job.
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

import logging
import time
import uuid
from typing import Protocol, Unpack

import attrs

from csi_kit.k8s.objects.meta import set_finalizers_patch, spec_of, status_of
from csi_kit.k8s.objects.names import sanitize_lease_name
from csi_kit.k8s.objects.quantity import storage_of
from csi_kit.k8s.objects.resources import CSI_NODE, NODE, PV, PVC, STORAGE_CLASS
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.context import LoopContext, Planned
from csi_kit.k8s.runtime.controller import Retry
from csi_kit.k8s.runtime.csi import (
    NON_FINAL_CODES,
    Capability,
    CreatedVolume,
    CSICallError,
    DriverInfo,
    TopologyRequirement,
)
from csi_kit.k8s.runtime.events import EventRecorder
from csi_kit.k8s.volume.base import LoopArgs, VolumeLoop
from csi_kit.k8s.volume.datasource import DataSources, SourceRef
from csi_kit.k8s.volume.protocol import (
    ANN_PROVISIONED_BY,
    ANN_SELECTED_NODE,
    FSTYPE_KEY,
    HOSTNAME_LABEL,
    META_PV_NAME,
    META_PVC_NAME,
    META_PVC_NAMESPACE,
    PV_FINALIZER,
    ProvisioningError,
    affinity_matches,
    allowed_topologies,
    capabilities_for,
    claim_key_of,
    claims_driver,
    class_parameters,
    deletion_secret_ref,
    driver_parameters,
    is_driver_volume,
    is_late_binding,
    pv_name_for,
    pv_secret_refs,
    pvc_data_source,
    secret_ref,
    source_kind,
    source_ref,
    topology_keys,
    volume_handle,
    volume_name_of,
    within,
)
from csi_kit.k8s.volume.pv import PVMaker

log = logging.getLogger(__name__)


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
    source_ref: SourceRef | None = None  # (kind, namespace, name) of the claim's data source


#: PV phases in which a PV object being deleted may still have its volume deleted first.
_UNBOUND_PHASES = (None, "Pending", "Available", "Failed")


def _sizes(pvc: Obj) -> tuple[int, int]:
    """(required, limit) bytes the claim asks for (limit 0: none)."""
    try:
        required = storage_of(pvc, "spec", "resources", "requests")
        limit = storage_of(pvc, "spec", "resources", "limits") or 0
    except ValueError as e:
        raise ProvisioningError(str(e)) from None
    if required is None:
        raise ProvisioningError("the claim requests no storage")
    if limit and limit < required:
        raise ProvisioningError(f"storage limit {limit} is below the request {required}")
    return required, limit


def event_source(driver: str) -> str:
    """The component this loop's Events name as their source, as upstream's provisioner does."""
    return f"{driver}_csi-kit-provisioner"


class Provisioner(VolumeLoop[VolumeDriver]):
    name = "provisioner"

    def __init__(
        self,
        api: KubeAPI,
        driver: VolumeDriver,
        info: DriverInfo,
        *,
        node_name: str | None = None,
        node_topology: dict[str, str] | None = None,
        immediate_binding: bool = True,
        extra_create_metadata: bool = False,
        volume_name_prefix: str = "pvc",
        volume_name_uuid_length: int = -1,
        default_fstype: str = "",
        cross_namespace: bool = False,
        events: bool | EventRecorder = True,
        resync_period: float = 900.0,
        **loop: Unpack[LoopArgs],
    ) -> None:
        super().__init__(api, driver, info, **loop)
        self.topology_aware = "VOLUME_ACCESSIBILITY_CONSTRAINTS" in info.plugin_capabilities
        self.multi_writer = self.controller_can("SINGLE_NODE_MULTI_WRITER")
        self.can_delete = self.controller_can("CREATE_DELETE_VOLUME")
        self.node_name = node_name
        self.node_topology = node_topology
        self.immediate_binding = immediate_binding
        self.extra_create_metadata = extra_create_metadata
        self.volume_name_prefix = volume_name_prefix
        self.volume_name_uuid_length = volume_name_uuid_length
        self.default_fstype = default_fstype
        self.cross_namespace = cross_namespace
        self.identity = f"{int(time.time() * 1000)}-{uuid.uuid4().int % 10000}-{self.driver_name}"
        self.pv_maker = PVMaker(
            driver=self.driver_name,
            identity=self.identity,
            default_fstype=default_fstype,
            topology_aware=self.topology_aware,
            node_name=node_name,
            node_topology=node_topology,
        )
        self.events = self.recorder(events, event_source(self.driver_name))
        self.pvcs = self.informer(api, PVC, resync_period=resync_period)
        self.pvs = self.informer(api, PV, resync_period=resync_period)
        self.classes = self.informer(api, STORAGE_CLASS)
        self.claim_queue = self.queue("claim", self.sync_claim)
        self.volume_queue = self.queue("volume", self.sync_volume)
        self.sources = DataSources(self)
        self.pvcs.add_handler(self._on_claim)
        self.pvs.add_handler(self._on_volume)
        self.classes.add_handler(self._on_class)
        # Claims whose CreateVolume may still be running on the storage side.
        self.in_progress: dict[str, CreateRequest] = {}

    # ------------------------------------------------------------ event routing

    def _on_claim(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        key = k.key_of(obj)
        if event == "DELETED":
            if key in self.in_progress:
                self.claim_queue.add(key)  # finish the create, then delete what it made
            self.sources.requeue(source_ref(obj))  # it may no longer be needed, provisioned or not
            return
        self.claim_queue.add(key)

    def _on_volume(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        if event != "DELETED" and is_driver_volume(obj, self.driver_name):
            self.volume_queue.add(k.name_of(obj))
        claim = claim_key_of(obj)
        if event == "ADDED" and claim is not None:
            self.claim_queue.add(claim)  # a new PV may finish a clone/restore: its claim releases the source

    def _on_class(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        if event not in ("ADDED", "MODIFIED") or obj is None or obj.get("provisioner") != self.driver_name:
            return
        for pvc in self.pvcs.items():
            if spec_of(pvc).get("storageClassName") == k.name_of(obj) and not volume_name_of(pvc):
                self.claim_queue.add(k.key_of(pvc))

    # ---------------------------------------------------------------- helpers

    def pv_name(self, pvc: Obj) -> str:
        return pv_name_for(pvc, self.volume_name_prefix, self.volume_name_uuid_length)

    def creating(self, key: str) -> bool:
        """Whether CreateVolume for claim `key` may still be running."""
        return key in self.in_progress

    def creating_from(self, ref: SourceRef, *, besides: str | None = None) -> bool:
        """Whether a CreateVolume from source `ref` may still be running (for a claim but `besides`)."""
        return any(key != besides and r.source_ref == ref for key, r in self.in_progress.items())

    async def _secrets(self, ref: tuple[str, str] | None) -> dict[str, str]:
        try:
            return await self.read_secret(ref)
        except ValueError as e:
            raise ProvisioningError(str(e)) from None
        except ApiError as e:
            if ref is not None and k.is_not_found(e):
                raise ProvisioningError(f"secret {ref[1]}/{ref[0]} not found") from None
            raise

    async def patch(self, res: k.Resource, obj: Obj, patch: Obj) -> Obj:
        """Merge-patch a claim or PV and keep the cache up to date with the answer."""
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
        await self.sources.release(pvc)
        cls = await self._class_to_provision(pvc)
        if cls is None:
            return
        placed = await self._placement(pvc, cls)
        if placed is not None:
            await self._provision(key, *placed, cls)

    def _should_provision(self, pvc: Obj) -> bool:
        if volume_name_of(pvc) or k.is_deleting(pvc) or not claims_driver(pvc, self.driver_name):
            return False
        ds = pvc_data_source(pvc)
        # A claim for a volume populator is the populator's to fill.
        return not (ds and source_kind(ds) is None)

    async def _class_to_provision(self, pvc: Obj) -> Obj | None:
        """The claim's StorageClass if the claim is ours to provision, else None (Retry: no class yet)."""
        if not self._should_provision(pvc):
            return None
        cls = self.classes.get(str(spec_of(pvc).get("storageClassName") or ""))
        if cls is None:
            msg = f'storageclass.storage.k8s.io "{spec_of(pvc).get("storageClassName")}" not found'
            await self._fail(pvc, msg)
            raise Retry(msg)
        return cls if cls.get("provisioner") == self.driver_name else None

    async def _placement(self, pvc: Obj, cls: Obj) -> tuple[Obj, str | None] | None:
        """(claim, selected node) when the claim is to be provisioned by this process now, else None."""
        selected = k.annotations_of(pvc).get(ANN_SELECTED_NODE)
        late = is_late_binding(cls)
        if self.node_name is None:
            return None if late and not selected else (pvc, selected)  # late: the scheduler picks first
        if selected is None and not late and self.immediate_binding:
            claimed = await self._claim_for_this_node(pvc)
            return None if claimed is None else (claimed, self.node_name)
        return (pvc, selected) if selected == self.node_name else None

    async def _claim_for_this_node(self, pvc: Obj) -> Obj | None:
        """Per-node, Immediate binding: race the other nodes for the claim with an optimistic write."""
        try:
            return await self.patch(
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

    async def _provision(self, key: str, pvc: Obj, selected: str | None, cls: Obj) -> None:
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
        if created is not None:
            await self._save_pv(pvc, cls, pv_name, created, request)

    def _capabilities(self, pvc: Obj, cls: Obj, fs_type: str) -> list[Capability]:
        spec = spec_of(pvc)
        try:
            return capabilities_for(
                list(spec.get("accessModes") or []),
                block=spec.get("volumeMode") == "Block",
                fs_type=fs_type,
                mount_flags=list(cls.get("mountOptions") or []),
                single_node_multi_writer=self.multi_writer,
            )
        except ValueError as e:
            raise ProvisioningError(str(e)) from None

    def _parameters(self, params_in: dict[str, str], pvc: Obj, pv_name: str) -> dict[str, str]:
        params = driver_parameters(params_in)
        if self.extra_create_metadata:
            params[META_PVC_NAME] = k.name_of(pvc)
            params[META_PVC_NAMESPACE] = str(k.namespace_of(pvc))
            params[META_PV_NAME] = pv_name
        return params

    async def _build_request(
        self, pvc: Obj, cls: Obj, pv_name: str, selected: str | None
    ) -> CreateRequest | None:
        """The CreateVolume request for the claim; None when a populator, not the driver, fills it."""
        required, limit = _sizes(pvc)
        params_in = class_parameters(cls)
        params = self._parameters(params_in, pvc, pv_name)
        caps = self._capabilities(pvc, cls, params_in.get(FSTYPE_KEY, self.default_fstype))
        source = await self.sources.content_source(pvc, required)
        if isinstance(source, bool):
            return None
        pv_secret_refs(params_in, pv_name, pvc)  # refuse bad templates before any volume exists
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
            source_ref=source_ref(pvc),
        )

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
        keys = topology_keys(csinode, self.driver_name)
        if not keys:
            raise ProvisioningError(f"driver {self.driver_name} is not registered on node {node_name!r}")
        labels = k.labels_of(node)
        missing = [key for key in keys if key not in labels]
        if missing:
            raise ProvisioningError(f"node {node_name!r} lacks topology labels {missing}")
        return {key: labels[key] for key in keys}

    async def _topology(self, cls: Obj, selected: str | None) -> TopologyRequirement | None:
        allowed = allowed_topologies(cls)
        if selected:
            mine = await self._node_segment(selected)
            if not within(mine, allowed):
                raise ProvisioningError(
                    f"selected node {selected!r} is outside the class's allowedTopologies"
                )
            return TopologyRequirement((mine,), (mine,))
        return TopologyRequirement(tuple(allowed), tuple(allowed)) if allowed else None

    # ------------------------------------------------------------ create/save

    async def _call_create(self, req: CreateRequest) -> CreatedVolume:
        return await self.driver.create_volume(
            req.name,
            required_bytes=req.required_bytes,
            limit_bytes=req.limit_bytes,
            capabilities=list(req.capabilities),
            parameters=req.parameters,
            secrets=req.secrets,
            source=req.source,
            topology=req.topology,
        )

    async def _create(
        self, key: str, pvc: Obj, req: CreateRequest, *, reschedulable: bool
    ) -> CreatedVolume | None:
        self.in_progress[key] = req
        try:
            created = await self._call_create(req)
        except CSICallError as e:
            if e.code.name == "RESOURCE_EXHAUSTED" and reschedulable:
                self._settled(key)
                await self._fail(pvc, f"failed to provision volume: {e}; rescheduling")
                await self._reschedule(pvc)
                return None
            if e.code not in NON_FINAL_CODES:
                self._settled(key)
            await self._fail(pvc, f"failed to provision volume with StorageClass: {e}")
            raise
        self._settled(key)
        return created

    def _settled(self, key: str) -> None:
        """CreateVolume for `key` has a final answer: its source may be released now."""
        req = self.in_progress.pop(key, None)
        if req is not None:
            self.sources.requeue(req.source_ref)

    async def _reschedule(self, pvc: Obj) -> None:
        """Give the scheduler the claim back: without a selected node it picks one again."""
        if ANN_SELECTED_NODE not in k.annotations_of(pvc):
            return
        try:
            await self.patch(PVC, pvc, {"metadata": {"annotations": {ANN_SELECTED_NODE: None}}})
        except ApiError as e:
            if not k.is_not_found(e):
                raise

    async def _save_pv(
        self, pvc: Obj, cls: Obj, pv_name: str, vol: CreatedVolume, req: CreateRequest
    ) -> None:
        pv = self.pv_maker.pv(pvc, cls, pv_name, vol, req.required_bytes)
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
        await self.sources.release(pvc)

    async def _finish_orphan(self, key: str) -> None:
        """The claim went while CreateVolume was in progress: get the final answer, delete what it made."""
        req = self.in_progress.get(key)
        if req is None:
            return
        try:
            vol = await self._call_create(req)
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
        if not is_driver_volume(pv, self.driver_name):
            return False
        if k.annotations_of(pv).get(ANN_PROVISIONED_BY) != self.driver_name:
            return False
        if self.node_name is None:
            return True
        return self.node_topology is not None and affinity_matches(
            pv, {**self.node_topology, HOSTNAME_LABEL: self.node_name}
        )

    async def sync_volume(self, name: str) -> None:
        pv = self.pvs.get(name)
        if pv is None or not self._mine(pv):
            return
        if spec_of(pv).get("persistentVolumeReclaimPolicy") != "Delete":
            if k.is_deleting(pv):
                await self._drop_finalizer(pv)  # Retain: the volume stays, the PV object may go
            return
        phase = status_of(pv).get("phase")
        if phase == "Released" or (k.is_deleting(pv) and phase in _UNBOUND_PHASES):
            await self._delete_volume(pv)

    async def _drop_finalizer(self, pv: Obj) -> Obj:
        patch = set_finalizers_patch(pv, remove={PV_FINALIZER})
        return pv if patch is None else await self.patch(PV, pv, patch)

    async def _delete_volume(self, pv: Obj) -> None:
        if not self.can_delete:
            return
        try:
            secrets = await self._secrets(deletion_secret_ref(pv))
            await self.driver.delete_volume(volume_handle(pv), secrets)
        except (CSICallError, ProvisioningError, ApiError) as e:
            await self.events.event(pv, "Warning", "VolumeFailedDelete", str(e))
            raise
        try:
            pv = await self._drop_finalizer(pv)
            if not k.is_deleting(pv):
                await self.api.delete(PV, k.name_of(pv), uid=k.uid_of(pv))
            self.pvs.store_delete(pv)
        except ApiError as e:
            if not k.is_not_found(e):
                raise


# ---------------------------------------------------------------------- wiring
# The loop's factory, listed in k8s/registry.py; kept by the wiring (the module's owner works above).


async def build(ctx: LoopContext) -> list[Planned]:
    """The provisioner: elected under upstream's Lease name, or one per node with --node-deployment."""
    a, info = ctx.args, ctx.info
    node = await ctx.node()
    if "CREATE_DELETE_VOLUME" not in info.controller_capabilities:
        log.warning("driver %s does not offer CREATE_DELETE_VOLUME: no provisioner", info.name)
        return []
    loop = Provisioner(
        ctx.clients.api_for("provisioner"),
        ctx.csi,
        info,
        informers=ctx.clients.informers,
        node_name=None if node is None else node[0],
        node_topology=None if node is None else node[1],
        immediate_binding=a.immediate_binding,
        extra_create_metadata=a.extra_create_metadata,
        volume_name_prefix=a.volume_name_prefix,
        volume_name_uuid_length=a.volume_name_uuid_length,
        default_fstype=a.default_fstype,
        cross_namespace=a.cross_namespace_data_sources,
        events=ctx.clients.recorder(event_source(info.name)),
        workers=a.k8s_workers,
        resync_period=a.resync_period,
        **ctx.timing,
    )
    return [Planned(loop, None if node else sanitize_lease_name(info.name))]
