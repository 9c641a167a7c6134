"""The resizer: a PVC asking for more than it has → ControllerExpandVolume → PV and PVC capacity.

What the upstream external-resizer does with RecoverVolumeExpansionFailure
(its `expandAndRecover`), on the same status fields and with the same write
preconditions, so either can take over and neither fights the kubelet:

1. A claim is looked at only while it asks for more than it has
   (`spec.resources.requests.storage` > `status.capacity`).
2. `status.allocatedResourceStatuses.storage` says whose turn it is.
   `NodeResizePending` and `NodeResizeInProgress` belong to the kubelet once
   the PV is as large as the expansion under way (`allocatedResources`): the
   kubelet marks `NodeResizeInProgress`, calls NodeExpandVolume and then
   patches the claim's status with a resourceVersion precondition, so any
   write of ours in between would make that patch fail with 409 and start
   the cycle again (issue #13: NodeResizeInProgress → ControllerResizeInProgress
   → NodeResizePending nine times, a pod waiting 11 minutes).  A larger
   request than the one the node is finishing waits for it.
3. Otherwise the size to expand to is chosen so a started expansion is
   finished, never shrunk: `allocatedResources` while the controller or the
   node may still be at it (`ControllerResizeInProgress` after an error that
   is not final, `NodeResizeInfeasible`), the request after a final error
   (`ControllerResizeInfeasible`, or a final error this process saw) -- the
   only moment the user may lower the request to recover, to a size still
   above `status.capacity` (the API server refuses anything lower).
4. The claim is marked first -- `allocatedResources.storage`, status
   `ControllerResizeInProgress`, condition `Resizing` -- unless it already
   records that very size (a retry: the status is not rewritten, so an
   Infeasible claim stays so while the driver keeps refusing).  Then
   ControllerExpandVolume (with the PV's `controllerExpandSecretRef`) and the
   PV's `spec.capacity`.
5. Done: `status.capacity`, the storage status and our conditions cleared and
   the `volume.kubernetes.io/node-expansion-not-required` annotation set (a
   ReadWriteMany volume is then not grown again by each node's kubelet); or,
   when the node must grow the filesystem, `NodeResizePending` with the
   `FileSystemResizePending` condition for the kubelet.

Writes 1, 4 and 5 carry the resourceVersion the decision was made on (a 409
sends the claim back to the queue, to be judged again on what the kubelet
wrote).  A failure is recorded without that precondition, so it lands even on
a newer claim: a final error with InvalidArgument, OutOfRange or NotFound
marks `ControllerResizeInfeasible`, any other final error adds only the
`ControllerResizeError` condition, and an error after which the expansion
may still be running on the storage writes nothing.  Upstream also holds an
Infeasible claim back for a while before retrying the same size; here the
work queue's backoff (up to `max_delay`) paces those retries.
Drivers without the controller EXPAND_VOLUME capability get the "trivial"
resizer, as upstream: no CSI call, the PV grows, the node does the work.
Per-node mode (`node_topology`, not in upstream) handles only PVs whose node
affinity matches this node: a node-local backend can only grow its own
volumes, so each node's process resizes what lives there.

For a driver with MODIFY_VOLUME the same loop also applies
VolumeAttributesClass changes (`csi_kit.k8s.volume.modifier`, upstream's modify
controller): its own queue, the class informer, these claim and PV
informers, this Lease, and the same choice of claims (`volume_of`).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, Unpack

import grpc

from csi_kit.k8s.objects.meta import spec_of, status_of
from csi_kit.k8s.objects.names import sanitize_lease_name
from csi_kit.k8s.objects.quantity import format_quantity, storage_of
from csi_kit.k8s.objects.resources import PV, PVC
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.context import LoopContext, Planned
from csi_kit.k8s.runtime.csi import NON_FINAL_CODES, Capability, CSICallError, DriverInfo
from csi_kit.k8s.runtime.events import EventRecorder
from csi_kit.k8s.volume.base import LoopArgs, VolumeLoop
from csi_kit.k8s.volume.modifier import ModifyDriver, VolumeModifier
from csi_kit.k8s.volume.protocol import (
    ANN_NODE_EXPANSION_NOT_REQUIRED,
    ANN_STORAGE_RESIZER,
    HOSTNAME_LABEL,
    affinity_matches,
    claim_key_of,
    is_driver_volume,
    merge_claim_conditions,
    pv_capability,
    volume_handle,
    volume_name_of,
)
from csi_kit.k8s.volume.protocol import claim_condition as _condition
from csi_kit.k8s.volume.protocol import has_claim_condition as _has_condition

log = logging.getLogger(__name__)

IN_PROGRESS = "ControllerResizeInProgress"
INFEASIBLE = "ControllerResizeInfeasible"
NODE_PENDING = "NodeResizePending"
NODE_IN_PROGRESS = "NodeResizeInProgress"
NODE_INFEASIBLE = "NodeResizeInfeasible"
COND_RESIZING = "Resizing"
COND_FS_PENDING = "FileSystemResizePending"
COND_ERROR = "ControllerResizeError"
COND_NODE_ERROR = "NodeResizeError"
FS_PENDING_MESSAGE = "Waiting for user to (re-)start a pod to finish file system resize of volume on node."
#: The resize conditions (upstream's knownResizeConditions); any other condition is left as it is.
RESIZE_CONDITIONS = {COND_RESIZING, COND_FS_PENDING, COND_ERROR, COND_NODE_ERROR}
#: ControllerExpandVolume errors that make the requested size infeasible (upstream's IsResizeInfeasibleError).
INFEASIBLE_CODES = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND}
)


class ExpandDriver(Protocol):
    async def expand_volume(
        self, volume_id: str, required_bytes: int, capability: Capability | None, secrets: dict[str, str]
    ) -> tuple[int, bool]: ...


class ResizerDriver(ExpandDriver, ModifyDriver, Protocol):
    """The CSI calls of the resizer loop: expansion, and modification for MODIFY_VOLUME drivers."""


def _conditions(pvc: Obj, *new: dict[str, Any], keep_old: bool = False) -> list[dict[str, Any]]:
    """The claim's conditions with `new` merged in; only resize conditions are touched."""
    return merge_claim_conditions(pvc, new, RESIZE_CONDITIONS, keep_old=keep_old)


