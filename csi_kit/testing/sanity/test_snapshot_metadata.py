"""SnapshotMetadata: GetMetadataAllocated and GetMetadataDelta (changed-block tracking).

Skipped unless the driver advertises SNAPSHOT_METADATA_SERVICE (and can take
snapshots).  Every answer is checked against the spec's stream rules: one
block-metadata type and one capacity per stream, at most ``max_results``
ranges per message, ranges of positive size in ascending order that never
overlap (also across messages), one size for FIXED_LENGTH, and nothing that
ends before ``starting_offset``.

The data test writes known blocks through a published *block* volume (made
for the test whatever access type the run is configured for; skipped when
the driver offers no block volumes), snapshots, writes more (new blocks and
one overwrite), snapshots again, and checks that the delta names every
block written in between and nothing farther than the backend's granularity
from one -- the FIXED_LENGTH size, or `VARIABLE_SLACK` for VARIABLE_LENGTH
answers -- and that the allocated ranges cover everything written.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
import pytest

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit.testing.sanity._support import (
    C,
    CtrlCap,
    PluginSvc,
    Published,
    Resources,
    SanityContext,
    block_write,
)

__all__ = ["TestSnapshotMetadata", "TestSnapshotMetadataData"]

KiB = 1024
MiB = 1024 * KiB
#: How far past a written block a VARIABLE_LENGTH answer may reach: an LVM
#: thin chunk is 64 KiB by default.  The test's writes are 1 MiB apart.
VARIABLE_SLACK = 64 * KiB
NONEXISTENT_SNAPSHOT = "sanity-no-such-snapshot-0123456789"

Range = tuple[int, int]  # (offset, end)


def need_snapshot_metadata(ctx: SanityContext) -> None:
    if PluginSvc.SNAPSHOT_METADATA_SERVICE not in ctx.caps.plugin:
        pytest.skip("driver does not advertise SNAPSHOT_METADATA_SERVICE")
    ctx.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)


def _stub(ctx: SanityContext) -> Any:
    return pbg.SnapshotMetadataStub(ctx.controller_channel)


def _read(ctx: SanityContext, rpc: str, request: Any) -> list[Any]:
    """Every message of a stream (the errors surface while reading)."""
    return list(getattr(_stub(ctx), rpc)(request, timeout=ctx.config.rpc_timeout))


def allocated(ctx: SanityContext, snapshot_id: str, offset: int = 0, max_results: int = 0) -> list[Any]:
    req = pb.GetMetadataAllocatedRequest(
        snapshot_id=snapshot_id, starting_offset=offset, max_results=max_results
    )
    try:
        out = _read(ctx, "GetMetadataAllocated", req)
    except grpc.RpcError as e:
        raise AssertionError(
            f"GetMetadataAllocated {snapshot_id!r}: {e.code().name}: {e.details()}"
        ) from None
    check_stream(out, offset, max_results, "GetMetadataAllocated")
    return out


def delta(ctx: SanityContext, base: str, target: str, offset: int = 0, max_results: int = 0) -> list[Any]:
    req = pb.GetMetadataDeltaRequest(
        base_snapshot_id=base, target_snapshot_id=target, starting_offset=offset, max_results=max_results
    )
    try:
        out = _read(ctx, "GetMetadataDelta", req)
    except grpc.RpcError as e:
        raise AssertionError(
            f"GetMetadataDelta {base!r} -> {target!r}: {e.code().name}: {e.details()}"
        ) from None
    check_stream(out, offset, max_results, "GetMetadataDelta")
    return out


def expect_stream_error(
    ctx: SanityContext, rpc: str, request: Any, codes: grpc.StatusCode | tuple[grpc.StatusCode, ...]
) -> None:
    wanted = (codes,) if isinstance(codes, grpc.StatusCode) else codes
    try:
        out = _read(ctx, rpc, request)
    except grpc.RpcError as e:
        assert e.code() in wanted, (
            f"{rpc}: expected {' or '.join(c.name for c in wanted)}, got {e.code().name}: {e.details()}"
        )
        assert e.details(), f"{rpc}: {e.code().name} without a status message (the spec requires one)"
        return
    raise AssertionError(f"{rpc}: expected {' or '.join(c.name for c in wanted)}, got {len(out)} messages")


def check_stream(responses: list[Any], offset: int, max_results: int, rpc: str) -> None:
    """The spec's rules for one stream's messages."""
    types = {r.block_metadata_type for r in responses}
    capacities = {r.volume_capacity_bytes for r in responses}
    assert len(types) <= 1, f"{rpc}: block_metadata_type changed mid-stream: {types}"
    assert len(capacities) <= 1, f"{rpc}: volume_capacity_bytes changed mid-stream: {capacities}"
    if types:
        assert types <= {pb.FIXED_LENGTH, pb.VARIABLE_LENGTH}, f"{rpc}: block_metadata_type {types}"
        assert min(capacities) > 0, f"{rpc}: volume_capacity_bytes {capacities}"
    last_end = -1
    sizes = set()
    first = True
    for r in responses:
        if max_results:
            assert len(r.block_metadata) <= max_results, (
                f"{rpc}: {len(r.block_metadata)} ranges in one message for max_results={max_results}"
            )
        for b in r.block_metadata:
            assert b.size_bytes > 0, f"{rpc}: a range of size {b.size_bytes}"
            assert b.byte_offset >= 0, f"{rpc}: a range at offset {b.byte_offset}"
            assert b.byte_offset >= last_end, (
                f"{rpc}: range at {b.byte_offset} overlaps or precedes the previous one (ends at {last_end})"
            )
            assert b.byte_offset + b.size_bytes <= r.volume_capacity_bytes, (
                f"{rpc}: range {b.byte_offset}+{b.size_bytes} past the capacity {r.volume_capacity_bytes}"
            )
            if first:
                assert b.byte_offset + b.size_bytes > offset, (
                    f"{rpc}: first range {b.byte_offset}+{b.size_bytes} ends before starting_offset {offset}"
                )
                first = False
            last_end = b.byte_offset + b.size_bytes
            sizes.add(b.size_bytes)
    if types == {pb.FIXED_LENGTH}:
        assert len(sizes) <= 1, f"{rpc}: FIXED_LENGTH answer with sizes {sorted(sizes)}"


def ranges_of(responses: Iterable[Any]) -> list[Range]:
    return [(b.byte_offset, b.byte_offset + b.size_bytes) for r in responses for b in r.block_metadata]


def covered(ranges: list[Range], lo: int, hi: int) -> bool:
    """Whether [lo, hi) lies inside the union of ``ranges`` (ascending, not overlapping)."""
    pos = lo
    for start, end in ranges:
        if start > pos:
            break
        if end > pos:
            pos = end
        if pos >= hi:
            return True
    return pos >= hi


def clip(ranges: list[Range], lo: int) -> list[Range]:
    """The union of ``ranges`` from ``lo`` on, merged (for comparing two answers)."""
    out: list[Range] = []
    for start, end in ranges:
        start = max(start, lo)
        if end <= start:
            continue
        if out and out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def slack_of(responses: list[Any]) -> int:
    fixed: set[int] = {int(b.size_bytes) for r in responses for b in r.block_metadata}
    if responses and responses[0].block_metadata_type == pb.FIXED_LENGTH and fixed:
        return max(fixed)
    return VARIABLE_SLACK


def capacity_of(ctx: SanityContext, snap: Any) -> int:
    """The snapshot's volume capacity: from an answer, else the snapshot's size."""
    out = allocated(ctx, snap.snapshot_id)
    capacity = int(out[0].volume_capacity_bytes if out else snap.size_bytes)
    if not capacity:
        pytest.skip("the driver tells neither the snapshot's size nor its volume capacity")
    return capacity


def _snapshot_pair_of_one_volume(ctx: SanityContext, res: Resources) -> tuple[Any, Any, Any]:
    vol = res.create_volume()
    return vol, res.create_snapshot(vol.volume_id), res.create_snapshot(vol.volume_id)


class TestSnapshotMetadata:
    """Request handling and stream rules; no data written."""

    def test_allocated_of_a_new_snapshot(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        need_snapshot_metadata(csi_sanity)
        _, snap, _ = _snapshot_pair_of_one_volume(csi_sanity, csi_resources)
        allocated(csi_sanity, snap.snapshot_id)

    def test_delta_of_two_snapshots(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        need_snapshot_metadata(csi_sanity)
        _, a, b = _snapshot_pair_of_one_volume(csi_sanity, csi_resources)
        delta(csi_sanity, a.snapshot_id, b.snapshot_id)

    def test_missing_snapshot_id(self, csi_sanity: SanityContext) -> None:
        need_snapshot_metadata(csi_sanity)
        expect_stream_error(
            csi_sanity, "GetMetadataAllocated", pb.GetMetadataAllocatedRequest(), C.INVALID_ARGUMENT
        )
        expect_stream_error(
            csi_sanity,
            "GetMetadataDelta",
            pb.GetMetadataDeltaRequest(target_snapshot_id=NONEXISTENT_SNAPSHOT),
            C.INVALID_ARGUMENT,
        )
        expect_stream_error(
            csi_sanity,
            "GetMetadataDelta",
            pb.GetMetadataDeltaRequest(base_snapshot_id=NONEXISTENT_SNAPSHOT),
            C.INVALID_ARGUMENT,
        )

    def test_unknown_snapshot_not_found(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        need_snapshot_metadata(csi_sanity)
        _, a, _ = _snapshot_pair_of_one_volume(csi_sanity, csi_resources)
        expect_stream_error(
            csi_sanity,
            "GetMetadataAllocated",
            pb.GetMetadataAllocatedRequest(snapshot_id=NONEXISTENT_SNAPSHOT),
            C.NOT_FOUND,
        )
        for base, target in ((NONEXISTENT_SNAPSHOT, a.snapshot_id), (a.snapshot_id, NONEXISTENT_SNAPSHOT)):
            expect_stream_error(
                csi_sanity,
                "GetMetadataDelta",
                pb.GetMetadataDeltaRequest(base_snapshot_id=base, target_snapshot_id=target),
                C.NOT_FOUND,
            )

    def test_deleted_snapshot_not_found(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        need_snapshot_metadata(csi_sanity)
        _, a, b = _snapshot_pair_of_one_volume(csi_sanity, csi_resources)
        csi_resources.delete_snapshot(b.snapshot_id)
        expect_stream_error(
            csi_sanity,
            "GetMetadataAllocated",
            pb.GetMetadataAllocatedRequest(snapshot_id=b.snapshot_id),
            C.NOT_FOUND,
        )
        expect_stream_error(
            csi_sanity,
            "GetMetadataDelta",
            pb.GetMetadataDeltaRequest(base_snapshot_id=a.snapshot_id, target_snapshot_id=b.snapshot_id),
            C.NOT_FOUND,
        )

    def test_starting_offset_out_of_range(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        need_snapshot_metadata(csi_sanity)
        _, a, b = _snapshot_pair_of_one_volume(csi_sanity, csi_resources)
        capacity = capacity_of(csi_sanity, a)
        for offset in (-1, capacity + MiB, 1 << 62):
            expect_stream_error(
                csi_sanity,
                "GetMetadataAllocated",
                pb.GetMetadataAllocatedRequest(snapshot_id=a.snapshot_id, starting_offset=offset),
                C.OUT_OF_RANGE,
            )
            expect_stream_error(
                csi_sanity,
                "GetMetadataDelta",
                pb.GetMetadataDeltaRequest(
                    base_snapshot_id=a.snapshot_id, target_snapshot_id=b.snapshot_id, starting_offset=offset
                ),
                C.OUT_OF_RANGE,
            )

    def test_negative_max_results(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        need_snapshot_metadata(csi_sanity)
        _, a, b = _snapshot_pair_of_one_volume(csi_sanity, csi_resources)
        expect_stream_error(
            csi_sanity,
            "GetMetadataAllocated",
            pb.GetMetadataAllocatedRequest(snapshot_id=a.snapshot_id, max_results=-1),
            C.INVALID_ARGUMENT,
        )
        expect_stream_error(
            csi_sanity,
            "GetMetadataDelta",
            pb.GetMetadataDeltaRequest(
                base_snapshot_id=a.snapshot_id, target_snapshot_id=b.snapshot_id, max_results=-1
            ),
            C.INVALID_ARGUMENT,
        )

    def test_snapshots_of_different_volumes(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        need_snapshot_metadata(csi_sanity)
        _, a, _ = _snapshot_pair_of_one_volume(csi_sanity, csi_resources)
        _, other, _ = _snapshot_pair_of_one_volume(csi_sanity, csi_resources)
        expect_stream_error(
            csi_sanity,
            "GetMetadataDelta",
            pb.GetMetadataDeltaRequest(base_snapshot_id=a.snapshot_id, target_snapshot_id=other.snapshot_id),
            C.INVALID_ARGUMENT,
        )


#: The test's writes: (offset, size), before the first snapshot and between the two.
FIRST_WRITES = ((0, 4 * KiB), (1 * MiB + 12 * KiB, 8 * KiB), (3 * MiB, 64 * KiB))
SECOND_WRITES = ((2 * MiB + 4 * KiB, 4 * KiB), (3 * MiB + 16 * KiB, 4 * KiB), (5 * MiB - 4 * KiB, 8 * KiB))


class TestSnapshotMetadataData:
    """Known blocks written through a published block volume, then the answers checked."""

    def _block_volume(self, ctx: SanityContext, res: Resources) -> tuple[Any, Published]:
        cap = ctx.capability(access_type="block")
        req = ctx.create_request(size=max(ctx.config.volume_size, 8 * MiB))
        del req.volume_capabilities[:]
        req.volume_capabilities.append(cap)
        try:
            resp = ctx.controller.CreateVolume(req)
        except grpc.RpcError as e:
            if e.code() in (C.INVALID_ARGUMENT, C.UNIMPLEMENTED):
                pytest.skip(f"driver offers no block volumes: {e.details()}")
            raise
        vol = resp.volume
        res.track_volume(vol.volume_id)
        return vol, res.publish(vol.volume_id, cap=cap)

    @staticmethod
    def _write(path: str, writes: Iterable[tuple[int, int]], tag: bytes) -> None:
        for offset, size in writes:
            block_write(path, offset, (tag * (size // len(tag) + 1))[:size])

    def _history(self, ctx: SanityContext, res: Resources) -> tuple[Any, Any, Any]:
        """A block volume with FIRST_WRITES, snapshot a, SECOND_WRITES, snapshot b."""
        vol, published = self._block_volume(ctx, res)
        self._write(published.target_path, FIRST_WRITES, b"first-")
        a = res.create_snapshot(vol.volume_id)
        self._write(published.target_path, SECOND_WRITES, b"second")
        b = res.create_snapshot(vol.volume_id)
        return vol, a, b

    def test_delta_names_the_written_blocks(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        need_snapshot_metadata(csi_sanity)
        _, a, b = self._history(csi_sanity, csi_resources)
        out = delta(csi_sanity, a.snapshot_id, b.snapshot_id)
        found = ranges_of(out)
        for offset, size in SECOND_WRITES:
            assert covered(found, offset, offset + size), (
                f"GetMetadataDelta misses the write at {offset}+{size}: answered {found}"
            )
        slack = slack_of(out)
        windows = clip(
            sorted(
                (offset - offset % slack, -(-(offset + size) // slack) * slack)
                for offset, size in SECOND_WRITES
            ),
            0,
        )
        for start, end in found:
            assert covered(windows, start, end), (
                f"GetMetadataDelta names {start}..{end}, outside the blocks written between the snapshots "
                f"{list(SECOND_WRITES)} (at a granularity of {slack} bytes)"
            )

    def test_allocated_covers_everything_written(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        need_snapshot_metadata(csi_sanity)
        _, a, b = self._history(csi_sanity, csi_resources)
        first = ranges_of(allocated(csi_sanity, a.snapshot_id))
        second = ranges_of(allocated(csi_sanity, b.snapshot_id))
        for offset, size in FIRST_WRITES:
            assert covered(first, offset, offset + size), f"allocated(a) misses {offset}+{size}: {first}"
        for offset, size in FIRST_WRITES + SECOND_WRITES:
            assert covered(second, offset, offset + size), f"allocated(b) misses {offset}+{size}: {second}"

    def test_max_results_honoured(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        need_snapshot_metadata(csi_sanity)
        _, a, b = self._history(csi_sanity, csi_resources)
        whole = clip(ranges_of(delta(csi_sanity, a.snapshot_id, b.snapshot_id)), 0)
        for n in (1, 2):
            # check_stream asserts the per-message limit; the union must not change.
            assert clip(ranges_of(delta(csi_sanity, a.snapshot_id, b.snapshot_id, max_results=n)), 0) == whole
            assert clip(ranges_of(allocated(csi_sanity, b.snapshot_id, max_results=n)), 0) == clip(
                ranges_of(allocated(csi_sanity, b.snapshot_id)), 0
            )

    def test_starting_offset_honoured(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        need_snapshot_metadata(csi_sanity)
        _, a, b = self._history(csi_sanity, csi_resources)
        whole_delta = ranges_of(delta(csi_sanity, a.snapshot_id, b.snapshot_id))
        whole_alloc = ranges_of(allocated(csi_sanity, b.snapshot_id))
        # Inside the second write region, and just past the last range's start: a resumed stream.
        for offset in (3 * MiB + 18 * KiB, 3 * MiB):
            resumed = ranges_of(delta(csi_sanity, a.snapshot_id, b.snapshot_id, offset=offset))
            assert clip(resumed, offset) == clip(whole_delta, offset), (
                f"GetMetadataDelta from {offset}: {resumed}, but the whole answer from there is "
                f"{clip(whole_delta, offset)}"
            )
            resumed = ranges_of(allocated(csi_sanity, b.snapshot_id, offset=offset))
            assert clip(resumed, offset) == clip(whole_alloc, offset)
        capacity = capacity_of(csi_sanity, b)
        assert ranges_of(delta(csi_sanity, a.snapshot_id, b.snapshot_id, offset=capacity)) == []
