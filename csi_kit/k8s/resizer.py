"""The resizer: a PVC asking for more than it has → ControllerExpandVolume → PV and PVC capacity.

What the upstream external-resizer does (with RecoverVolumeExpansionFailure),
for one driver, on the same status fields so either can take over:

1. The PVC's status is marked first -- `allocatedResources.storage` = the
   target, `allocatedResourceStatuses.storage` = `ControllerResizeInProgress`,
   condition `Resizing` -- so a restart (or a new leader) knows an expansion to
   that size was started and must be finished, even if the user meanwhile
   lowered the request: a running expansion may already have happened.
2. ControllerExpandVolume (with the PV's `controllerExpandSecretRef`), then
   the PV's `spec.capacity`.
3. Done: `status.capacity` and the markers cleared; or, when the driver needs
   the node to grow the filesystem, `NodeResizePending` and the
   `FileSystemResizePending` condition for the kubelet.

A final error marks `ControllerResizeInfeasible` (with a
`ControllerResizeError` condition); then, and only then, the user may lower
the request -- to a size above the current capacity to try again smaller, or
back to the current capacity to give up -- the upstream recovery protocol.
Drivers without the controller EXPAND_VOLUME capability get the "trivial"
resizer, as upstream: no CSI call, the PV grows, the node does the work.
Per-node mode (`node_topology`, not in upstream) handles only PVs whose node
affinity matches this node: a node-local backend can only grow its own
volumes, so each node's process resizes what lives there.
"""

from __future__ import annotations

import base64
import datetime
import logging
from typing import Any, Protocol

from csi_kit.k8s import api as k
from csi_kit.k8s.api import PV, PVC, SECRET, ApiError, KubeAPI, Obj
from csi_kit.k8s.csi_client import NON_FINAL_CODES, CSIError, DriverInfo
from csi_kit.k8s.informer import Informer
from csi_kit.k8s.loop import Loop
from csi_kit.k8s.provisioner import affinity_matches
from csi_kit.k8s.volumes import Capability, EventRecorder, capabilities_for, format_quantity, storage_of

log = logging.getLogger(__name__)

ANN_STORAGE_RESIZER = "volume.kubernetes.io/storage-resizer"
IN_PROGRESS = "ControllerResizeInProgress"
INFEASIBLE = "ControllerResizeInfeasible"
NODE_PENDING = "NodeResizePending"
COND_RESIZING = "Resizing"
COND_FS_PENDING = "FileSystemResizePending"
COND_ERROR = "ControllerResizeError"
FS_PENDING_MESSAGE = "Waiting for user to (re-)start a pod to finish file system resize of volume on node."
OUR_CONDITIONS = {COND_RESIZING, COND_FS_PENDING, COND_ERROR}


class ExpandDriver(Protocol):
    async def expand_volume(
        self, volume_id: str, required_bytes: int, capability: Capability | None, secrets: dict[str, str]
    ) -> tuple[int, bool]: ...


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(type_: str, message: str = "") -> dict[str, Any]:
    c: dict[str, Any] = {"type": type_, "status": "True", "lastTransitionTime": _now()}
    if message:
        c["message"] = message
    return c


def _conditions(pvc: Obj, *keep: dict[str, Any]) -> list[dict[str, Any]]:
    others = [
        c for c in (pvc.get("status") or {}).get("conditions") or [] if c.get("type") not in OUR_CONDITIONS
    ]
    return others + list(keep)


