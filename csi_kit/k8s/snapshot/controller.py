"""The snapshot controller: VolumeSnapshot ↔ VolumeSnapshotContent binding.

What the upstream snapshot-controller does, driver-independent: for a
VolumeSnapshot of a PVC it resolves the class (or the single default class of
the PV's driver), protects the PVC with a finalizer, creates the content
`snapcontent-<snapshot uid>` pointing back at the snapshot, and mirrors the
content's status (set by the snapshotter, `snapshotter.py`) into the
snapshot's.  For a pre-provisioned content it completes the binding.  On
deletion it marks the content `volumesnapshot-being-deleted`, deletes it when
its policy is Delete, and lets the snapshot go once the content is gone.

All state lives in the API objects; the deterministic content name is what
lets a restarted controller find what it created before it crashed.

Request economy (each request costs QPS), the object protocol unchanged at
every stable state:

- the snapshot's two finalizers (and the default class it picked) go in one
  write, the content is created already carrying its finalizer and its
  being-created annotation (upstream adds each with a write of its own), and
  both snapshot finalizers are removed in one write once the content is gone;
- the snapshot's status is written once when the snapshotter answers quickly:
  right after creating a content the controller holds back the "bound, not
  ready" status for up to `BOUND_STATUS_GRACE` seconds, and the snapshotter's
  answer (usually within milliseconds) goes out in the same write as the
  binding.  Upstream finds a content by its deterministic name whether or not
  the snapshot's status names it yet, and so does a restarted controller,
  which holds nothing back (the grace is in memory only).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from csi_kit.k8s.objects.quantity import format_quantity
from csi_kit.k8s.objects.resources import (
    PV,
    PVC,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CLASS,
    VOLUME_SNAPSHOT_CONTENT,
)
from csi_kit.k8s.objects.times import rfc3339_from_ns
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.context import LoopContext, Planned
from csi_kit.k8s.runtime.controller import Loop, Retry
from csi_kit.k8s.runtime.events import NORMAL, WARNING, EventRecorder
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.snapshot import protocol as p
from csi_kit.k8s.snapshot.writes import Writer

log = logging.getLogger(__name__)

#: Seconds the first status write of a just-created dynamic snapshot waits for the snapshotter.
BOUND_STATUS_GRACE = 2.0


def _binding(pvc: Obj) -> tuple[Any, Any]:
    """What of a PVC the snapshots wait for: its volume and its phase."""
    return p.spec(pvc).get("volumeName"), p.status(pvc).get("phase")


def _restored_from(pvc: Obj) -> list[str]:
    """Keys of the VolumeSnapshots a PVC names as its data source."""
    keys = []
    for src in (p.spec(pvc).get("dataSource"), p.spec(pvc).get("dataSourceRef")):
        if src and src.get("kind") == "VolumeSnapshot" and src.get("name"):
            keys.append(f"{src.get('namespace') or k.namespace_of(pvc)}/{src['name']}")
    return keys


class SnapshotError(Exception):
    """A problem worth reporting in the snapshot's status.error (then retried with backoff)."""


