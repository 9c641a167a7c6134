"""Volume modification: a claim's VolumeAttributesClass → ControllerModifyVolume.

What upstream external-resizer's modify controller (`pkg/modifycontroller`)
does, on the same fields, conditions and Events, so either can take over.
It runs inside the resizer loop (`--controllers resizer`, the resizer's
Lease, its PVC and PV informers), as upstream runs both in one sidecar, and
only for a driver that offers MODIFY_VOLUME.

A VolumeAttributesClass (`storage.k8s.io/v1`, cluster-scoped, immutable)
names a `driverName` and its `parameters`: the driver's mutable parameters.
A Bound claim of this driver whose `spec.volumeAttributesClassName` differs
from `status.currentVolumeAttributesClassName` is modified:

1. The class is looked up.  Missing: `status.modifyVolumeStatus` becomes
   `{status: Pending, targetVolumeAttributesClassName}` and a Warning
   `VolumeModifyFailed` Event says so; the class's creation brings the claim
   back (the class informer requeues the claims waiting for it).  A class of
   another driver is Infeasible here (a choice: upstream does not check).
2. The claim is marked -- `modifyVolumeStatus {status: InProgress,
   targetVolumeAttributesClassName}`, condition `ModifyingVolume`, Normal
   Event `VolumeModify` -- with the resourceVersion precondition, unless it
   already records that very target (a retry does not rewrite it).
3. ControllerModifyVolume(volume handle, the class's parameters), no secrets
   (as upstream).
4. Success: the PV's `spec.volumeAttributesClassName` is set first, then the
   claim's `status.currentVolumeAttributesClassName`, with
   `modifyVolumeStatus` removed and the modify conditions cleared; Normal
   Event `VolumeModifySuccessful`.
5. Failure: condition `ModifyVolumeError` ("ModifyVolume failed with error:
   ... Waiting for retry."), Warning Event `VolumeModifyFailed`, and a retry
   with the work queue's backoff.  INVALID_ARGUMENT (the driver refused the
   parameters and, by the spec, applied nothing) makes it `Infeasible`, as
   upstream; other final errors leave it InProgress; an error after which
   the modification may still be running on the storage (DEADLINE_EXCEEDED,
   UNAVAILABLE, ...) makes the claim *uncertain*.
6. Rollback: a claim whose spec names its current class again while a
   `modifyVolumeStatus` is recorded (Infeasible, Pending, or InProgress
   after a final error) is cleared with no CSI call -- the volume was not
   changed.  An uncertain claim (and after a restart, any claim found
   InProgress or Infeasible, as upstream's initUncertainPVCs) is first
   modified back with the current class's parameters.

Upstream holds an Infeasible claim back in a "slow set" before retrying the
same class; here the work queue's backoff (up to `max_delay`) paces it, and
the Infeasible status is not rewritten while the driver keeps refusing.
Upstream's `--extra-modify-metadata` (claim and PV names added to the
parameters) is not offered.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import grpc

from csi_kit.k8s.objects.resources import PV, VOLUME_ATTRIBUTES_CLASS, Resource
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.csi import NON_FINAL_CODES, CSICallError
from csi_kit.k8s.runtime.events import EventRecorder
from csi_kit.k8s.runtime.informer import Informer
from csi_kit.k8s.runtime.workqueue import WorkQueue
from csi_kit.k8s.volume.protocol import claim_condition, merge_claim_conditions

log = logging.getLogger(__name__)

IN_PROGRESS = "InProgress"
INFEASIBLE = "Infeasible"
PENDING = "Pending"
COND_MODIFYING = "ModifyingVolume"
COND_MODIFY_ERROR = "ModifyVolumeError"
#: The modify conditions (upstream's knownModifyVolumeConditions); others are left as they are.
MODIFY_CONDITIONS = frozenset({COND_MODIFYING, COND_MODIFY_ERROR})
EVENT_MODIFY = "VolumeModify"
EVENT_MODIFIED = "VolumeModifySuccessful"
EVENT_FAILED = "VolumeModifyFailed"


class ModifyDriver(Protocol):
    async def modify_volume(self, volume_id: str, mutable_parameters: dict[str, str]) -> None: ...


class ClaimLoop(Protocol):
    """What the modifier borrows from the loop it runs in (the resizer)."""

    api: KubeAPI
    pvcs: Informer
    pvs: Informer
    informers: list[Informer]
    events: EventRecorder

    def queue(self, name: str, sync: Any) -> WorkQueue: ...

    def informer(self, api: KubeAPI, res: Resource) -> Informer: ...

    def volume_of(self, pvc: Obj) -> Obj | None: ...

    async def patch_status(
        self, pvc: Obj, status: Obj, *, checked: bool = True, annotations: Obj | None = None
    ) -> Obj: ...


def _spec_class(pvc: Obj) -> str:
    return str((pvc.get("spec") or {}).get("volumeAttributesClassName") or "")


def _current_class(pvc: Obj) -> str:
    return str((pvc.get("status") or {}).get("currentVolumeAttributesClassName") or "")


def _modify_status(pvc: Obj) -> Obj | None:
    mvs = (pvc.get("status") or {}).get("modifyVolumeStatus")
    return mvs if isinstance(mvs, dict) else None


def _records(pvc: Obj, status: str, target: str) -> bool:
    mvs = _modify_status(pvc)
    return (
        mvs is not None
        and mvs.get("status") == status
        and mvs.get("targetVolumeAttributesClassName") == target
    )


def _wants_work(pvc: Obj) -> bool:
    spec = _spec_class(pvc)
    return bool(spec) and (spec != _current_class(pvc) or _modify_status(pvc) is not None)


class VolumeModifier:
    """The modify half of the resizer loop: one queue of claims, one informer of classes."""

    def __init__(self, loop: ClaimLoop, driver: ModifyDriver, driver_name: str) -> None:
        self.loop = loop
        self.driver = driver
        self.driver_name = driver_name
        self.classes = loop.informer(loop.api, VOLUME_ATTRIBUTES_CLASS)
        # Claims whose last ControllerModifyVolume may still be running on the storage.
        self.uncertain: set[str] = set()
        # Claims this process has asked the driver about: a status found InProgress or
        # Infeasible on any other claim was left by an earlier process (upstream's initUncertainPVCs).
        self.known: set[str] = set()
        self.claim_queue = loop.queue("modify", self.sync_claim)
        loop.pvcs.add_handler(self._on_claim)
        loop.pvs.add_handler(self._on_volume)
        self.classes.add_handler(self._on_class)

    def _on_claim(self, event: str, old: Obj | None, new: Obj | None) -> None:
        if event == "DELETED":
            if old is not None:
                key = k.key_of(old)
                self.uncertain.discard(key)
                self.known.discard(key)
            return
        if new is not None and _wants_work(new):
            self.claim_queue.add(k.key_of(new))

    def _on_volume(self, event: str, old: Obj | None, new: Obj | None) -> None:
        ref = ((new or old or {}).get("spec") or {}).get("claimRef") or {}
        if event == "ADDED" and ref.get("name"):
            self.claim_queue.add(f"{ref.get('namespace')}/{ref['name']}")

    def _on_class(self, event: str, old: Obj | None, new: Obj | None) -> None:
        if event == "DELETED" or new is None:
            return
        name = k.name_of(new)
        for pvc in list(self.loop.pvcs.cache.values()):
            if _spec_class(pvc) == name and _wants_work(pvc):
                self.claim_queue.add(k.key_of(pvc))

    def _uncertain(self, key: str, pvc: Obj) -> bool:
        if key in self.uncertain:
            return True
        mvs = _modify_status(pvc) or {}
        return key not in self.known and mvs.get("status") in (IN_PROGRESS, INFEASIBLE)

    async def sync_claim(self, key: str) -> None:
        pvc = self.loop.pvcs.get(key)
        if pvc is None or k.is_deleting(pvc):
            return
        pv = self.loop.volume_of(pvc)
        target = _spec_class(pvc)
        if pv is None or not target:
            return  # not ours, not bound, or no class asked for (upstream ignores an unset class)
        if target == _current_class(pvc):
            if _modify_status(pvc) is not None:
                await self._roll_back(key, pvc, pv, target)
            return
        vac = await self._usable_class(pvc, target)
        if vac is None:
            return
        if not (_records(pvc, IN_PROGRESS, target) or _records(pvc, INFEASIBLE, target)):
            pvc = await self._mark_in_progress(pvc, target)
        await self._modify(key, pvc, pv, target, vac)
        await self.loop.events.event(
            pvc,
            "Normal",
            EVENT_MODIFIED,
            f"external resizer modified volume {k.name_of(pvc)} with vac {target} successfully",
        )

    async def _usable_class(self, pvc: Obj, target: str) -> Obj | None:
        """The class `target` if it exists and is this driver's; else the claim says why, and None."""
        vac = self.classes.get(target)
        if vac is None:
            await self._pending(pvc, target)
            return None
        if str(vac.get("driverName") or "") != self.driver_name:
            await self._infeasible(
                pvc,
                target,
                f"VolumeAttributesClass {target} is for driver {vac.get('driverName')!r}, "
                f"not {self.driver_name!r}",
            )
            return None
        return vac

    async def _mark_in_progress(self, pvc: Obj, target: str) -> Obj:
        """`modifyVolumeStatus` InProgress for `target`, condition ModifyingVolume, a Normal Event."""
        pvc = await self.loop.patch_status(
            pvc,
            {
                "modifyVolumeStatus": {"status": IN_PROGRESS, "targetVolumeAttributesClassName": target},
                "conditions": merge_claim_conditions(
                    pvc,
                    [claim_condition(COND_MODIFYING, "ModifyVolume operation in progress.")],
                    MODIFY_CONDITIONS,
                ),
            },
        )
        await self.loop.events.event(
            pvc,
            "Normal",
            EVENT_MODIFY,
            f"external resizer is modifying volume {k.name_of(pvc)} with vac {target}",
        )
        return pvc

    async def _modify(self, key: str, pvc: Obj, pv: Obj, target: str, vac: Obj) -> None:
        """ControllerModifyVolume with the class's parameters, then record `target` as current."""
        handle = str(((pv.get("spec") or {}).get("csi") or {}).get("volumeHandle") or "")
        params = {str(n): str(v) for n, v in (vac.get("parameters") or {}).items()}
        self.known.add(key)
        try:
            await self.driver.modify_volume(handle, params)
        except CSICallError as e:
            await self._record_failure(key, pvc, target, e)
            raise
        self.uncertain.discard(key)
        await self._complete(pvc, pv, target)

    async def _complete(self, pvc: Obj, pv: Obj, target: str) -> None:
        """The PV first (so a claim never says current while its PV does not), then the claim."""
        if (pv.get("spec") or {}).get("volumeAttributesClassName") != target:
            updated = await self.loop.api.patch(
                PV, k.name_of(pv), {"spec": {"volumeAttributesClassName": target}}
            )
            self.loop.pvs.store_update(updated)
        await self.loop.patch_status(
            pvc,
            {
                "currentVolumeAttributesClassName": target,
                "modifyVolumeStatus": None,
                "conditions": merge_claim_conditions(pvc, [], MODIFY_CONDITIONS) or None,
            },
            checked=False,
        )

    async def _roll_back(self, key: str, pvc: Obj, pv: Obj, current: str) -> None:
        """The spec names the current class again: undo what may have happened, clear the status."""
        if self._uncertain(key, pvc):
            vac = self.classes.get(current)
            if vac is None:
                await self._pending(pvc, current)
                return
            await self._modify(key, pvc, pv, current, vac)
        else:
            await self._complete(pvc, pv, current)
        log.info("%s: modification rolled back to VolumeAttributesClass %s", key, current)

    async def _pending(self, pvc: Obj, target: str) -> None:
        msg = f"VAC {target} does not exist."
        await self.loop.events.event(pvc, "Warning", EVENT_FAILED, msg)
        if not _records(pvc, PENDING, target):
            # Pending leaves the conditions as they are (upstream).
            await self.loop.patch_status(
                pvc, {"modifyVolumeStatus": {"status": PENDING, "targetVolumeAttributesClassName": target}}
            )

    async def _infeasible(self, pvc: Obj, target: str, message: str) -> None:
        await self.loop.events.event(pvc, "Warning", EVENT_FAILED, message)
        if _records(pvc, INFEASIBLE, target):
            return
        failed = f"ModifyVolume failed with error: {message}. Waiting for retry."
        await self.loop.patch_status(
            pvc,
            {
                "modifyVolumeStatus": {"status": INFEASIBLE, "targetVolumeAttributesClassName": target},
                "conditions": merge_claim_conditions(
                    pvc,
                    [claim_condition(COND_MODIFYING, failed), claim_condition(COND_MODIFY_ERROR, failed)],
                    MODIFY_CONDITIONS,
                    keep_old=True,
                ),
            },
            checked=False,
        )

    async def _record_failure(self, key: str, pvc: Obj, target: str, e: CSICallError) -> None:
        """Record a ControllerModifyVolume error the way upstream does (no resourceVersion check)."""
        if e.code == grpc.StatusCode.INVALID_ARGUMENT:
            self.uncertain.discard(key)
            await self._infeasible(pvc, target, str(e))
            return
        await self.loop.events.event(pvc, "Warning", EVENT_FAILED, str(e))
        if e.code in NON_FINAL_CODES:
            self.uncertain.add(key)
        else:
            self.uncertain.discard(key)
        failed = claim_condition(
            COND_MODIFY_ERROR, f"ModifyVolume failed with error: {e}. Waiting for retry."
        )
        try:
            await self.loop.patch_status(
                pvc,
                {"conditions": merge_claim_conditions(pvc, [failed], MODIFY_CONDITIONS, keep_old=True)},
                checked=False,
            )
        except ApiError as pe:
            log.info("cannot record modify failure on %s: %s", k.key_of(pvc), pe)