class Resizer(Loop):
    name = "resizer"

    def __init__(
        self,
        api: KubeAPI,
        driver: ExpandDriver,
        info: DriverInfo,
        *,
        node_topology: dict[str, str] | None = None,
        events: bool = True,
        workers: int = 10,
        resync_period: float = 600.0,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
    ) -> None:
        super().__init__(workers=workers, base_delay=base_delay, max_delay=max_delay)
        self.api = api
        self.driver = driver
        self.driver_name = info.name
        self.node_topology = node_topology
        self.trivial = "EXPAND_VOLUME" not in info.controller_capabilities
        self.multi_writer = "SINGLE_NODE_MULTI_WRITER" in info.controller_capabilities
        self.events = EventRecorder(api, f"{self.driver_name}_csi-kit-resizer", enabled=events)
        self.pvcs = Informer(api, PVC, resync_period=resync_period)
        self.pvs = Informer(api, PV)
        self.informers = [self.pvcs, self.pvs]
        self.claim_queue = self.queue("claim", self.sync_claim)
        self.pvcs.add_handler(self._on_claim)
        self.pvs.add_handler(self._on_volume)

    def _on_claim(self, event: str, old: Obj | None, new: Obj | None) -> None:
        if event != "DELETED" and new is not None:
            self.claim_queue.add(k.key_of(new))

    def _on_volume(self, event: str, old: Obj | None, new: Obj | None) -> None:
        ref = ((new or old or {}).get("spec") or {}).get("claimRef") or {}
        if event == "ADDED" and ref.get("name"):
            self.claim_queue.add(f"{ref.get('namespace')}/{ref['name']}")

    async def _patch_status(self, pvc: Obj, status: Obj) -> Obj:
        updated = await self.api.patch(
            PVC, k.name_of(pvc), {"status": status}, k.namespace_of(pvc), status=True
        )
        self.pvcs.store_update(updated)
        return updated

    async def _secrets(self, pv: Obj) -> dict[str, str]:
        ref = ((pv.get("spec") or {}).get("csi") or {}).get("controllerExpandSecretRef")
        if not ref:
            return {}
        secret = await self.api.get(SECRET, str(ref.get("name")), str(ref.get("namespace")))
        return {key: base64.b64decode(v).decode() for key, v in (secret.get("data") or {}).items()}

    def _capability(self, pv: Obj) -> Capability | None:
        spec = pv.get("spec") or {}
        try:
            caps = capabilities_for(
                list(spec.get("accessModes") or []),
                block=spec.get("volumeMode") == "Block",
                fs_type=str((spec.get("csi") or {}).get("fsType") or ""),
                mount_flags=list(spec.get("mountOptions") or []),
                single_node_multi_writer=self.multi_writer,
            )
        except ValueError:
            return None
        return caps[0]

    def _volume_of(self, pvc: Obj) -> Obj | None:
        spec = pvc.get("spec") or {}
        if not spec.get("volumeName") or (pvc.get("status") or {}).get("phase") != "Bound":
            return None
        pv = self.pvs.get(str(spec["volumeName"]))
        if pv is None:
            return None
        pspec = pv.get("spec") or {}
        if (pspec.get("csi") or {}).get("driver") != self.driver_name:
            return None
        if (pspec.get("claimRef") or {}).get("uid") != k.uid_of(pvc):
            return None
        if self.node_topology is not None and not affinity_matches(pv, self.node_topology):
            return None  # per-node mode: a node-local volume is grown by the node that has it
        resizer = k.annotations_of(pvc).get(ANN_STORAGE_RESIZER)
        if resizer is not None and resizer != self.driver_name:
            return None
        return pv

    async def sync_claim(self, key: str) -> None:
        pvc = self.pvcs.get(key)
        if pvc is None or k.is_deleting(pvc):
            return
        pv = self._volume_of(pvc)
        if pv is None:
            return
        st = pvc.get("status") or {}
        try:
            requested = storage_of(pvc, "spec", "resources", "requests")
            capacity = storage_of(pvc, "status", "capacity") or 0
            allocated = storage_of(pvc, "status", "allocatedResources")
        except ValueError as e:
            await self.events.event(pvc, "Warning", "VolumeResizeFailed", str(e))
            return
        if requested is None:
            return
        phase = (st.get("allocatedResourceStatuses") or {}).get("storage")
        if phase == NODE_PENDING:
            return  # the kubelet's turn
        if phase == IN_PROGRESS and allocated is not None:
            target = max(allocated, requested)  # a started expansion is finished, never shrunk
        elif phase == INFEASIBLE:
            if requested <= capacity:
                # The user gave up: back to what the volume has.
                await self._patch_status(
                    pvc,
                    {
                        "allocatedResources": {"storage": format_quantity(capacity)},
                        "allocatedResourceStatuses": None,
                        "conditions": _conditions(pvc),
                    },
                )
                return
            target = requested
        else:
            if requested <= capacity:
                return
            target = requested
        await self._expand(pvc, pv, target)

    async def _expand(self, pvc: Obj, pv: Obj, target: int) -> None:
        st = pvc.get("status") or {}
        want = format_quantity(target)
        phase = (st.get("allocatedResourceStatuses") or {}).get("storage")
        same_size = (st.get("allocatedResources") or {}).get("storage") == want
        # A retry of a size the driver refused stays Infeasible until it answers otherwise, so
        # the user can lower the request at any moment of the retries.
        if not same_size or phase not in (IN_PROGRESS, INFEASIBLE):
            pvc = await self._patch_status(
                pvc,
                {
                    "allocatedResources": {"storage": want},
                    "allocatedResourceStatuses": {"storage": IN_PROGRESS},
                    "conditions": _conditions(pvc, _condition(COND_RESIZING)),
                },
            )
            await self.events.event(
                pvc, "Normal", "Resizing", f"External resizer is resizing volume {k.name_of(pv)}"
            )
        handle = str(((pv.get("spec") or {}).get("csi") or {}).get("volumeHandle") or "")
        if self.trivial:
            new_size, node_needed = target, True
        else:
            try:
                new_size, node_needed = await self.driver.expand_volume(
                    handle, target, self._capability(pv), await self._secrets(pv)
                )
            except CSIError as e:
                final = e.code not in NON_FINAL_CODES
                msg = f"resize volume {k.name_of(pv)} failed: {e}"
                status: Obj = {
                    "conditions": _conditions(pvc, _condition(COND_ERROR, msg)),
                    "allocatedResourceStatuses": {"storage": INFEASIBLE if final else IN_PROGRESS},
                }
                try:
                    await self._patch_status(pvc, status)
                except ApiError as pe:
                    log.info("cannot record resize failure on %s: %s", k.key_of(pvc), pe)
                await self.events.event(pvc, "Warning", "VolumeResizeFailed", msg)
                raise
            new_size = new_size or target
        if (storage_of(pv, "spec", "capacity") or 0) < new_size:
            updated = await self.api.patch(
                PV, k.name_of(pv), {"spec": {"capacity": {"storage": format_quantity(new_size)}}}
            )
            self.pvs.store_update(updated)
        if node_needed:
            await self._patch_status(
                pvc,
                {
                    "allocatedResourceStatuses": {"storage": NODE_PENDING},
                    "conditions": _conditions(
                        pvc,
                        _condition(COND_FS_PENDING, FS_PENDING_MESSAGE),
                    ),
                },
            )
            await self.events.event(
                pvc, "Normal", "FileSystemResizeRequired", "Require file system resize of volume on node"
            )
            return
        await self._patch_status(
            pvc,
            {
                "capacity": {"storage": format_quantity(new_size)},
                "allocatedResourceStatuses": None,
                "conditions": _conditions(pvc),
            },
        )
        await self.events.event(
            pvc, "Normal", "VolumeResizeSuccessful", f"Resize volume succeeded for volume {k.name_of(pv)}"
        )