def _storage_status(pvc: Obj, value: str | None) -> dict[str, Any] | None:
    """Merge patch of `allocatedResourceStatuses` setting the storage entry to `value`.

    None removes the entry, and the whole map when nothing else is left in
    it, as upstream leaves no empty map behind.
    """
    if value is not None:
        return {"storage": value}
    others = set((pvc.get("status") or {}).get("allocatedResourceStatuses") or {}) - {"storage"}
    return {"storage": None} if others else None


def _expand_secret_ref(pv: Obj) -> tuple[str, str] | None:
    ref = (spec_of(pv).get("csi") or {}).get("controllerExpandSecretRef")
    return (str(ref.get("name")), str(ref.get("namespace"))) if ref else None


def event_source(driver: str) -> str:
    """The component this loop's Events name as their source, as upstream's resizer does."""
    return f"{driver}_csi-kit-resizer"


class Resizer(VolumeLoop[ResizerDriver]):
    name = "resizer"

    def __init__(
        self,
        api: KubeAPI,
        driver: ResizerDriver,
        info: DriverInfo,
        *,
        node_topology: dict[str, str] | None = None,
        events: bool | EventRecorder = True,
        resync_period: float = 600.0,
        **loop: Unpack[LoopArgs],
    ) -> None:
        super().__init__(api, driver, info, **loop)
        self.node_topology = node_topology
        self.trivial = not self.controller_can("EXPAND_VOLUME")
        self.multi_writer = self.controller_can("SINGLE_NODE_MULTI_WRITER")
        self.events = self.recorder(events, event_source(self.driver_name))
        # Claims whose last ControllerExpandVolume ended with a final error: their
        # ControllerResizeInProgress is then no expansion under way (upstream's finalErrorPVCs).
        self.final_errors: set[str] = set()
        self.pvcs = self.informer(api, PVC, resync_period=resync_period)
        self.pvs = self.informer(api, PV)
        self.claim_queue = self.queue("claim", self.sync_claim)
        self.pvcs.add_handler(self._on_claim)
        self.pvs.add_handler(self._on_volume)
        # VolumeAttributesClass changes, in this loop as in upstream's external-resizer.
        self.modifier: VolumeModifier | None = None
        if self.controller_can("MODIFY_VOLUME"):
            self.modifier = VolumeModifier(self, driver, self.driver_name)

    def _on_claim(self, event: str, old: Obj | None, new: Obj | None) -> None:
        if event != "DELETED" and new is not None:
            self.claim_queue.add(k.key_of(new))

    def _on_volume(self, event: str, old: Obj | None, new: Obj | None) -> None:
        claim = claim_key_of(new or old or {})
        if event == "ADDED" and claim is not None:
            self.claim_queue.add(claim)

    async def patch_status(
        self, pvc: Obj, status: Obj, *, checked: bool = True, annotations: Obj | None = None
    ) -> Obj:
        """Merge-patch the claim's status; `checked` adds the resourceVersion precondition (409 if stale).

        `annotations` go in the same write: a PVC's status subresource takes
        metadata changes (only the spec is reset), as upstream relies on.
        """
        meta: Obj = {}
        if checked:
            meta["resourceVersion"] = k.rv_of(pvc)
        if annotations:
            meta["annotations"] = annotations
        body: Obj = {"status": status}
        if meta:
            body["metadata"] = meta
        updated = await self.api.patch(PVC, k.name_of(pvc), body, k.namespace_of(pvc), status=True)
        self.pvcs.store_update(updated)
        return updated

    def _capability(self, pv: Obj) -> Capability | None:
        try:
            return pv_capability(spec_of(pv), multi_writer=self.multi_writer)
        except ValueError:
            return None

    def _resizes(self, pv: Obj, pvc: Obj) -> bool:
        """Whether the claim's PV is this loop's to resize (driver, binding, node, resizer annotation)."""
        if not is_driver_volume(pv, self.driver_name):
            return False
        if (spec_of(pv).get("claimRef") or {}).get("uid") != k.uid_of(pvc):
            return False
        if self.node_topology is not None and not affinity_matches(pv, self.node_topology):
            return False  # per-node mode: a node-local volume is grown by the node that has it
        resizer = k.annotations_of(pvc).get(ANN_STORAGE_RESIZER)
        return resizer is None or resizer == self.driver_name

    def volume_of(self, pvc: Obj) -> Obj | None:
        """The PV of a Bound claim this loop resizes (and modifies), else None."""
        if not volume_name_of(pvc) or status_of(pvc).get("phase") != "Bound":
            return None
        pv = self.pvs.get(volume_name_of(pvc))
        return pv if pv is not None and self._resizes(pv, pvc) else None

    async def sync_claim(self, key: str) -> None:
        pvc = self.pvcs.get(key)
        if pvc is None or k.is_deleting(pvc):
            return
        pv = self.volume_of(pvc)
        if pv is None:
            return
        try:
            requested = storage_of(pvc, "spec", "resources", "requests")
            capacity = storage_of(pvc, "status", "capacity") or 0
            allocated = storage_of(pvc, "status", "allocatedResources")
            pv_size = storage_of(pv, "spec", "capacity") or 0
        except ValueError as e:
            await self.events.event(pvc, "Warning", "VolumeResizeFailed", str(e))
            return
        if requested is None or requested <= capacity:
            return
        target = self._target(key, pvc, requested, allocated, pv_size)
        if target is not None:
            await self._expand(key, pvc, pv, target, allocated)

    def _target(
        self, key: str, pvc: Obj, requested: int, allocated: int | None, pv_size: int
    ) -> int | None:  # fmt: skip
        """The size to expand to now, or None while the claim is the kubelet's (expandAndRecover)."""
        phase = (status_of(pvc).get("allocatedResourceStatuses") or {}).get("storage")
        started = allocated if allocated is not None else requested  # the expansion under way, if any
        if pv_size < requested:
            return self._controller_target(key, phase, started, requested, allocated, pv_size)
        return self._grown_target(pvc, phase, started, requested, allocated)

    def _controller_target(
        self, key: str, phase: str | None, started: int, requested: int, allocated: int | None, pv_size: int
    ) -> int | None:
        """The PV needs a controller expansion; one already under way is finished first."""
        if phase in (NODE_PENDING, NODE_IN_PROGRESS):
            if allocated is not None and pv_size >= allocated:
                return None  # the node is finishing the previous size; a larger request waits for it
            return started
        if phase == NODE_INFEASIBLE or (phase == IN_PROGRESS and key not in self.final_errors):
            return started
        return requested  # no expansion under way, or the last one ended with a final error

    def _grown_target(
        self, pvc: Obj, phase: str | None, started: int, requested: int, allocated: int | None
    ) -> int | None:
        """The PV is already as large as asked."""
        if phase in (NODE_PENDING, NODE_IN_PROGRESS):
            return None  # the kubelet's turn: it grows the filesystem and records the capacity
        if phase == NODE_INFEASIBLE:
            # Node expansion failed for good: redo the controller side so the kubelet may retry.
            return allocated if allocated is not None and not self.trivial else requested
        if phase in (IN_PROGRESS, INFEASIBLE) or (not phase and allocated is not None):
            # Expanded but not recorded (a restart, a lost write): finish at the size started with.
            return started
        if _has_condition(pvc, COND_FS_PENDING):
            return None  # a claim from a resizer that kept no status: the kubelet has it
        return requested

    async def _expand(self, key: str, pvc: Obj, pv: Obj, target: int, allocated: int | None) -> None:
        if allocated == target:
            # A retry at the size already recorded: the status stays as it is (an Infeasible claim
            # stays Infeasible until the driver answers otherwise); only Resizing is made sure of.
            if not _has_condition(pvc, COND_RESIZING):
                pvc = await self.patch_status(
                    pvc, {"conditions": _conditions(pvc, _condition(COND_RESIZING), keep_old=True)}
                )
        else:
            pvc = await self.patch_status(
                pvc,
                {
                    "allocatedResources": {"storage": format_quantity(target)},
                    "allocatedResourceStatuses": _storage_status(pvc, IN_PROGRESS),
                    "conditions": _conditions(pvc, _condition(COND_RESIZING)),
                },
                annotations=self._without_not_required(pvc),
            )
        await self.events.event(
            pvc, "Normal", "Resizing", f"External resizer is resizing volume {k.name_of(pv)}"
        )
        handle = volume_handle(pv)
        if self.trivial:
            new_size, node_needed = target, True
        else:
            try:
                new_size, node_needed = await self.driver.expand_volume(
                    handle, target, self._capability(pv), await self.read_secret(_expand_secret_ref(pv))
                )
            except CSICallError as e:
                await self._record_failure(key, pvc, pv, e)
                raise
            new_size = new_size or target
        self.final_errors.discard(key)
        if (storage_of(pv, "spec", "capacity") or 0) < new_size:
            updated = await self.api.patch(
                PV, k.name_of(pv), {"spec": {"capacity": {"storage": format_quantity(new_size)}}}
            )
            self.pvs.store_update(updated)
        if node_needed:
            await self.patch_status(
                pvc,
                {
                    "allocatedResourceStatuses": _storage_status(pvc, NODE_PENDING),
                    "conditions": _conditions(
                        pvc, _condition(COND_FS_PENDING, FS_PENDING_MESSAGE), keep_old=True
                    ),
                },
                annotations=self._without_not_required(pvc),
            )
            await self.events.event(
                pvc, "Normal", "FileSystemResizeRequired", "Require file system resize of volume on node"
            )
            return
        await self.patch_status(
            pvc,
            {
                "capacity": {"storage": format_quantity(new_size)},
                "allocatedResourceStatuses": _storage_status(pvc, None),
                "conditions": _conditions(pvc) or None,
            },
            annotations={ANN_NODE_EXPANSION_NOT_REQUIRED: "true"},
        )
        await self.events.event(
            pvc, "Normal", "VolumeResizeSuccessful", f"Resize volume succeeded for volume {k.name_of(pv)}"
        )

    @staticmethod
    def _without_not_required(pvc: Obj) -> Obj | None:
        """The annotation patch that takes node-expansion-not-required away, if the claim has it."""
        if ANN_NODE_EXPANSION_NOT_REQUIRED in k.annotations_of(pvc):
            return {ANN_NODE_EXPANSION_NOT_REQUIRED: None}
        return None

    async def _record_failure(self, key: str, pvc: Obj, pv: Obj, e: CSICallError) -> None:
        """Record a ControllerExpandVolume error the way upstream does (no resourceVersion check)."""
        msg = f"resize volume {k.name_of(pv)} failed: {e}"
        await self.events.event(pvc, "Warning", "VolumeResizeFailed", msg)
        if e.code in NON_FINAL_CODES:
            # The expansion may still be running on the storage: nothing changes, it is asked again.
            self.final_errors.discard(key)
            return
        self.final_errors.add(key)
        status: Obj = {
            "conditions": _conditions(
                pvc, _condition(COND_ERROR, f"failed to expand pvc with {e}"), keep_old=True
            )
        }
        if e.code in INFEASIBLE_CODES:
            status["allocatedResourceStatuses"] = _storage_status(pvc, INFEASIBLE)
        try:
            await self.patch_status(pvc, status, checked=False)
        except ApiError as pe:
            log.info("cannot record resize failure on %s: %s", k.key_of(pvc), pe)


# ---------------------------------------------------------------------- wiring
# The loop's factory, listed in k8s/registry.py; kept by the wiring (the module's owner works above).


async def build(ctx: LoopContext) -> list[Planned]:
    """The resizer (with the modifier): elected as upstream's, or one per node with --node-deployment."""
    if "CONTROLLER_SERVICE" not in ctx.info.plugin_capabilities:
        return []
    node = await ctx.node()
    loop = Resizer(
        ctx.clients.api_for("resizer"),
        ctx.csi,
        ctx.info,
        informers=ctx.clients.informers,
        # The node's labels as a PV's node affinity may name them (ours add the hostname).
        node_topology=None if node is None else {**node[1], HOSTNAME_LABEL: node[0]},
        events=ctx.clients.recorder(event_source(ctx.info.name)),
        workers=ctx.args.k8s_workers,
        **ctx.timing,
    )
    return [Planned(loop, None if node else "external-resizer-" + sanitize_lease_name(ctx.info.name))]
