"""The SnapshotMetadata service's framework part, over the real gRPC socket:
advertising, validation and its codes, chunking by max_results, starting_offset,
the checks on what a backend answers, and a client that goes away mid-stream.

The backend is hostPath with the two hooks added, answering ranges a test
sets per snapshot; no root needed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from helpers import Csi, GiB, short_dir

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit.backend import BackendContext, capabilities_of
from csi_kit.testing.driver import running_driver
from csi_kit.types import BlockMetadata, BlockMetadataType, BlockRange, Snapshot
from csi_kit_backends.hostpath.backend import HostPathBackend, HostPathConfig

C = grpc.StatusCode
KiB = 1024
Svc = pb.PluginCapability.Service


class MetaHostPath(HostPathBackend):
    """hostPath answering the ranges in ``layout[snapshot_id]`` (allocated) and
    ``deltas[(base, target)]``; ``gate`` (when set) holds the generator before
    its ``hold_at``-th range; ``closed`` records every generator that was closed."""

    def __init__(self, state_dir: str) -> None:
        super().__init__(HostPathConfig(), BackendContext("hostpath.csi-kit.io", "node-1", state_dir))
        self.layout: dict[str, list[BlockRange]] = {}
        self.deltas: dict[tuple[str, str], list[BlockRange]] = {}
        self.block_type = BlockMetadataType.VARIABLE_LENGTH
        self.gate: threading.Event | None = None
        self.hold_at = 1
        self.entered = threading.Event()
        self.closed = threading.Event()
        self.offsets: list[int] = []

    def _ranges(self, ranges: list[BlockRange]) -> Iterator[BlockRange]:
        try:
            for i, r in enumerate(ranges):
                if self.gate is not None and i == self.hold_at:
                    self.entered.set()
                    assert self.gate.wait(60), "the test never opened the gate"
                yield r
        finally:
            self.closed.set()

    def snapshot_allocated(self, snapshot: Snapshot, starting_offset: int) -> BlockMetadata:
        self.offsets.append(starting_offset)
        ranges = self.layout.get(snapshot.snapshot_id, [])
        return BlockMetadata(self.block_type, snapshot.size_bytes, self._ranges(ranges))

    def snapshot_delta(self, base: Snapshot, target: Snapshot, starting_offset: int) -> BlockMetadata:
        ranges = self.deltas.get((base.snapshot_id, target.snapshot_id), [])
        return BlockMetadata(self.block_type, target.size_bytes, self._ranges(ranges))


class Client(Csi):
    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.meta = pbg.SnapshotMetadataStub(self.channel)

    def allocated(self, snapshot_id: str, offset: int = 0, max_results: int = 0) -> list[Any]:
        req = pb.GetMetadataAllocatedRequest(
            snapshot_id=snapshot_id, starting_offset=offset, max_results=max_results
        )
        return list(self.meta.GetMetadataAllocated(req, timeout=30))

    def delta(self, base: str, target: str, offset: int = 0, max_results: int = 0) -> list[Any]:
        req = pb.GetMetadataDeltaRequest(
            base_snapshot_id=base, target_snapshot_id=target, starting_offset=offset, max_results=max_results
        )
        return list(self.meta.GetMetadataDelta(req, timeout=30))


def ranges_of(responses: list[Any]) -> list[tuple[int, int]]:
    return [(b.byte_offset, b.size_bytes) for r in responses for b in r.block_metadata]


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError("the call succeeded; an error was expected")


@pytest.fixture
def served() -> Iterator[tuple[MetaHostPath, Client]]:
    with short_dir() as state:
        backend = MetaHostPath(state)
        with running_driver(state, backend_object=backend) as ep, Client(ep) as c:
            yield backend, c


def _snapshots(c: Client, n: int = 2, volume: str = "") -> tuple[str, list[str]]:
    vid = volume or c.create("vol-" + str(n)).volume_id
    return vid, [c.snapshot(f"snap-{vid}-{i}", vid).snapshot_id for i in range(n)]


def test_capability_follows_the_hooks() -> None:
    assert capabilities_of(MetaHostPath).snapshot_metadata
    assert not capabilities_of(HostPathBackend).snapshot_metadata


def test_advertised_and_served(served: tuple[MetaHostPath, Client]) -> None:
    _, c = served
    caps = c.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=30).capabilities
    assert Svc.SNAPSHOT_METADATA_SERVICE in {x.service.type for x in caps if x.HasField("service")}


def test_plain_hostpath_neither_advertises_nor_serves() -> None:
    with short_dir() as state, running_driver(state) as ep, Client(ep) as c:
        caps = c.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=30).capabilities
        assert Svc.SNAPSHOT_METADATA_SERVICE not in {x.service.type for x in caps if x.HasField("service")}
        code, _ = code_of(lambda: c.allocated("whatever"))
        assert code == C.UNIMPLEMENTED


def test_chunks_hold_at_most_max_results(served: tuple[MetaHostPath, Client]) -> None:
    backend, c = served
    _, (sid, _) = _snapshots(c)
    backend.layout[sid] = [BlockRange(i * 8 * KiB, 4 * KiB) for i in range(7)]
    out = c.allocated(sid, max_results=3)
    assert [len(r.block_metadata) for r in out] == [3, 3, 1]
    assert ranges_of(out) == [(i * 8 * KiB, 4 * KiB) for i in range(7)]
    assert {r.volume_capacity_bytes for r in out} == {GiB}
    assert {r.block_metadata_type for r in out} == {pb.VARIABLE_LENGTH}


def test_default_chunk_when_max_results_is_zero(served: tuple[MetaHostPath, Client]) -> None:
    from csi_kit._core.snapmeta import DEFAULT_MAX_RESULTS

    backend, c = served
    _, (sid, _) = _snapshots(c)
    n = DEFAULT_MAX_RESULTS + 5
    backend.layout[sid] = [BlockRange(i * 8 * KiB, 4 * KiB) for i in range(n)]
    out = c.allocated(sid)
    assert [len(r.block_metadata) for r in out] == [DEFAULT_MAX_RESULTS, 5]


def test_empty_answer_is_one_message_with_type_and_capacity(served: tuple[MetaHostPath, Client]) -> None:
    backend, c = served
    _, (sid, _) = _snapshots(c)
    backend.block_type = BlockMetadataType.FIXED_LENGTH
    out = c.allocated(sid)
    assert len(out) == 1
    assert not out[0].block_metadata
    assert out[0].block_metadata_type == pb.FIXED_LENGTH and out[0].volume_capacity_bytes == GiB


def test_ranges_ending_before_starting_offset_are_dropped(served: tuple[MetaHostPath, Client]) -> None:
    backend, c = served
    _, (sid, _) = _snapshots(c)
    backend.layout[sid] = [
        BlockRange(0, 4 * KiB),
        BlockRange(8 * KiB, 8 * KiB),
        BlockRange(32 * KiB, 4 * KiB),
    ]
    # 12 KiB falls inside the second range: it is kept (it ends after the offset).
    assert ranges_of(c.allocated(sid, offset=12 * KiB)) == [(8 * KiB, 8 * KiB), (32 * KiB, 4 * KiB)]
    assert ranges_of(c.allocated(sid, offset=16 * KiB)) == [(32 * KiB, 4 * KiB)]
    assert backend.offsets[-1] == 16 * KiB
    # At the very end: an empty answer, not an error (a resumed stream that had everything).
    assert ranges_of(c.allocated(sid, offset=GiB)) == []


def test_delta_streams_the_backends_ranges(served: tuple[MetaHostPath, Client]) -> None:
    backend, c = served
    _, (a, b) = _snapshots(c)
    backend.deltas[(a, b)] = [BlockRange(4 * KiB, 4 * KiB), BlockRange(1 << 20, 64 * KiB)]
    out = c.delta(a, b, max_results=1)
    assert ranges_of(out) == [(4 * KiB, 4 * KiB), (1 << 20, 64 * KiB)]
    assert len(out) == 2


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ([BlockRange(0, 0)], "empty or negative"),
        ([BlockRange(8 * KiB, 4 * KiB), BlockRange(4 * KiB, 4 * KiB)], "overlapping"),
        ([BlockRange(0, 8 * KiB), BlockRange(4 * KiB, 8 * KiB)], "overlapping"),
        ([BlockRange(GiB - 4 * KiB, 8 * KiB)], "past the capacity"),
    ],
)
def test_a_broken_backend_answer_ends_the_stream_internal(
    served: tuple[MetaHostPath, Client], bad: list[BlockRange], words: str
) -> None:
    backend, c = served
    _, (sid, _) = _snapshots(c)
    backend.layout[sid] = bad
    code, details = code_of(lambda: c.allocated(sid))
    assert code == C.INTERNAL and words in details, details


def test_fixed_length_must_be_constant(served: tuple[MetaHostPath, Client]) -> None:
    backend, c = served
    _, (sid, _) = _snapshots(c)
    backend.block_type = BlockMetadataType.FIXED_LENGTH
    backend.layout[sid] = [BlockRange(0, 4 * KiB), BlockRange(8 * KiB, 8 * KiB)]
    code, details = code_of(lambda: c.allocated(sid))
    assert code == C.INTERNAL and "FIXED_LENGTH" in details


def test_request_errors(served: tuple[MetaHostPath, Client]) -> None:
    _, c = served
    vid, (a, b) = _snapshots(c)
    _, (other,) = _snapshots(c, 1)
    cases = [
        (lambda: c.allocated(""), C.INVALID_ARGUMENT),
        (lambda: c.allocated("../../etc"), C.INVALID_ARGUMENT),
        (lambda: c.allocated("x" * 129), C.INVALID_ARGUMENT),
        (lambda: c.allocated(a, max_results=-1), C.INVALID_ARGUMENT),
        (lambda: c.allocated("no-such-snapshot"), C.NOT_FOUND),
        (lambda: c.allocated(a, offset=-1), C.OUT_OF_RANGE),
        (lambda: c.allocated(a, offset=GiB + 1), C.OUT_OF_RANGE),
        (lambda: c.allocated(vid), C.NOT_FOUND),  # a volume id is not a snapshot id
        (lambda: c.delta(a, ""), C.INVALID_ARGUMENT),
        (lambda: c.delta("", b), C.INVALID_ARGUMENT),
        (lambda: c.delta(a, "no-such-snapshot"), C.NOT_FOUND),
        (lambda: c.delta("no-such-snapshot", b), C.NOT_FOUND),
        (lambda: c.delta(a, other), C.INVALID_ARGUMENT),
        (lambda: c.delta(a, b, offset=GiB + 1), C.OUT_OF_RANGE),
        (lambda: c.delta(a, b, max_results=-5), C.INVALID_ARGUMENT),
    ]
    for i, (call, want) in enumerate(cases):
        code, details = code_of(call)
        assert code == want, f"case {i}: {code.name}: {details}"
        assert details, f"case {i}: no status message"


def test_garbage_body_is_invalid_argument(served: tuple[MetaHostPath, Client]) -> None:
    _, c = served
    for method in ("GetMetadataAllocated", "GetMetadataDelta"):
        call = c.channel.unary_stream(f"/csi.v1.SnapshotMetadata/{method}")
        code, _ = code_of(lambda call=call: list(call(b"\xff\xff\xff", timeout=30)))
        assert code == C.INVALID_ARGUMENT


def test_a_client_that_goes_away_closes_the_backend_iterator_and_unlocks(
    served: tuple[MetaHostPath, Client],
) -> None:
    backend, c = served
    _, (sid, _) = _snapshots(c)
    backend.layout[sid] = [BlockRange(i * 8 * KiB, 4 * KiB) for i in range(10)]
    backend.gate = threading.Event()
    stream = c.meta.GetMetadataAllocated(
        pb.GetMetadataAllocatedRequest(snapshot_id=sid, max_results=1), timeout=60
    )
    first = next(stream)
    assert ranges_of([first]) == [(0, 4 * KiB)]
    assert backend.entered.wait(30), "the backend never reached its second range"
    stream.cancel()
    # The pull is still inside the backend: the snapshot stays locked for it.
    delete = pb.DeleteSnapshotRequest(snapshot_id=sid)
    code, _ = code_of(lambda: c.controller.DeleteSnapshot(delete, timeout=30))
    assert code == C.ABORTED
    assert not backend.closed.is_set()
    backend.gate.set()
    assert backend.closed.wait(30), "the backend's iterator was never closed"
    # Closed, then unlocked: the delete goes through (retry while the release lands).
    for _ in range(300):
        try:
            c.controller.DeleteSnapshot(delete, timeout=30)
            break
        except grpc.RpcError as e:
            assert e.code() == C.ABORTED, e.details()
            threading.Event().wait(0.05)
    else:
        raise AssertionError("the snapshot stayed locked after its stream ended")
    code, _ = code_of(lambda: c.allocated(sid))
    assert code == C.NOT_FOUND


def test_a_finished_stream_unlocks(served: tuple[MetaHostPath, Client]) -> None:
    backend, c = served
    _, (sid, _) = _snapshots(c)
    backend.layout[sid] = [BlockRange(0, 4 * KiB)]
    c.allocated(sid)
    assert backend.closed.wait(30)
    for _ in range(300):
        try:
            c.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=sid), timeout=30)
            return
        except grpc.RpcError as e:
            assert e.code() == C.ABORTED, e.details()
            threading.Event().wait(0.05)
    raise AssertionError("the snapshot stayed locked after its stream ended")