class SnapshotController(Loop):
    name = "snapshot-controller"

    def __init__(
        self,
        api: KubeAPI,
        *,
        informers: InformerFactory | None = None,
        workers: int = 10,
        resync_period: float = 900.0,
        distributed: bool = False,
        events: EventRecorder | None = None,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
    ) -> None:
        super().__init__(informers=informers, workers=workers, base_delay=base_delay, max_delay=max_delay)
        self.events = events
        self.api = api
        self.distributed = distributed
        self._pvc_locks: dict[str, asyncio.Lock] = {}
        #: content name -> when this process created it (monotonic), until the snapshot's first status write.
        self._created_at: dict[str, float] = {}
        self.snapshots = self.informer(api, VOLUME_SNAPSHOT, resync_period=resync_period)
        self.contents = self.informer(api, VOLUME_SNAPSHOT_CONTENT, resync_period=resync_period)
        self.classes = self.informer(api, VOLUME_SNAPSHOT_CLASS)
        self.pvcs = self.informer(api, PVC)
        self.pvs = self.informer(api, PV)
        self.snapshot_writes = Writer(api, VOLUME_SNAPSHOT, self.snapshots)
        self.content_writes = Writer(api, VOLUME_SNAPSHOT_CONTENT, self.contents)
        self.pvc_writes = Writer(api, PVC, self.pvcs)
        self.snapshot_queue = self.queue("snapshot", self.sync_snapshot)
        self.content_queue = self.queue("content", self.sync_content)
        self.snapshots.add_handler(self._on_snapshot)
        self.contents.add_handler(self._on_content)
        self.pvcs.add_handler(self._on_pvc)

    # ------------------------------------------------------------ event routing

    def _on_snapshot(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        self.snapshot_queue.add(k.key_of(obj))
        if event == "DELETED":
            name = p.status(obj).get("boundVolumeSnapshotContentName") or p.source_content_name(obj)
            if not name and p.source_pvc_name(obj):
                name = p.content_name_for(obj)
            if name:
                self.content_queue.add(str(name))

    def _on_content(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        self.content_writes.forget(event, old, new)
        if event == "DELETED":
            self._created_at.pop(k.name_of(obj), None)
        self.content_queue.add(k.name_of(obj))
        ref = p.spec(obj).get("volumeSnapshotRef") or {}
        if ref.get("name") and ref.get("namespace"):
            self.snapshot_queue.add(f"{ref['namespace']}/{ref['name']}")

    def _on_pvc(self, event: str, old: Obj | None, new: Obj | None) -> None:
        """A PVC that becomes bound (or goes) wakes the snapshots waiting for it, instead of their backoff."""
        if new is not None and old is not None and _binding(old) == _binding(new):
            return
        obj = new or old
        assert obj is not None
        if event == "DELETED":
            self._drop_pvc_lock(k.key_of(obj))
        # Its unready snapshots; and a restore that finished (or went) may unblock the
        # deletion of its source snapshot.
        for key in self._unready_snapshots_of(obj) + _restored_from(obj):
            self.snapshot_queue.add(key)

    def _drop_pvc_lock(self, key: str) -> None:
        lock = self._pvc_locks.get(key)
        if lock is not None and not lock.locked():
            del self._pvc_locks[key]

    def _unready_snapshots_of(self, pvc: Obj) -> list[str]:
        ns, name = k.namespace_of(pvc), k.name_of(pvc)
        return [
            k.key_of(snap)
            for snap in self.snapshots.items()
            if k.namespace_of(snap) == ns and p.source_pvc_name(snap) == name and not p.is_ready(snap)
        ]

    # ----------------------------------------------------------------- helpers

    def _pvc_lock(self, key: str) -> asyncio.Lock:
        """One PVC finalizer change at a time per PVC: snapshots of one PVC share it, and
        concurrent rv-guarded writes would only conflict and back off."""
        lock = self._pvc_locks.get(key)
        if lock is None:
            lock = self._pvc_locks[key] = asyncio.Lock()
        return lock

    def _content_for(self, snap: Obj) -> Obj | None:
        """The content bound (or being bound) to this snapshot, if it points back at it."""
        name = p.status(snap).get("boundVolumeSnapshotContentName") or p.source_content_name(snap)
        if not name:
            name = p.content_name_for(snap)
        content = self.contents.get(str(name))
        if content is None or not p.refers_to(content, "volumeSnapshotRef", snap):
            return None
        return content

    async def _set_snapshot_status(self, snap: Obj, new_status: dict[str, Any]) -> Obj:
        """Write status fields (unless already so), with the Events the transitions deserve."""
        current = p.status(snap)
        updated = await self.snapshot_writes.set_status(snap, new_status)
        if self.events is not None and updated is not snap:
            key = k.key_of(snap)
            if new_status.get("creationTime") and not current.get("creationTime"):
                self.events.event(
                    updated,
                    NORMAL,
                    "SnapshotCreated",
                    f"Snapshot {key} was successfully created by the CSI driver.",
                )
            if new_status.get("readyToUse") is True and current.get("readyToUse") is not True:
                self.events.event(updated, NORMAL, "SnapshotReady", f"Snapshot {key} is ready to use.")
        return updated

    async def _report(self, snap: Obj, message: str) -> None:
        """Put an error in status.error (what `kubectl describe` shows), keeping other fields."""
        if self.events is not None:
            self.events.event(snap, WARNING, "SnapshotFailed", message)
        await self.snapshot_writes.report(snap, message, {"readyToUse": False})

    @staticmethod
    def _status_from_content(content: Obj) -> dict[str, Any]:
        cs = p.status(content)
        st: dict[str, Any] = {"boundVolumeSnapshotContentName": k.name_of(content), "readyToUse": False}
        if cs.get("creationTime") is not None:
            st["creationTime"] = rfc3339_from_ns(int(cs["creationTime"]))
        if cs.get("readyToUse") is not None:
            st["readyToUse"] = bool(cs["readyToUse"])
        if cs.get("restoreSize") is not None:
            st["restoreSize"] = format_quantity(int(cs["restoreSize"]))
        st["error"] = cs.get("error")
        return st

    def _class_for_pvc(self, snap: Obj, pv: Obj) -> Obj:
        """The snapshot's class, or the one default class of the PV's driver."""
        name = p.spec(snap).get("volumeSnapshotClassName")
        if name:
            cls = self.classes.get(str(name))
            if cls is None:
                raise SnapshotError(
                    f'failed to get snapshot class with error volumesnapshotclass "{name}" not found'
                )
            return cls
        driver = (p.spec(pv).get("csi") or {}).get("driver")
        defaults = [c for c in self.classes.items() if c.get("driver") == driver and p.is_default_class(c)]
        if not defaults:
            raise SnapshotError(f"cannot find default snapshot class for snapshot {k.key_of(snap)}")
        if len(defaults) > 1:
            raise SnapshotError(f"{len(defaults)} default snapshot classes were found for driver {driver}")
        return defaults[0]

    def _volume_for(self, snap: Obj) -> tuple[Obj, Obj]:
        ns = k.namespace_of(snap)
        pvc_name = p.source_pvc_name(snap)
        pvc = self.pvcs.get(f"{ns}/{pvc_name}")
        if pvc is None:
            raise SnapshotError(
                f"failed to get input parameters to create snapshot {k.name_of(snap)}: "
                f'persistentvolumeclaim "{pvc_name}" not found'
            )
        pv_name = p.spec(pvc).get("volumeName")
        if not pv_name or p.status(pvc).get("phase") != "Bound":
            raise SnapshotError(
                f"failed to get input parameters to create snapshot {k.name_of(snap)}: "
                f"the PVC {pvc_name} is not yet bound to a PV, will not attempt to take a snapshot"
            )
        pv = self.pvs.get(str(pv_name))
        if pv is None:
            raise SnapshotError(f'failed to retrieve PV {pv_name} from the API server: "{pv_name}" not found')
        if not p.spec(pv).get("csi"):
            raise SnapshotError(f"cannot find CSI PersistentVolumeSource for volume {pv_name}")
        return pvc, pv

    # ---------------------------------------------------------- snapshot sync

    async def sync_snapshot(self, key: str) -> None:
        snap = self.snapshots.get(key)
        if snap is None:
            return
        if k.is_deleting(snap):
            await self._delete_snapshot(snap)
            return
        pvc_name, content_name = p.source_pvc_name(snap), p.source_content_name(snap)
        if bool(pvc_name) == bool(content_name):
            await self._report(
                snap,
                "Exactly one of PersistentVolumeClaimName and VolumeSnapshotContentName should be specified",
            )
            return
        try:
            if content_name:
                await self._sync_preprovisioned(snap)
            else:
                await self._sync_dynamic(snap)
        except SnapshotError as e:
            await self._report(snap, str(e))
            raise

    async def _ensure_snapshot_finalizers(
        self, snap: Obj, content_policy: str | None, default_class: str | None = None
    ) -> Obj:
        """The snapshot's finalizers (bound-protection only under a Delete policy), and the default
        class it picked (upstream records it in the spec), in one write."""
        want = {p.SNAPSHOT_AS_SOURCE_FINALIZER}
        if content_policy == p.DELETE:
            want.add(p.SNAPSHOT_BOUND_FINALIZER)
        spec = {"volumeSnapshotClassName": default_class} if default_class is not None else None
        return await self.snapshot_writes.set_finalizers(snap, want, spec=spec)

    async def _sync_dynamic(self, snap: Obj) -> None:
        content = self._content_for(snap)
        if content is None and self.contents.get(p.content_name_for(snap)) is not None:
            raise SnapshotError(
                f"VolumeSnapshotContent {p.content_name_for(snap)} is bound to a different snapshot"
            )
        if content is None:
            await self._create_content(snap)
            return
        if p.spec(content).get("source", {}).get("snapshotHandle"):
            raise SnapshotError(
                f"Snapshot handle should not be set in content {k.name_of(content)} for dynamic provisioning"
            )
        snap = await self._ensure_snapshot_finalizers(snap, p.spec(content).get("deletionPolicy"))
        if self._waiting_for_snapshotter(snap, content):
            return
        snap = await self._set_snapshot_status(snap, self._status_from_content(content))
        if p.is_ready(snap):
            await self._release_pvc(snap)

    def _waiting_for_snapshotter(self, snap: Obj, content: Obj) -> bool:
        """Whether to hold back the first status write of a snapshot whose content this process
        has just created and the snapshotter has not answered yet (see the module docstring)."""
        name = k.name_of(content)
        created = self._created_at.get(name)
        if created is None:
            return False
        left = created + BOUND_STATUS_GRACE - time.monotonic()
        if p.status(content) or p.status(snap).get("boundVolumeSnapshotContentName") or left <= 0:
            del self._created_at[name]
            return False
        self.snapshot_queue.add_after(k.key_of(snap), left)
        return True

    async def _create_content(self, snap: Obj) -> None:
        pvc, pv = self._volume_for(snap)
        cls = self._class_for_pvc(snap, pv)
        content = self._content_body(snap, pv, cls)
        default_class = None if p.spec(snap).get("volumeSnapshotClassName") else k.name_of(cls)
        snap = await self._ensure_snapshot_finalizers(snap, content["spec"]["deletionPolicy"], default_class)
        await self._protect_pvc(snap, pvc)
        try:
            created = await self.content_writes.create(content)
        except ApiError as e:
            raise SnapshotError(f"Failed to create snapshot content with error {e}") from None
        self._created_at[k.name_of(created)] = time.monotonic()
        if self.events is not None:
            self.events.event(
                snap,
                NORMAL,
                "CreatingSnapshot",
                f"Waiting for a snapshot {k.key_of(snap)} to be created by the CSI driver.",
            )
        # The content's watch event brings the snapshot back to `_sync_dynamic`, which writes its status.

    def _content_body(self, snap: Obj, pv: Obj, cls: Obj) -> Obj:
        """The dynamic content for `snap` of volume `pv` under class `cls`, as upstream makes it."""
        driver = (p.spec(pv).get("csi") or {}).get("driver")
        if cls.get("driver") != driver:
            raise SnapshotError(
                f"snapshot class {k.name_of(cls)} is for driver {cls.get('driver')}, "
                f"the volume belongs to {driver}"
            )
        name = p.content_name_for(snap)
        try:
            ref = p.secret_ref(cls.get("parameters") or {}, name, k.name_of(snap), k.namespace_of(snap))
        except ValueError as e:
            raise SnapshotError(
                f"failed to get secret reference for snapshot {k.key_of(snap)}: {e}"
            ) from None
        # Being-created is set at birth so a deletion racing the first CreateSnapshot waits
        # for it (the snapshotter would set it anyway before calling the driver).
        annotations = {p.ANN_BEING_CREATED: "yes"}
        if ref is not None:
            annotations[p.ANN_DELETION_SECRET_NAME] = ref[0]
            annotations[p.ANN_DELETION_SECRET_NAMESPACE] = ref[1]
        metadata: dict[str, Any] = {
            "name": name,
            "finalizers": [p.CONTENT_BOUND_FINALIZER],
            "annotations": annotations,
        }
        node = p.managed_by_node(pv) if self.distributed else None
        if node:
            metadata["labels"] = {p.LABEL_MANAGED_BY: node}
        spec: dict[str, Any] = {
            "volumeSnapshotRef": p.object_ref(VOLUME_SNAPSHOT, snap, with_version=True),
            "source": {"volumeHandle": p.spec(pv)["csi"]["volumeHandle"]},
            "volumeSnapshotClassName": k.name_of(cls),
            "deletionPolicy": cls.get("deletionPolicy") or p.DELETE,
            "driver": cls.get("driver"),
        }
        if p.spec(pv).get("volumeMode"):
            spec["sourceVolumeMode"] = p.spec(pv)["volumeMode"]
        return {
            "apiVersion": VOLUME_SNAPSHOT_CONTENT.api_version,
            "kind": VOLUME_SNAPSHOT_CONTENT.kind,
            "metadata": metadata,
            "spec": spec,
        }

    async def _sync_preprovisioned(self, snap: Obj) -> None:
        name = str(p.source_content_name(snap))
        content = self.contents.get(name)
        if content is None:
            raise SnapshotError(f"VolumeSnapshotContent {name} is missing")
        if not p.refers_to(content, "volumeSnapshotRef", snap):
            raise SnapshotError(f"VolumeSnapshotContent [{name}] is bound to a different snapshot")
        if not p.spec(content).get("source", {}).get("snapshotHandle"):
            raise SnapshotError(
                f"VolumeSnapshotContent [{name}] has no snapshotHandle for a pre-provisioned snapshot"
            )
        content = await self.content_writes.bind(
            content, "volumeSnapshotRef", snap, p.CONTENT_BOUND_FINALIZER
        )
        snap = await self._ensure_snapshot_finalizers(snap, p.spec(content).get("deletionPolicy"))
        await self._set_snapshot_status(snap, self._status_from_content(content))

    # ----------------------------------------------------------- PVC finalizer

    async def _protect_pvc(self, snap: Obj, pvc: Obj) -> None:
        """The PVC's source-protection finalizer, before the content (and so the cut) exists."""
        async with self._pvc_lock(k.key_of(pvc)):
            pvc = self.pvcs.get(k.key_of(pvc)) or pvc
            if k.is_deleting(pvc):
                raise SnapshotError(
                    f"cannot add finalizer on claim [{k.key_of(pvc)}] for snapshot [{k.key_of(snap)}]: "
                    "claim is being deleted"
                )
            await self.pvc_writes.set_finalizers(pvc, add={p.PVC_AS_SOURCE_FINALIZER})

    def _pvc_in_use(self, snap: Obj, pvc_name: str, *, skip_self: bool) -> bool:
        """Whether a snapshot of that PVC (other than `snap` with `skip_self`) is still being cut."""
        ns = k.namespace_of(snap)
        for other in self.snapshots.items():
            if k.namespace_of(other) != ns or p.source_pvc_name(other) != pvc_name:
                continue
            if skip_self and k.uid_of(other) == k.uid_of(snap):
                continue
            if not p.is_ready(other) and not k.is_deleting(other):
                return True
        return False

    async def _release_pvc(self, snap: Obj, *, skip_self: bool = False) -> None:
        """Drop the PVC finalizer once no snapshot of that PVC is still being cut."""
        pvc_name = p.source_pvc_name(snap)
        if not pvc_name:
            return
        key = f"{k.namespace_of(snap)}/{pvc_name}"

        def protected() -> Obj | None:
            pvc = self.pvcs.get(key)
            return pvc if pvc is not None and p.PVC_AS_SOURCE_FINALIZER in k.finalizers_of(pvc) else None

        if protected() is None:
            return
        async with self._pvc_lock(key):
            pvc = protected()
            if pvc is None or self._pvc_in_use(snap, pvc_name, skip_self=skip_self):
                return
            await self.pvc_writes.set_finalizers(pvc, remove={p.PVC_AS_SOURCE_FINALIZER})

    # ------------------------------------------------------------- deletion

    def _pvc_restoring_from(self, snap: Obj) -> bool:
        """Whether a PVC is still being provisioned from this snapshot (then it must stay)."""
        ns, name = k.namespace_of(snap), k.name_of(snap)
        for pvc in self.pvcs.items():
            if k.namespace_of(pvc) != ns or p.status(pvc).get("phase") != "Pending":
                continue
            for src in (p.spec(pvc).get("dataSource"), p.spec(pvc).get("dataSourceRef")):
                if (
                    src
                    and src.get("kind") == "VolumeSnapshot"
                    and src.get("name") == name
                    and src.get("apiGroup") == p.GROUP
                    and (src.get("namespace") in (None, ns))
                ):
                    return True
        return False

    async def _delete_snapshot(self, snap: Obj) -> None:
        ours = {p.SNAPSHOT_AS_SOURCE_FINALIZER, p.SNAPSHOT_BOUND_FINALIZER}
        if not ours & set(k.finalizers_of(snap)):
            await self._release_pvc(snap, skip_self=True)
            return
        content = self._content_for(snap)
        if content is not None and not p.spec(content).get("volumeSnapshotRef", {}).get("uid"):
            content = None  # pre-bound but never bound: not ours to touch
        if self._pvc_restoring_from(snap):
            raise Retry(f"snapshot {k.key_of(snap)} is being used to restore a PVC")
        await self._release_pvc(snap, skip_self=True)
        if content is not None and not await self._let_content_go(content):
            return
        await self.snapshot_writes.set_finalizers(snap, remove=ours)

    async def _let_content_go(self, content: Obj) -> bool:
        """Mark the content being-deleted (the snapshotter's go-ahead) and delete it under a
        Delete policy.  True when the snapshot may lose its finalizers now (Retain); under
        Delete the bound finalizer stays until the snapshotter has deleted the backend
        snapshot and the content is gone (its event wakes us)."""
        content = await self.content_writes.set_annotation(content, p.ANN_BEING_DELETED, "yes")
        if p.spec(content).get("deletionPolicy") != p.DELETE:
            return True
        await self.content_writes.delete(content, uid=True)
        return False

    # ------------------------------------------------------------ content sync

    async def sync_content(self, name: str) -> None:
        content = self.contents.get(name)
        if content is None:
            return
        ref = p.spec(content).get("volumeSnapshotRef") or {}
        if not ref.get("uid"):
            return  # pre-bound to a snapshot that has not claimed it yet
        if not k.is_deleting(content) and p.CONTENT_BOUND_FINALIZER not in k.finalizers_of(content):
            await self.content_writes.set_finalizers(content, add={p.CONTENT_BOUND_FINALIZER})
            return
        snap = self.snapshots.get(f"{ref.get('namespace')}/{ref.get('name')}")
        if snap is None or k.uid_of(snap) != ref.get("uid"):
            # Missing (or deleted and re-created with the same name): never let storage go
            # because a snapshot is missing -- not even when the content itself is deleted:
            # it may have been copied from another cluster that still uses the snapshot
            # (upstream's rule; such a content stays Terminating until an administrator
            # removes its finalizer).
            return
        if k.is_deleting(snap) and {p.SNAPSHOT_AS_SOURCE_FINALIZER, p.SNAPSHOT_BOUND_FINALIZER} & set(
            k.finalizers_of(snap)
        ):
            await self.content_writes.set_annotation(content, p.ANN_BEING_DELETED, "yes")


# ---------------------------------------------------------------------- wiring
# The loop's factory, listed in k8s/registry.py; kept by the wiring (the module's owner works above).


async def build(ctx: LoopContext) -> list[Planned]:
    """The snapshot controller (`--controllers snapshot-controller`): one per cluster, under its Lease."""
    a = ctx.args
    loop = SnapshotController(
        ctx.clients.api_for("snapshot-controller"),
        informers=ctx.clients.informers,
        workers=a.k8s_workers,
        resync_period=a.resync_period,
        distributed=a.distributed_snapshotting,
        events=ctx.clients.recorder("csi-kit-snapshot"),
        **ctx.timing,
    )
    return [Planned(loop, "snapshot-controller-leader")]
