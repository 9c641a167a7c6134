"""The SnapshotMetadata road: GetMetadataAllocated and GetMetadataDelta.

These two RPCs differ from every other CSI call: the answer is a *stream*
that may be long (a changed-block list of a large volume) and that the
client may abandon at any point.  They travel the engine's road with the
engine's store, worker pool and key locks, in this order:

1. validate the request (`check_id` on every snapshot id, ``max_results``
   not negative, ``starting_offset`` not negative: OUT_OF_RANGE, as the
   spec's error table says);
2. take the snapshots' keys *shared* for the whole stream: a DeleteSnapshot
   (which needs a key alone) answers ABORTED while a stream reads it, and a
   stream on a snapshot being deleted answers ABORTED too;
3. look the snapshots up in the store (NOT_FOUND unless recorded and ready;
   a delta needs both of one volume: INVALID_ARGUMENT), then check
   ``starting_offset`` against the snapshot's size (OUT_OF_RANGE past it;
   *at* the size is an empty answer, what a client resuming after the last
   range sends);
4. call the backend hook in the pool; it answers a lazy iterator of ranges;
5. pull the iterator a chunk at a time in the pool (at most ``max_results``
   ranges per message, `DEFAULT_MAX_RESULTS` when 0), checking what the
   backend yields: ascending, not overlapping, positive, inside the
   capacity, constant length for FIXED_LENGTH.  Ranges that end at or
   before ``starting_offset`` are dropped here, so backends may start from
   the block that holds it.  A broken answer ends the stream with INTERNAL
   (the spec wants an error, never a silently wrong list).

When the stream ends -- completed, failed, or cancelled by the client --
the iterator is closed in the pool *after* any pull still running there has
finished (a generator cannot be closed while it runs), and only then are
the keys given back: a backend's generator ``finally`` (releasing an LVM
metadata snapshot, say) always runs, never on the event loop.

At least one message is sent, even for an empty answer, so that a client
always learns the block-metadata type and the volume's capacity.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from csi_kit.errors import FailedPrecondition, Internal, InvalidArgument, NotFound, OutOfRange
from csi_kit.types import BlockMetadata, BlockMetadataType, BlockRange, Snapshot

if TYPE_CHECKING:
    from csi_kit._core.engine import VolumeEngine

__all__ = ["SnapshotMetadataRoad", "MetadataChunk", "DEFAULT_MAX_RESULTS"]

log = logging.getLogger("csi_kit.snapmeta")
T = TypeVar("T")

#: Ranges per message when the request's max_results is 0 (the spec lets the
#: plugin choose): 1024 ranges are about 20 KiB on the wire.
DEFAULT_MAX_RESULTS = 1024


@attrs.frozen
class MetadataChunk:
    """One message of the stream."""

    block_type: BlockMetadataType
    capacity_bytes: int
    ranges: tuple[BlockRange, ...]


class _Checked:
    """Pulls a backend's ranges in chunks, enforcing the spec's ordering rules.

    Runs in the pool; one pull at a time (the stream awaits each).
    """

    def __init__(self, meta: BlockMetadata, starting_offset: int, what: str) -> None:
        if meta.block_type not in (BlockMetadataType.FIXED_LENGTH, BlockMetadataType.VARIABLE_LENGTH):
            raise Internal(f"{what}: the backend answered block metadata type {meta.block_type!r}")
        if meta.capacity_bytes <= 0:
            raise Internal(f"{what}: the backend answered capacity {meta.capacity_bytes}")
        self.meta = meta
        self.starting_offset = starting_offset
        self.what = what
        self.last_end = 0
        self.fixed: int | None = None

    def _check(self, r: BlockRange) -> None:
        if r.length <= 0 or r.offset < 0:
            raise Internal(f"{self.what}: the backend answered an empty or negative range {r}")
        if r.offset < self.last_end:
            raise Internal(f"{self.what}: the backend answered {r} overlapping or before an earlier range")
        if r.end > self.meta.capacity_bytes:
            raise Internal(
                f"{self.what}: the backend answered {r} past the capacity {self.meta.capacity_bytes}"
            )
        if self.meta.block_type == BlockMetadataType.FIXED_LENGTH:
            if self.fixed is None:
                self.fixed = r.length
            elif r.length != self.fixed:
                raise Internal(f"{self.what}: FIXED_LENGTH ranges of {self.fixed} and {r.length} bytes")
        self.last_end = r.end

    def pull(self, limit: int) -> tuple[BlockRange, ...]:
        """Up to ``limit`` ranges; empty when the backend has no more."""
        out: list[BlockRange] = []
        for r in self.meta.ranges:  # leaving the loop early does not close the iterator
            if not isinstance(r, BlockRange):
                raise Internal(f"{self.what}: the backend answered {type(r).__name__}, not BlockRange")
            self._check(r)
            if r.end <= self.starting_offset:
                continue
            out.append(r)
            if len(out) >= limit:
                break
        return tuple(out)


class _Stream:
    """The pool work of one stream, and its orderly end (close, then unlock)."""

    def __init__(self, road: SnapshotMetadataRoad, keys: list[str]) -> None:
        self.road = road
        self.held = road.engine.locks.acquire(shared=keys)
        self.ranges: Iterator[BlockRange] | None = None
        self.pending: asyncio.Future[Any] | None = None

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the pool; a cancelled caller leaves it running to its end."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.road.pool, fn)
        self.pending = fut
        return await asyncio.shield(fut)

    def keep(self, meta: BlockMetadata) -> BlockMetadata:
        """Remember the iterator (in the pool thread, so a cancelled caller cannot lose it)."""
        self.ranges = meta.ranges
        return meta

    def _finish(self) -> None:
        try:
            close = getattr(self.ranges, "close", None)
            if close is not None:
                close()
        except Exception:
            log.exception("closing a snapshot metadata stream failed")
        finally:
            self.road.engine.locks.release(self.held)

    def _finish_in_pool(self) -> None:
        try:
            fut: Future[None] = self.road.pool.submit(self._finish)
        except RuntimeError:  # the pool is shut down: nothing else runs there any more
            self._finish()
            return
        fut.add_done_callback(lambda f: f.exception())

    def end(self) -> None:
        """Close the iterator once nothing of ours runs in the pool, then unlock."""
        pending = self.pending
        if pending is None or pending.done():
            if pending is not None and not pending.cancelled():
                pending.exception()  # retrieved, so a cancelled caller leaves nothing unreported
            self._finish_in_pool()
            return

        def later(f: asyncio.Future[Any]) -> None:
            if not f.cancelled():
                f.exception()
            self._finish_in_pool()

        pending.add_done_callback(later)


class SnapshotMetadataRoad:
    """Serves GetMetadataAllocated / GetMetadataDelta for one engine."""

    def __init__(self, engine: VolumeEngine) -> None:
        self.engine = engine

    @property
    def pool(self) -> Any:
        return self.engine._pool

    def _require(self) -> None:
        self.engine._require(self.engine.capabilities.snapshot_metadata, "the SnapshotMetadata service")

    @staticmethod
    def _check_window(starting_offset: int, max_results: int) -> int:
        if max_results < 0:
            raise InvalidArgument(f"max_results must not be negative, got {max_results}")
        if starting_offset < 0:
            raise OutOfRange(f"starting_offset must not be negative, got {starting_offset}")
        return max_results or DEFAULT_MAX_RESULTS

    def _snapshot(self, snapshot_id: str, field: str) -> Snapshot:
        rec = self.engine.store.snapshot(snapshot_id)
        if rec is None or rec.state != "ready":
            raise NotFound(f"{field}: snapshot {snapshot_id!r} does not exist")
        if not rec.snapshot.ready_to_use:
            raise FailedPrecondition(f"{field}: snapshot {snapshot_id!r} is not ready to use yet")
        return rec.snapshot

    @staticmethod
    def _check_offset(starting_offset: int, snapshot: Snapshot) -> None:
        if starting_offset > snapshot.size_bytes:
            raise OutOfRange(
                f"starting_offset {starting_offset} is past the end of snapshot "
                f"{snapshot.snapshot_id!r} ({snapshot.size_bytes} bytes)"
            )

    def allocated(
        self, snapshot_id: str, starting_offset: int, max_results: int
    ) -> AsyncGenerator[MetadataChunk, None]:
        """GetMetadataAllocated: the checks that need no store run before the first await."""
        self._require()
        self.engine._check_id(snapshot_id, "snapshot_id")
        limit = self._check_window(starting_offset, max_results)

        def start() -> BlockMetadata:
            snap = self._snapshot(snapshot_id, "snapshot_id")
            self._check_offset(starting_offset, snap)
            return self.engine.backend.snapshot_allocated(snap, starting_offset)

        return self._stream(
            [f"snapshot:{snapshot_id}"], start, starting_offset, limit, f"snapshot {snapshot_id!r}"
        )

    def delta(
        self, base_snapshot_id: str, target_snapshot_id: str, starting_offset: int, max_results: int
    ) -> AsyncGenerator[MetadataChunk, None]:
        """GetMetadataDelta."""
        self._require()
        self.engine._check_id(base_snapshot_id, "base_snapshot_id")
        self.engine._check_id(target_snapshot_id, "target_snapshot_id")
        limit = self._check_window(starting_offset, max_results)

        def start() -> BlockMetadata:
            base = self._snapshot(base_snapshot_id, "base_snapshot_id")
            target = self._snapshot(target_snapshot_id, "target_snapshot_id")
            if base.source_volume_id != target.source_volume_id:
                raise InvalidArgument(
                    f"snapshots {base_snapshot_id!r} and {target_snapshot_id!r} are of different volumes "
                    f"({base.source_volume_id!r}, {target.source_volume_id!r})"
                )
            self._check_offset(starting_offset, target)
            return self.engine.backend.snapshot_delta(base, target, starting_offset)

        keys = [f"snapshot:{base_snapshot_id}", f"snapshot:{target_snapshot_id}"]
        what = f"delta {base_snapshot_id!r} -> {target_snapshot_id!r}"
        return self._stream(keys, start, starting_offset, limit, what)

    async def _stream(
        self,
        keys: list[str],
        start: Callable[[], BlockMetadata],
        starting_offset: int,
        limit: int,
        what: str,
    ) -> AsyncGenerator[MetadataChunk, None]:
        stream = _Stream(self, keys)
        try:
            meta = await stream.run(lambda: stream.keep(start()))
            checked = _Checked(meta, starting_offset, what)
            sent = False
            while True:
                ranges = await stream.run(lambda: checked.pull(limit))
                if not ranges and sent:
                    return
                yield MetadataChunk(meta.block_type, meta.capacity_bytes, ranges)
                sent = True
                if not ranges:
                    return
        finally:
            stream.end()
