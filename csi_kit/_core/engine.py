"""VolumeEngine: the road every request travels between the servicers and a backend.

For each RPC:  validate → lock the object's key → idempotency lookup in the
store → record intent → backend call → record the result (or roll back).

Backend work runs in a bounded thread pool, never on the event loop.  The
call is shielded from cancellation: if the caller's RPC is cancelled (a CO
timeout), the backend call still finishes and only *then* is the lock given
back, so a retry never overlaps a half-done operation — it gets ABORTED until
the first finishes, then sees its result through idempotency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import attrs

from csi_kit._core import timing
from csi_kit._core import validate as v
from csi_kit._core.locks import KeyLocks
from csi_kit._core.store import Attachment, PublishRecord, SnapshotRecord, Store, VolumeRecord
from csi_kit.backend import Backend, Capabilities, capabilities_of
from csi_kit.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unimplemented,
)
from csi_kit.linux import mounts, paths
from csi_kit.types import (
    CapacityRange,
    GroupSnapshot,
    PublishRequest,
    Snapshot,
    StageRequest,
    Topology,
    TopologyRequirement,
    Volume,
    VolumeCapability,
    VolumeCondition,
    VolumeRequest,
    VolumeStats,
)

__all__ = ["VolumeEngine", "ReconcileReport", "Page", "CapacityInfo", "ListedVolume", "NodeInfo"]

log = logging.getLogger("csi_kit.engine")
T = TypeVar("T")

#: The volume context key the kubelet sets on NodePublishVolume for a CSI inline (ephemeral) volume.
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
#: Keys under this prefix are the kubelet's information (pod name, ephemeral...), not parameters.
K8S_KEY_PREFIX = "csi.storage.k8s.io/"
#: An inline ephemeral volume's name in the store: this prefix and the kubelet's volume id.
EPHEMERAL_PREFIX = "ephemeral-"

#: ListVolumes / ListSnapshots answer at most this many entries when the
#: caller sets no max_entries (the spec lets the plugin choose).
DEFAULT_PAGE = 1000


@attrs.frozen
class Page:
    entries: tuple[object, ...]
    next_token: str


@attrs.frozen
class ListedVolume:
    volume: Volume
    published_node_ids: tuple[str, ...]
    condition: VolumeCondition | None


@attrs.frozen
class CapacityInfo:
    available_bytes: int
    maximum_volume_bytes: int | None
    minimum_volume_bytes: int


@attrs.frozen
class NodeInfo:
    node_id: str
    max_volumes_per_node: int
    topology: Topology | None


@attrs.frozen
class ReconcileReport:
    """What the start-up pass found and did."""

    cleaned_volumes: tuple[str, ...] = ()
    cleaned_snapshots: tuple[str, ...] = ()
    cleaned_groups: tuple[str, ...] = ()
    orphan_volumes: tuple[str, ...] = ()
    orphan_snapshots: tuple[str, ...] = ()
    missing_volumes: tuple[str, ...] = ()
    missing_snapshots: tuple[str, ...] = ()


def _new_id() -> str:
    return str(uuid.uuid4())


def _parse_token(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit() or len(token) > 19:
        raise Aborted(f"starting_token {token[:64]!r} is not valid; start again with an empty token")
    return int(token)


def _page_size(max_entries: int) -> int:
    if max_entries < 0:
        raise InvalidArgument(f"max_entries must not be negative, got {max_entries}")
    return max_entries or DEFAULT_PAGE


class VolumeEngine:
    """Serves the CSI operations for one backend instance."""

    def __init__(
        self,
        backend: Backend,
        store: Store,
        *,
        workers: int = 16,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.backend = backend
        self.backend_type = type(backend)
        self.store = store
        self.capabilities: Capabilities = capabilities_of(backend)
        self.locks = KeyLocks()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="csi-kit-backend")
        self._clock = clock
        self._node_topology = backend.node_topology()
        self._protected_paths: tuple[str, ...] | None = None
        if timing.ENABLED:
            self._time_parts()

    def _time_parts(self) -> None:
        """CSI_KIT_TIMING: count the backend's calls and the validation (`csi_kit._core.timing`)."""
        for name in dir(Backend):
            if not name.startswith("_") and callable(getattr(Backend, name)):
                setattr(self.backend, name, timing.timed("backend", getattr(self.backend, name)))
        for name in ("_validate_create", "_check_id", "_check_caller_path"):
            setattr(self, name, timing.timed("validation", getattr(self, name)))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _check_id(self, value: str, field: str) -> None:
        """The one id check before any backend sees a caller's id (`validate.check_id`)."""
        v.check_id(value, field, opaque=self.backend_type.opaque_ids)

    # -- plumbing ------------------------------------------------------------

    async def _run(
        self, fn: Callable[[], T], *, exclusive: Sequence[str] = (), shared: Sequence[str] = ()
    ) -> T:
        """Run ``fn`` in the pool holding the keys until it really finishes."""
        if timing.ENABLED:
            return await self._run_timed(fn, exclusive, shared)
        held = self.locks.acquire(exclusive, shared)
        loop = asyncio.get_running_loop()
        try:
            fut = loop.run_in_executor(self._pool, fn)
        except BaseException:
            self.locks.release(held)
            raise

        def done(f: asyncio.Future[T]) -> None:
            self.locks.release(held)
            if not f.cancelled():
                f.exception()  # retrieved: a cancelled caller must not leave it unreported

        fut.add_done_callback(done)
        return await asyncio.shield(fut)

    async def _run_timed(self, fn: Callable[[], T], exclusive: Sequence[str], shared: Sequence[str]) -> T:
        """`_run`, counting the lock and the two thread hand-offs (CSI_KIT_TIMING)."""
        start = timing.now()
        held = self.locks.acquire(exclusive, shared)
        timing.add("lock", timing.now() - start)
        loop = asyncio.get_running_loop()
        submitted = timing.now()
        ended = [0]

        def work() -> T:
            timing.add("hand-off to a worker", timing.now() - submitted)
            try:
                return fn()
            finally:
                ended[0] = timing.now()

        fut = loop.run_in_executor(self._pool, work)

        def done(f: asyncio.Future[T]) -> None:
            start = timing.now()
            self.locks.release(held)
            timing.add("lock", timing.now() - start)
            if not f.cancelled():
                f.exception()

        fut.add_done_callback(done)
        try:
            return await asyncio.shield(fut)
        finally:
            if ended[0]:
                timing.add("hand-off back to the loop", timing.now() - ended[0])

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the pool without a lock (reads)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def probe(self) -> bool:
        """Readiness: the backend's `probe`, on the loop when the backend says it is cheap."""
        if self.backend_type.cheap_probe:
            return bool(self.backend.probe())
        return bool(await self._call(self.backend.probe))

    def _require(self, flag: bool, what: str) -> None:
        if not flag:
            raise Unimplemented(f"{what} is not supported by the {self.backend_type.__name__} backend")

    # -- topology -------------------------------------------------------------

    def _accessible_here(self, requirement: TopologyRequirement | None) -> bool:
        """Whether a node-local volume made here satisfies the requirement."""
        if requirement is None or self._node_topology is None:
            return True
        wanted = requirement.requisite or requirement.preferred
        if not wanted:
            return True
        ours = self._node_topology.segments
        return any(all(topo.segments.get(k, val) == val for k, val in ours.items()) for topo in wanted)

    def _check_same_node(self, volume: Volume, what: str) -> None:
        if self._node_topology is None or not volume.topology:
            return
        if self._node_topology not in volume.topology:
            raise ResourceExhausted(
                f"{what} lives on another node ({volume.topology}); create the volume there"
            )

    # -- controller: volumes ---------------------------------------------------

    def _validate_create(self, req: VolumeRequest) -> None:
        b = self.backend_type
        v.check_name(req.name)
        v.check_capabilities(b, req.capabilities)
        v.check_capacity_range(req.capacity)
        v.check_parameters(b, req.parameters)
        v.check_map(req.secrets, "secrets")
        if req.mutable_parameters:
            if not self.capabilities.modify:
                raise InvalidArgument("mutable_parameters are not supported by this backend")
            v.check_map(req.mutable_parameters, "mutable_parameters")
        if req.source is not None:
            field = f"volume_content_source.{req.source.kind}.{req.source.kind}_id"
            self._check_id(req.source.id, field)
            if req.source.kind == "snapshot" and not self.capabilities.restore:
                raise InvalidArgument("creating a volume from a snapshot is not supported by this backend")
            if req.source.kind == "volume" and not self.capabilities.clone:
                raise InvalidArgument("cloning a volume is not supported by this backend")
        if req.accessibility is not None:
            for topo in (*req.accessibility.requisite, *req.accessibility.preferred):
                v.check_map(topo.segments, "accessibility_requirements")

    def _incompatibility(self, rec: VolumeRecord, req: VolumeRequest) -> str | None:
        vol = rec.volume
        if vol.source != req.source:
            return f"content source {vol.source} (requested {req.source})"
        if dict(vol.parameters) != dict(req.parameters):
            return "parameters"
        if dict(rec.mutable_parameters) != dict(req.mutable_parameters):
            return "mutable_parameters"
        if vol.access_type != req.access_type:
            return f"access type {vol.access_type}"
        cap = req.capacity
        if cap.required_bytes and vol.capacity_bytes < cap.required_bytes:
            return f"capacity {vol.capacity_bytes} bytes, below required_bytes {cap.required_bytes}"
        if cap.limit_bytes and vol.capacity_bytes > cap.limit_bytes:
            return f"capacity {vol.capacity_bytes} bytes, above limit_bytes {cap.limit_bytes}"
        if self.backend_type.node_local and not self._accessible_here(req.accessibility):
            return f"topology {[dict(t.segments) for t in vol.topology]}"
        return None

    async def create_volume(self, req: VolumeRequest) -> Volume:
        self._require(self.capabilities.create_delete_volume, "CreateVolume")
        self._validate_create(req)
        shared = [f"{req.source.kind}:{req.source.id}"] if req.source else []
        return await self._run(
            lambda: self._create_volume(req), exclusive=[f"volume-name:{req.name}"], shared=shared
        )

    def _create_volume(self, req: VolumeRequest) -> Volume:
        existing = self.store.volume_by_name(req.name)
        if existing is not None:
            if existing.state == "ready":
                problem = self._incompatibility(existing, req)
                if problem:
                    raise AlreadyExists(f"volume {req.name!r} already exists with a different {problem}")
                return existing.volume
            if existing.state == "deleting":
                raise Aborted(f"volume {req.name!r} is being deleted; retry later")
            # A creation that failed without being rolled back: finish the cleanup, start again.
            self._destroy_volume(existing.volume.volume_id)

        minimum = 0
        snapshot: Snapshot | None = None
        source_volume: Volume | None = None
        if req.source is not None and req.source.kind == "snapshot":
            srec = self.store.snapshot(req.source.id)
            if srec is None or srec.state != "ready":
                raise NotFound(f"source snapshot {req.source.id!r} does not exist")
            snapshot = srec.snapshot
            if not snapshot.ready_to_use:
                raise FailedPrecondition(f"source snapshot {req.source.id!r} is not ready to use yet")
            src = self.store.volume(snapshot.source_volume_id)
            if src is not None:
                self._check_same_node(src.volume, f"snapshot {snapshot.snapshot_id!r}")
            minimum = snapshot.size_bytes
        elif req.source is not None:
            vrec = self.store.volume(req.source.id)
            if vrec is None or vrec.state != "ready":
                raise NotFound(f"source volume {req.source.id!r} does not exist")
            source_volume = vrec.volume
            self._check_same_node(source_volume, f"volume {source_volume.volume_id!r}")
            if source_volume.access_type != req.access_type:
                raise InvalidArgument(
                    f"source volume {source_volume.volume_id!r} is a {source_volume.access_type} volume; "
                    f"cannot clone it as {req.access_type}"
                )
            minimum = source_volume.capacity_bytes
        if self.backend_type.node_local and not self._accessible_here(req.accessibility):
            raise ResourceExhausted(
                f"volumes of this driver live on the node that makes them ({self.backend.context.node_id}); "
                "the requested topology does not include it"
            )

        size = v.resolve_capacity(self.backend, req.capacity, minimum)
        request = attrs.evolve(req, capacity_bytes=size)
        volume = Volume(
            volume_id=_new_id(),
            name=req.name,
            capacity_bytes=size,
            access_type=req.access_type,
            parameters=req.parameters,
            source=req.source,
            topology=(self._node_topology,) if self._node_topology is not None else (),
            created_ns=self._clock(),
        )
        self.store.begin_volume(volume, req.mutable_parameters)
        try:
            if snapshot is not None:
                made = self.backend.restore_snapshot(volume.volume_id, request, snapshot)
            elif source_volume is not None:
                made = self.backend.clone_volume(volume.volume_id, request, source_volume)
            else:
                made = self.backend.create_volume(volume.volume_id, request)
            if made.capacity_bytes < size:
                raise Internal(f"backend made {made.capacity_bytes} bytes, less than the {size} asked for")
            if req.capacity.limit_bytes and made.capacity_bytes > req.capacity.limit_bytes:
                raise OutOfRange(
                    f"backend made {made.capacity_bytes} bytes, above limit_bytes {req.capacity.limit_bytes}"
                )
            if req.mutable_parameters:
                self.backend.modify_volume(volume, req.mutable_parameters)
        except BaseException:
            self._rollback_volume(volume.volume_id)
            raise
        self.store.finish_volume(volume.volume_id, made.capacity_bytes, made.context)
        return attrs.evolve(volume, capacity_bytes=made.capacity_bytes, context=made.context)

    def _rollback_volume(self, volume_id: str) -> None:
        try:
            self._destroy_volume(volume_id)
        except Exception:
            # Left as 'creating': the next start-up (or a retry by name) cleans it up.
            log.exception("rolling back volume %s failed; it will be cleaned up later", volume_id)

    def _destroy_volume(self, volume_id: str) -> None:
        self.store.set_volume_state(volume_id, "deleting")
        self.backend.delete_volume(volume_id)
        self.store.remove_volume(volume_id)

    async def delete_volume(self, volume_id: str) -> None:
        self._require(self.capabilities.create_delete_volume, "DeleteVolume")
        self._check_id(volume_id, "volume_id")
        await self._run(lambda: self._delete_volume(volume_id), exclusive=[f"volume:{volume_id}"])

    def _delete_volume(self, volume_id: str) -> None:
        rec = self.store.volume(volume_id)
        if rec is None:
            return
        users = []
        for use in self.store.publishes_of(volume_id):
            if mounts.is_mounted(use.target_path):
                users.append(use.target_path)
            else:  # a record outlived its mount (node reboot): forget it
                self.store.remove_publish(use.target_path)
        if users:
            raise FailedPrecondition(
                f"volume {volume_id!r} is still staged or published at {', '.join(users)}"
            )
        nodes = [a.node_id for a in self.store.attachments(volume_id)]
        if nodes:
            raise FailedPrecondition(f"volume {volume_id!r} is still published to node(s) {', '.join(nodes)}")
        self._destroy_volume(volume_id)

    def _volume(self, volume_id: str, field: str = "volume_id") -> Volume:
        rec = self.store.volume(volume_id)
        if rec is None or rec.state != "ready":
            raise NotFound(f"volume {volume_id!r} does not exist")
        return rec.volume

    async def controller_get_volume(self, volume_id: str) -> ListedVolume:
        self._require(self.capabilities.create_delete_volume, "ControllerGetVolume")
        self._check_id(volume_id, "volume_id")
        return await self._call(lambda: self._listed(self._volume(volume_id)))

    def _listed(self, volume: Volume) -> ListedVolume:
        nodes = tuple(a.node_id for a in self.store.attachments(volume.volume_id))
        condition = self.backend.volume_condition(volume) if self.capabilities.volume_condition else None
        return ListedVolume(volume, nodes, condition)

    async def list_volumes(self, max_entries: int, starting_token: str) -> Page:
        self._require(self.capabilities.create_delete_volume, "ListVolumes")
        after, limit = _parse_token(starting_token), _page_size(max_entries)

        def work() -> Page:
            if after > self.store.max_seq("volumes"):
                raise Aborted(
                    f"starting_token {starting_token!r} is not valid; start again with an empty token"
                )
            rows = self.store.list_volumes(after, limit + 1)
            more = len(rows) > limit
            rows = rows[:limit]
            token = str(rows[-1].seq) if more and rows else ""
            return Page(tuple(self._listed(r.volume) for r in rows), token)

        return await self._call(work)

    async def validate_volume_capabilities(
        self,
        volume_id: str,
        capabilities: Sequence[VolumeCapability],
        parameters: Mapping[str, str],
        mutable_parameters: Mapping[str, str],
    ) -> tuple[bool, str]:
        """Return (confirmed, message): whether the volume can serve all of them."""
        self._check_id(volume_id, "volume_id")
        v.require(list(capabilities), "volume_capabilities")
        for i, cap in enumerate(capabilities):
            if cap.access_type is None:
                raise InvalidArgument(f"volume_capabilities[{i}].access_type is required (mount or block)")
        volume = await self._call(lambda: self._volume(volume_id))
        try:
            v.check_capabilities(self.backend_type, capabilities)
        except InvalidArgument as e:
            return False, e.message
        if any(c.access_type != volume.access_type for c in capabilities):
            return False, f"volume {volume_id!r} is a {volume.access_type} volume"
        if parameters and dict(parameters) != dict(volume.parameters):
            return False, "the parameters differ from those the volume was created with"
        return True, ""

    async def expand_volume(
        self, volume_id: str, capacity: CapacityRange, capability: VolumeCapability | None
    ) -> tuple[int, bool]:
        self._require(self.capabilities.expand, "ControllerExpandVolume")
        self._check_id(volume_id, "volume_id")
        v.check_capacity_range(capacity)
        if not capacity.required_bytes and not capacity.limit_bytes:
            raise InvalidArgument("capacity_range is required")
        if capability is not None:
            v.check_capability(self.backend_type, capability)

        def work() -> tuple[int, bool]:
            volume = self._volume(volume_id)
            if capability is not None and capability.access_type != volume.access_type:
                raise InvalidArgument(f"volume {volume_id!r} is a {volume.access_type} volume")
            current = volume.capacity_bytes
            if capacity.limit_bytes and capacity.limit_bytes < current:
                raise OutOfRange(
                    f"limit_bytes {capacity.limit_bytes} is below the volume's size {current}; "
                    "volumes never shrink"
                )
            target = v.resolve_capacity(self.backend, capacity, current)
            result = self.backend.expand_volume(volume, target)
            if result.capacity_bytes != current:
                self.store.set_volume_capacity(volume_id, result.capacity_bytes)
            return result.capacity_bytes, result.node_expansion_required

        return await self._run(work, exclusive=[f"volume:{volume_id}"])

    async def get_capacity(
        self,
        capabilities: Sequence[VolumeCapability],
        parameters: Mapping[str, str],
        topology: Topology | None,
    ) -> CapacityInfo:
        self._require(self.capabilities.get_capacity, "GetCapacity")
        for i, cap in enumerate(capabilities):
            v.check_capability(self.backend_type, cap, f"volume_capabilities[{i}]")
        v.check_parameters(self.backend_type, parameters)
        b = self.backend_type
        if (
            topology is not None
            and topology.segments
            and not self._accessible_here(TopologyRequirement((topology,)))
        ):
            return CapacityInfo(0, 0, b.min_volume_bytes)
        available = await self._call(lambda: self.backend.get_capacity(parameters, capabilities))
        available = max(0, available)
        return CapacityInfo(available, self.backend.maximum_volume_size(available), b.min_volume_bytes)

    async def modify_volume(self, volume_id: str, mutable_parameters: Mapping[str, str]) -> None:
        self._require(self.capabilities.modify, "ControllerModifyVolume")
        self._check_id(volume_id, "volume_id")
        v.require(dict(mutable_parameters), "mutable_parameters")
        v.check_map(mutable_parameters, "mutable_parameters")

        def work() -> None:
            rec = self.store.volume(volume_id)
            if rec is None or rec.state != "ready":
                raise NotFound(f"volume {volume_id!r} does not exist")
            self.backend.modify_volume(rec.volume, mutable_parameters)
            self.store.set_volume_mutable(volume_id, {**rec.mutable_parameters, **mutable_parameters})

        await self._run(work, exclusive=[f"volume:{volume_id}"])

    # -- controller publish ------------------------------------------------------

    async def controller_publish(
        self, volume_id: str, node_id: str, cap: VolumeCapability | None, readonly: bool
    ) -> Mapping[str, str]:
        self._require(self.capabilities.controller_publish, "ControllerPublishVolume")
        self._check_id(volume_id, "volume_id")
        v.require(node_id, "node_id")
        if cap is None:
            raise InvalidArgument("volume_capability is required")
        v.check_capability(self.backend_type, cap)
        capability = cap

        def work() -> Mapping[str, str]:
            volume = self._volume(volume_id)
            if self.backend_type.node_local and node_id != self.backend.context.node_id:
                raise NotFound(f"node {node_id!r} does not exist for this node-local volume")
            for att in self.store.attachments(volume_id):
                if att.node_id == node_id:
                    if att.readonly == readonly and att.access_mode == capability.access_mode:
                        return att.context
                    raise AlreadyExists(
                        f"volume {volume_id!r} is published to {node_id!r} with other options"
                    )
                if capability.mode.single_node:
                    raise FailedPrecondition(
                        f"volume {volume_id!r} is already published to node {att.node_id!r}"
                    )
            context = self.backend.controller_publish(volume, node_id, capability, readonly)
            self.store.record_attachment(
                Attachment(volume_id, node_id, readonly, capability.access_mode, context)
            )
            return context

        return await self._run(work, exclusive=[f"volume:{volume_id}"])

    async def controller_unpublish(self, volume_id: str, node_id: str) -> None:
        self._require(self.capabilities.controller_publish, "ControllerUnpublishVolume")
        self._check_id(volume_id, "volume_id")

        def work() -> None:
            for att in self.store.attachments(volume_id):
                if not node_id or att.node_id == node_id:
                    self.backend.controller_unpublish(volume_id, att.node_id)
                    self.store.remove_attachment(volume_id, att.node_id)

        await self._run(work, exclusive=[f"volume:{volume_id}"])

    # -- snapshots ------------------------------------------------------------------

    async def create_snapshot(
        self, name: str, source_volume_id: str, parameters: Mapping[str, str]
    ) -> Snapshot:
        self._require(self.capabilities.snapshots, "CreateSnapshot")
        v.check_name(name)
        self._check_id(source_volume_id, "source_volume_id")
        v.check_map(parameters, "parameters")
        return await self._run(
            lambda: self._create_snapshot(name, source_volume_id, parameters),
            exclusive=[f"snapshot-name:{name}"],
            shared=[f"volume:{source_volume_id}"],
        )

    def _create_snapshot(self, name: str, source_volume_id: str, parameters: Mapping[str, str]) -> Snapshot:
        existing = self.store.snapshot_by_name(name)
        if existing is not None:
            if existing.state == "ready":
                if existing.snapshot.source_volume_id != source_volume_id:
                    raise AlreadyExists(
                        f"snapshot {name!r} already exists for volume {existing.snapshot.source_volume_id!r}"
                    )
                if existing.snapshot.group_snapshot_id:
                    raise AlreadyExists(f"snapshot {name!r} already exists as part of a group snapshot")
                return existing.snapshot
            if existing.state == "deleting":
                raise Aborted(f"snapshot {name!r} is being deleted; retry later")
            self._destroy_snapshot(existing.snapshot.snapshot_id)
        source = self._volume(source_volume_id)
        snap = Snapshot(
            snapshot_id=_new_id(),
            name=name,
            source_volume_id=source_volume_id,
            size_bytes=source.capacity_bytes,
            created_ns=self._clock(),
            ready_to_use=False,
            parameters=parameters,
        )
        self.store.begin_snapshot(snap)
        try:
            made = self.backend.create_snapshot(snap.snapshot_id, source, parameters)
        except BaseException:
            self._rollback_snapshot(snap.snapshot_id)
            raise
        self.store.finish_snapshot(snap.snapshot_id, made.size_bytes, made.ready_to_use)
        return attrs.evolve(snap, size_bytes=made.size_bytes, ready_to_use=made.ready_to_use)

    def _rollback_snapshot(self, snapshot_id: str) -> None:
        try:
            self._destroy_snapshot(snapshot_id)
        except Exception:
            log.exception("rolling back snapshot %s failed; it will be cleaned up later", snapshot_id)

    def _destroy_snapshot(self, snapshot_id: str) -> None:
        self.store.set_snapshot_state(snapshot_id, "deleting")
        self.backend.delete_snapshot(snapshot_id)
        self.store.remove_snapshot(snapshot_id)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        self._require(self.capabilities.snapshots, "DeleteSnapshot")
        self._check_id(snapshot_id, "snapshot_id")

        def work() -> None:
            rec = self.store.snapshot(snapshot_id)
            if rec is None:
                return
            if rec.snapshot.group_snapshot_id:
                raise InvalidArgument(
                    f"snapshot {snapshot_id!r} is part of group snapshot {rec.snapshot.group_snapshot_id!r}; "
                    "delete the group instead"
                )
            self._destroy_snapshot(snapshot_id)

        await self._run(work, exclusive=[f"snapshot:{snapshot_id}"])

    async def get_snapshot(self, snapshot_id: str) -> Snapshot:
        self._require(self.capabilities.snapshots, "GetSnapshot")
        self._check_id(snapshot_id, "snapshot_id")

        def work() -> Snapshot:
            rec = self.store.snapshot(snapshot_id)
            if rec is None or rec.state != "ready":
                raise NotFound(f"snapshot {snapshot_id!r} does not exist")
            return rec.snapshot

        return await self._call(work)

    async def list_snapshots(
        self, max_entries: int, starting_token: str, snapshot_id: str = "", source_volume_id: str = ""
    ) -> Page:
        self._require(self.capabilities.snapshots, "ListSnapshots")
        after, limit = _parse_token(starting_token), _page_size(max_entries)
        if snapshot_id and ("\x00" in snapshot_id or len(snapshot_id.encode()) > v.MAX_STRING):
            return Page((), "")

        def work() -> Page:
            rows: list[SnapshotRecord] = self.store.list_snapshots(
                after, limit + 1, snapshot_id=snapshot_id, source_volume_id=source_volume_id
            )
            if after > self.store.max_seq("snapshots"):
                raise Aborted(
                    f"starting_token {starting_token!r} is not valid; start again with an empty token"
                )
            more = len(rows) > limit
            rows = rows[:limit]
            token = str(rows[-1].seq) if more and rows else ""
            return Page(tuple(r.snapshot for r in rows), token)

        return await self._call(work)

    # -- group snapshots -------------------------------------------------------------

    async def create_group_snapshot(
        self, name: str, source_volume_ids: Sequence[str], parameters: Mapping[str, str]
    ) -> GroupSnapshot:
        self._require(self.capabilities.group_snapshots, "CreateVolumeGroupSnapshot")
        v.check_name(name)
        v.require(list(source_volume_ids), "source_volume_ids")
        for i, vid in enumerate(source_volume_ids):
            self._check_id(vid, f"source_volume_ids[{i}]")
        if len(set(source_volume_ids)) != len(source_volume_ids):
            raise InvalidArgument("source_volume_ids lists a volume more than once")
        v.check_map(parameters, "parameters")
        sources = list(source_volume_ids)
        return await self._run(
            lambda: self._create_group(name, sources, parameters),
            exclusive=[f"group-name:{name}"],
            shared=[f"volume:{s}" for s in sources],
        )

    def _create_group(self, name: str, sources: list[str], parameters: Mapping[str, str]) -> GroupSnapshot:
        existing = self.store.group_by_name(name)
        if existing is not None:
            if existing.state == "ready":
                if sorted(existing.source_volume_ids) != sorted(sources):
                    raise AlreadyExists(f"group snapshot {name!r} already exists with other source volumes")
                return self.store.group_snapshot(existing)
            if existing.state == "deleting":
                raise Aborted(f"group snapshot {name!r} is being deleted; retry later")
            self._destroy_group(existing.group_snapshot_id)
        volumes = []
        for vid in sources:
            rec = self.store.volume(vid)
            if rec is None or rec.state != "ready":
                raise NotFound(f"source volume {vid!r} does not exist")
            volumes.append(rec.volume)
        group_id = _new_id()
        now = self._clock()
        members = [
            Snapshot(
                snapshot_id=_new_id(),
                name=f"{name}/{vol.volume_id}",
                source_volume_id=vol.volume_id,
                size_bytes=vol.capacity_bytes,
                created_ns=now,
                ready_to_use=False,
                group_snapshot_id=group_id,
                parameters=parameters,
            )
            for vol in volumes
        ]
        self.store.begin_group(group_id, name, members, parameters, now)
        try:
            made = self.backend.create_group_snapshot(
                group_id, [(m.snapshot_id, vol) for m, vol in zip(members, volumes, strict=False)], parameters
            )
            if len(made) != len(members):
                raise Internal(f"backend returned {len(made)} snapshots for a group of {len(members)}")
        except BaseException:
            try:
                self._destroy_group(group_id)
            except Exception:
                log.exception("rolling back group snapshot %s failed; it will be cleaned up later", group_id)
            raise
        self.store.finish_group(
            group_id,
            {m.snapshot_id: (r.size_bytes, r.ready_to_use) for m, r in zip(members, made, strict=False)},
        )
        record = self.store.group(group_id)
        assert record is not None
        return self.store.group_snapshot(record)

    def _destroy_group(self, group_id: str) -> None:
        self.store.set_group_state(group_id, "deleting")
        for member in self.store.group_members(group_id):
            self.backend.delete_snapshot(member.snapshot.snapshot_id)
        self.store.remove_group(group_id)

    def _check_members(self, group_id: str, snapshot_ids: Sequence[str]) -> None:
        members = {m.snapshot.snapshot_id for m in self.store.group_members(group_id)}
        if set(snapshot_ids) != members:
            raise InvalidArgument(
                f"snapshot_ids do not match the members of group snapshot {group_id!r} "
                f"({len(members)} snapshots)"
            )

    async def delete_group_snapshot(self, group_id: str, snapshot_ids: Sequence[str]) -> None:
        self._require(self.capabilities.group_snapshots, "DeleteVolumeGroupSnapshot")
        self._check_id(group_id, "group_snapshot_id")

        def work() -> None:
            rec = self.store.group(group_id)
            if rec is None:
                # Gone already (or never made): deleting it is done, whatever snapshot_ids says —
                # csi-sanity sends an unknown id with no snapshot_ids and expects OK.
                return
            v.require(list(snapshot_ids), "snapshot_ids")
            self._check_members(group_id, snapshot_ids)
            self._destroy_group(group_id)

        await self._run(work, exclusive=[f"group:{group_id}"])

    async def get_group_snapshot(self, group_id: str, snapshot_ids: Sequence[str]) -> GroupSnapshot:
        self._require(self.capabilities.group_snapshots, "GetVolumeGroupSnapshot")
        self._check_id(group_id, "group_snapshot_id")

        def work() -> GroupSnapshot:
            rec = self.store.group(group_id)
            if rec is None or rec.state != "ready":
                raise NotFound(f"group snapshot {group_id!r} does not exist")
            if snapshot_ids:
                self._check_members(group_id, snapshot_ids)
            return self.store.group_snapshot(rec)

        return await self._call(work)

    # -- node -----------------------------------------------------------------------

    def node_info(self) -> NodeInfo:
        return NodeInfo(
            self.backend.context.node_id, self.backend_type.max_volumes_per_node, self._node_topology
        )

    def _check_node_volume(self, volume_id: str) -> None:
        if not self.backend.volume_exists(volume_id):
            raise NotFound(f"volume {volume_id!r} does not exist on this node")

    def _protected(self) -> tuple[str, ...]:
        """The driver's state directory and the backend's own roots, as real paths (computed once)."""
        if self._protected_paths is None:
            roots = [self.backend.context.state_dir, *self.backend.protected_paths()]
            self._protected_paths = tuple(sorted({os.path.realpath(r) for r in roots if r}))
        return self._protected_paths

    def _check_caller_path(self, value: str, field: str) -> str:
        """A caller's node path: lexically valid (`validate.check_path`) and clear of the driver's own roots.

        A path inside the state directory or a backend root would mount one
        volume over another (or over the driver's data); a path above one
        would hide the driver's roots from itself.  Symlinks are refused where
        the path is opened (`csi_kit.linux.paths`).
        """
        path = v.check_path(value, field)
        for root in self._protected():
            if path == root or path.startswith(root + "/") or root.startswith(path + "/"):
                raise InvalidArgument(f"{field} {path} overlaps the driver's own directory {root}")
        return path

    def _node_capability(
        self, cap: VolumeCapability | None, field: str = "volume_capability"
    ) -> VolumeCapability:
        if cap is None:
            raise InvalidArgument(f"{field} is required")
        if cap.access_type is None:
            raise InvalidArgument(f"{field}.access_type is required (mount or block)")
        try:
            v.check_capability(self.backend_type, cap, field)
        except InvalidArgument as e:
            raise FailedPrecondition(e.message) from None
        return cap

    def _check_volume_type(self, volume_id: str, cap: VolumeCapability) -> None:
        rec = self.store.volume(volume_id)
        if rec is not None and rec.volume.access_type != cap.access_type:
            raise FailedPrecondition(
                f"volume {volume_id!r} is a {rec.volume.access_type} volume; "
                f"it cannot be used with {cap.access_type} access"
            )

    @staticmethod
    def _same_use(rec: PublishRecord, cap: VolumeCapability, readonly: bool) -> bool:
        return (
            rec.readonly == readonly
            and rec.access_type == cap.access_type
            and rec.access_mode == cap.access_mode
            and rec.fs_type == cap.fs_type
            and rec.mount_flags == (cap.mount.mount_flags if cap.mount else ())
        )

    @staticmethod
    def _record(
        kind: str, volume_id: str, path: str, cap: VolumeCapability, readonly: bool, created: bool = False
    ) -> PublishRecord:
        return PublishRecord(
            target_path=path,
            volume_id=volume_id,
            kind=kind,  # type: ignore[arg-type]
            readonly=readonly,
            access_type=cap.access_type or "",
            access_mode=cap.access_mode,
            fs_type=cap.fs_type,
            mount_flags=cap.mount.mount_flags if cap.mount else (),
            created=created,
        )

    @staticmethod
    def _mounted_here(path: str, field: str) -> tuple[int, int] | None:
        """The identity of what is mounted at exactly `path` (no symlink followed), or None if nothing is."""
        if not mounts.is_mounted(path):
            return None
        return paths.identity(path, field=field)

    def _check_ours(self, rec: PublishRecord, field: str) -> bool:
        """Whether the recorded stage/publish is mounted now; FAILED_PRECONDITION if something else is.

        A record without an identity is one whose mount a crash interrupted:
        whatever is there is left to the backend, which made it.
        """
        here = self._mounted_here(rec.target_path, field)
        if here is None:
            return False
        if rec.identity is not None and here != rec.identity:
            raise FailedPrecondition(
                f"{field} {rec.target_path} shows something other than volume {rec.volume_id!r} "
                "(mounted over it since?); refusing to touch it"
            )
        return True

    def _begin(self, rec: PublishRecord, field: str) -> PublishRecord:
        """Record a stage/publish before the backend mounts, so a crash leaves a row to undo it by."""
        existing = self.store.publish_at(rec.target_path)
        here = self._mounted_here(rec.target_path, field)
        if here is not None and (existing is None or existing.volume_id != rec.volume_id):
            raise FailedPrecondition(
                f"{field} {rec.target_path} is already a mount point that this driver did not make for "
                f"volume {rec.volume_id!r}"
            )
        if existing is not None and existing.volume_id == rec.volume_id and existing.created:
            rec = attrs.evolve(rec, created=True)  # a retry: the target is still the one we made
        self.store.record_publish(rec)
        return rec

    def _finish(self, rec: PublishRecord, field: str) -> None:
        self.store.record_publish(attrs.evolve(rec, identity=paths.identity(rec.target_path, field=field)))

    def _forget(self, rec: PublishRecord, field: str) -> None:
        """Drop a record whose mount failed or was undone, removing the target if the framework made it."""
        if rec.created:
            self._undo(lambda: paths.remove_target(rec.target_path, field=field))
        self.store.remove_publish(rec.target_path)

    @staticmethod
    def _check_untouched(path: str, field: str) -> None:
        """For a path this driver has no record of: refuse a symlink, otherwise touch nothing."""
        try:
            st = paths.lstat(path, field=field)
        except NotFound:
            return
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise InvalidArgument(f"{field} {path} is a symlink; symlinks are not followed in caller paths")

    async def node_stage(self, req: StageRequest) -> None:
        self._require(self.capabilities.node_stage, "NodeStageVolume")
        self._check_id(req.volume_id, "volume_id")
        staging = self._check_caller_path(req.staging_path, "staging_target_path")
        cap = self._node_capability(req.capability)
        req = attrs.evolve(req, staging_path=staging)
        await self._run(lambda: self._stage(req, cap), exclusive=[f"node-volume:{req.volume_id}"])

    def _stage(self, req: StageRequest, cap: VolumeCapability) -> None:
        field, staging = "staging_target_path", req.staging_path
        self._check_node_volume(req.volume_id)
        self._check_volume_type(req.volume_id, cap)
        st = paths.lstat(staging, field=field)
        if st is None:
            raise NotFound(f"{field} {staging} does not exist")
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{field} {staging} is not a directory")
        rec = self.store.publish_at(staging)
        if rec is not None and rec.kind == "stage" and self._check_ours(rec, field):
            if rec.volume_id == req.volume_id and self._same_use(rec, cap, False):
                if rec.identity is None:
                    self._finish(rec, field)
                return
            raise AlreadyExists(
                f"staging path {staging} already holds volume {rec.volume_id!r} staged differently"
            )
        for other in self.store.publishes_of(req.volume_id):
            if (
                other.kind == "stage"
                and other.target_path != staging
                and mounts.is_mounted(other.target_path)
            ):
                raise FailedPrecondition(f"volume {req.volume_id!r} is already staged at {other.target_path}")
        rec = self._begin(self._record("stage", req.volume_id, staging, cap, False), field)
        try:
            self.backend.node_stage(req)
        except BaseException:
            self._undo(lambda: self.backend.node_unstage(req.volume_id, staging))
            self._forget(rec, field)
            raise
        self._finish(rec, field)

    async def node_unstage(self, volume_id: str, staging_path: str) -> None:
        self._require(self.capabilities.node_stage, "NodeUnstageVolume")
        self._check_id(volume_id, "volume_id")
        staging = self._check_caller_path(staging_path, "staging_target_path")
        await self._run(lambda: self._unstage(volume_id, staging), exclusive=[f"node-volume:{volume_id}"])

    def _unstage(self, volume_id: str, staging: str) -> None:
        field = "staging_target_path"
        rec = self.store.publish_at(staging)
        if rec is None or rec.kind != "stage" or rec.volume_id != volume_id:
            # Not staged there by this driver: nothing of ours to undo (the spec's OK).
            self._check_untouched(staging, field)
            return
        for pub in self.store.publishes_of(volume_id):
            if pub.kind == "publish" and mounts.is_mounted(pub.target_path):
                raise FailedPrecondition(
                    f"volume {volume_id!r} is still published at {pub.target_path}; unpublish it first"
                )
        self._check_ours(rec, field)
        self.backend.node_unstage(volume_id, staging)
        self._forget(rec, field)

    async def node_publish(self, req: PublishRequest) -> None:
        self._require(self.capabilities.node_publish, "NodePublishVolume")
        self._check_id(req.volume_id, "volume_id")
        target = self._check_caller_path(req.target_path, "target_path")
        cap = self._node_capability(req.capability)
        if req.volume_context.get(EPHEMERAL_KEY) == "true":
            await self._publish_ephemeral(attrs.evolve(req, target_path=target), cap)
            return
        staging = ""
        if self.capabilities.node_stage:
            if not req.staging_path:
                raise FailedPrecondition("staging_target_path is required: this driver stages volumes first")
            staging = self._check_caller_path(req.staging_path, "staging_target_path")
        elif req.staging_path:
            staging = self._check_caller_path(req.staging_path, "staging_target_path")
        req = attrs.evolve(req, target_path=target, staging_path=staging)
        await self._run(lambda: self._publish(req, cap), exclusive=[f"node-volume:{req.volume_id}"])

    def _publish(self, req: PublishRequest, cap: VolumeCapability) -> None:
        field, target, staging = "target_path", req.target_path, req.staging_path
        if cap.mode.read_only and not req.readonly and cap.access_type == "mount":
            # A reader-only mode is published read-only whatever the flag says.
            req = attrs.evolve(req, readonly=True)
        self._check_node_volume(req.volume_id)
        self._check_volume_type(req.volume_id, cap)
        if self.capabilities.node_stage:
            stage = self.store.publish_at(staging)
            if stage is None or stage.volume_id != req.volume_id or not mounts.is_mounted(staging):
                raise FailedPrecondition(f"volume {req.volume_id!r} is not staged at {staging}")
        rec = self.store.publish_at(target)
        if rec is not None and rec.kind == "publish" and self._check_ours(rec, field):
            if rec.volume_id == req.volume_id and self._same_use(rec, cap, req.readonly):
                if rec.identity is None:
                    self._finish(rec, field)
                return
            raise AlreadyExists(
                f"target path {target} already has volume {rec.volume_id!r} published with other options"
            )
        others = [
            p
            for p in self.store.publishes_of(req.volume_id)
            if p.kind == "publish" and p.target_path != target and mounts.is_mounted(p.target_path)
        ]
        if others and cap.access_mode == 6:  # SINGLE_NODE_SINGLE_WRITER: one workload at a time
            raise FailedPrecondition(
                f"volume {req.volume_id!r} is SINGLE_NODE_SINGLE_WRITER and already published at "
                f"{others[0].target_path}"
            )
        # The framework makes the target (a directory, or a file for a block volume) with no
        # symlink followed, and remembers that it did: unpublish removes only what it made.
        rec = self._begin(self._record("publish", req.volume_id, target, cap, req.readonly), field)
        if paths.make_target(target, directory=not cap.is_block, field=field):
            rec = attrs.evolve(rec, created=True)
            self.store.record_publish(rec)
        try:
            self.backend.node_publish(req)
        except BaseException:
            self._undo(lambda: self.backend.node_unpublish(req.volume_id, target))
            self._forget(rec, field)
            raise
        self._finish(rec, field)

    async def node_unpublish(self, volume_id: str, target_path: str) -> None:
        self._require(self.capabilities.node_publish, "NodeUnpublishVolume")
        self._check_id(volume_id, "volume_id")
        target = self._check_caller_path(target_path, "target_path")

        def work() -> None:
            internal = self._ephemeral_id(volume_id)
            if internal is None:
                self._unpublish(volume_id, target)
            else:
                self._unpublish_ephemeral(internal, target)

        await self._run(work, exclusive=[f"node-volume:{volume_id}"])

    def _unpublish(self, volume_id: str, target: str) -> None:
        field = "target_path"
        rec = self.store.publish_at(target)
        if rec is None or rec.kind != "publish":
            # Never published there by this driver: nothing of ours to undo (the spec's OK).
            self._check_untouched(target, field)
            return
        if rec.volume_id != volume_id:
            if mounts.is_mounted(target):
                raise FailedPrecondition(
                    f"target path {target} holds volume {rec.volume_id!r}, not {volume_id!r}"
                )
            self._check_untouched(target, field)
            return
        self._check_ours(rec, field)
        self.backend.node_unpublish(volume_id, target)
        if mounts.is_mounted(target):
            raise Internal(f"target path {target} is still mounted after the backend's unpublish")
        self._forget(rec, field)

    # -- inline ephemeral volumes ----------------------------------------------------
    # A pod's `csi:` volume: the kubelet calls NodePublishVolume with its own volume id
    # (csi-<hash>), EPHEMERAL_KEY in the volume context and the pod's volumeAttributes, and
    # never stages.  The volume is made (and staged, for a backend that stages) right here
    # and unmade by NodeUnpublishVolume.  It is recorded under the name "ephemeral-<kubelet
    # id>", so every node RPC that carries the kubelet's id finds it, a retried publish is
    # idempotent, and a crash is finished like any other half-made volume.

    def _ephemeral_id(self, volume_id: str) -> str | None:
        """The id of the volume made for the kubelet's inline-volume id, or None."""
        rec = self.store.volume_by_name(EPHEMERAL_PREFIX + volume_id)
        return rec.volume.volume_id if rec is not None and rec.state == "ready" else None

    def _ephemeral_staging(self, volume_id: str) -> str:
        return os.path.join(self.backend.context.state_dir, "ephemeral", volume_id)

    async def _publish_ephemeral(self, req: PublishRequest, cap: VolumeCapability) -> None:
        self._require(self.capabilities.create_delete_volume, "inline ephemeral volumes (CreateVolume)")
        if cap.is_block:
            raise InvalidArgument(
                "inline ephemeral volumes are filesystem volumes; block access is not offered"
            )
        attributes = {k: val for k, val in req.volume_context.items() if not k.startswith(K8S_KEY_PREFIX)}
        size = v.parse_size(attributes.pop("size"), "volume_context size") if "size" in attributes else 0
        vreq = VolumeRequest(
            name=EPHEMERAL_PREFIX + req.volume_id,
            capacity_bytes=0,
            capacity=CapacityRange(size, 0),
            capabilities=(cap,),
            parameters=attributes,
        )
        self._validate_create(vreq)

        def work() -> None:
            volume = self._create_volume(vreq)
            staging = ""
            try:
                if self.capabilities.node_stage:
                    staging = self._ephemeral_staging(volume.volume_id)
                    os.makedirs(staging, 0o700, exist_ok=True)
                    self._stage(
                        StageRequest(volume.volume_id, staging, cap, volume_context=volume.context), cap
                    )
                self._publish(
                    attrs.evolve(
                        req, volume_id=volume.volume_id, staging_path=staging, volume_context=volume.context
                    ),
                    cap,
                )
            except BaseException:
                # The kubelet retries the publish from scratch: leave nothing half-made behind.
                self._undo(lambda: self._unmake_ephemeral(volume.volume_id))
                raise

        await self._run(work, exclusive=[f"node-volume:{req.volume_id}", f"volume-name:{vreq.name}"])

    def _unpublish_ephemeral(self, volume_id: str, target: str) -> None:
        self._unpublish(volume_id, target)
        if not any(p.kind == "publish" for p in self.store.publishes_of(volume_id)):
            self._unmake_ephemeral(volume_id)

    def _unmake_ephemeral(self, volume_id: str) -> None:
        for rec in self.store.publishes_of(volume_id):
            if rec.kind == "stage":
                self._unstage(volume_id, rec.target_path)
        if self.capabilities.node_stage:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(self._ephemeral_staging(volume_id))
        self._delete_volume(volume_id)

    def _shows_volume(self, volume_id: str, path: str, field: str) -> bool:
        """Whether `path` is a mount point showing one of this volume's stages or publishes.

        A recorded path qualifies, and so does another mount of the same thing:
        the kubelet asks for a block volume's stats at its own bind of the
        published device file (…/volumeDevices/<pv>/dev/<pod uid>).
        """
        here = self._mounted_here(path, field)
        if here is None:
            return False
        for rec in self.store.publishes_of(volume_id):
            if rec.target_path == path and rec.identity in (None, here):
                return True
            if rec.identity == here:
                return True
        return False

    def _check_stats_volume(self, volume_id: str) -> None:
        """A volume known here: the backend has it, or this driver staged or published it.

        A published volume whose storage vanished underneath (directory removed,
        image deleted) is still asked about: its stats are where the kubelet
        learns of the abnormal condition, which NOT_FOUND would hide.
        """
        if not self.backend.volume_exists(volume_id) and not self.store.publishes_of(volume_id):
            raise NotFound(f"volume {volume_id!r} does not exist on this node")

    async def node_stats(self, volume_id: str, volume_path: str, staging_path: str = "") -> VolumeStats:
        self._require(self.capabilities.node_stats, "NodeGetVolumeStats")
        self._check_id(volume_id, "volume_id")
        # csi-sanity's order: a missing path is INVALID_ARGUMENT, then an unknown volume is
        # NOT_FOUND whatever the path is (it sends the relative "some/path").
        v.require(volume_path, "volume_path")
        volume_id = await self._call(lambda: self._ephemeral_id(volume_id) or volume_id)
        await self._call(lambda: self._check_stats_volume(volume_id))
        path = self._check_caller_path(volume_path, "volume_path")
        if staging_path:
            self._check_caller_path(staging_path, "staging_target_path")

        def work() -> VolumeStats:
            if not self._shows_volume(volume_id, path, "volume_path"):
                raise NotFound(f"volume {volume_id!r} is not published or staged at {path}")
            return self.backend.node_stats(volume_id, path)

        return await self._call(work)

    async def node_expand(
        self,
        volume_id: str,
        volume_path: str,
        capacity: CapacityRange,
        staging_path: str,
        capability: VolumeCapability | None,
    ) -> int:
        self._require(self.capabilities.node_expand, "NodeExpandVolume")
        self._check_id(volume_id, "volume_id")
        v.require(volume_path, "volume_path")
        await self._call(lambda: self._check_node_volume(volume_id))
        path = self._check_caller_path(volume_path, "volume_path")
        if staging_path:
            self._check_caller_path(staging_path, "staging_target_path")
        v.check_capacity_range(capacity)
        if capability is not None:
            v.check_capability(self.backend_type, capability)

        def work() -> int:
            self._check_node_volume(volume_id)
            if not self._shows_volume(volume_id, path, "volume_path"):
                raise NotFound(f"volume {volume_id!r} is not published or staged at {path}")
            rec = self.store.volume(volume_id)
            size = capacity.required_bytes or (rec.volume.capacity_bytes if rec else 0)
            if capacity.limit_bytes and size > capacity.limit_bytes:
                raise OutOfRange(f"required_bytes {size} is above limit_bytes {capacity.limit_bytes}")
            return self.backend.node_expand(volume_id, path, size, capability)

        return await self._run(work, exclusive=[f"node-volume:{volume_id}"])

    @staticmethod
    def _undo(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("undoing a failed node operation failed")

    # -- start-up --------------------------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        """Finish what a crash interrupted and compare the store with the backend.

        Rows left ``creating`` or ``deleting`` are objects whose creation was
        never acknowledged or whose deletion was asked for: destroying them is
        always safe.  Backend objects with no row at all are reported, not
        removed — the store records every object before it is made, so such an
        object is not one of ours in progress and deleting it could lose data.
        """
        cleaned_v, cleaned_s, cleaned_g = [], [], []
        for grec in self.store.groups_in_state("creating", "deleting"):
            self._destroy_group(grec.group_snapshot_id)
            cleaned_g.append(grec.group_snapshot_id)
        for srec in self.store.snapshots_in_state("creating", "deleting"):
            self._destroy_snapshot(srec.snapshot.snapshot_id)
            cleaned_s.append(srec.snapshot.snapshot_id)
        for vrec in self.store.volumes_in_state("creating", "deleting"):
            self._destroy_volume(vrec.volume.volume_id)
            cleaned_v.append(vrec.volume.volume_id)
        report = ReconcileReport(
            cleaned_volumes=tuple(cleaned_v),
            cleaned_snapshots=tuple(cleaned_s),
            cleaned_groups=tuple(cleaned_g),
        )
        inventory = self.backend.inventory()
        if inventory is not None:
            known_v, known_s = self.store.volume_ids(), self.store.snapshot_ids()
            report = attrs.evolve(
                report,
                orphan_volumes=tuple(sorted(inventory.volume_ids - known_v)),
                orphan_snapshots=tuple(sorted(inventory.snapshot_ids - known_s)),
                missing_volumes=tuple(sorted(known_v - inventory.volume_ids)),
                missing_snapshots=tuple(sorted(known_s - inventory.snapshot_ids)),
            )
        for what, ids in attrs.asdict(report).items():
            if ids:
                log.warning("reconcile: %s: %s", what.replace("_", " "), ", ".join(ids))
        return report
