"""The loopfile backend's SnapshotMetadata hooks on real roots: XFS with
reflinks (the delta by physical extents), XFS with reflinks turned off and
ext4 (no shared extents: the delta by content), called directly on the
backend object so the exact ranges can be compared with what was written."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopfile_helpers import MiB

from csi_kit.backend import BackendContext
from csi_kit.errors import NotFound
from csi_kit.types import (
    BlockMetadata,
    BlockMetadataType,
    CapacityRange,
    Snapshot,
    Volume,
    VolumeCapability,
    VolumeRequest,
)
from csi_kit_backends.loopfile.backend import LoopfileBackend, LoopfileConfig

pytestmark = pytest.mark.privileged

KiB = 1024
SIZE = 16 * MiB


@pytest.fixture(params=["auto", "off"])
def backend(request: pytest.FixtureRequest, driver_root: Path) -> Iterator[LoopfileBackend]:
    b = LoopfileBackend(
        LoopfileConfig(root=str(driver_root), reflink=request.param),
        BackendContext("loopfile.csi-kit.io", "n1", str(driver_root)),
    )
    b.start()
    yield b
    b.stop()


def _volume(backend: LoopfileBackend, volume_id: str, size: int = SIZE) -> Volume:
    cap = VolumeCapability("block", 1)
    made = backend.create_volume(volume_id, VolumeRequest(volume_id, size, CapacityRange(size), (cap,)))
    return Volume(volume_id, volume_id, made.capacity_bytes, "block")


def _write(backend: LoopfileBackend, volume_id: str, writes: list[tuple[int, int]], tag: bytes) -> None:
    fd = os.open(backend.image_path(volume_id), os.O_WRONLY)
    try:
        for offset, size in writes:
            os.pwrite(fd, (tag * size)[:size], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _snapshot(backend: LoopfileBackend, snapshot_id: str, volume: Volume) -> Snapshot:
    made = backend.create_snapshot(snapshot_id, volume, {})
    return Snapshot(snapshot_id, snapshot_id, volume.volume_id, made.size_bytes, 1)


def _ranges(meta: BlockMetadata) -> list[tuple[int, int]]:
    return [(r.offset, r.length) for r in meta.ranges]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


FIRST = [(0, 4 * KiB), (1 * MiB, 64 * KiB), (5 * MiB + 8 * KiB, 4 * KiB)]
SECOND = [
    (12 * KiB, 4 * KiB),
    (1 * MiB + 16 * KiB, 8 * KiB),
    (9 * MiB, 4 * KiB),
    (9 * MiB + 4 * KiB, 4 * KiB),
]
#: SECOND, merged: the delta the backend must answer exactly.
SECOND_MERGED = [(12 * KiB, 4 * KiB), (1 * MiB + 16 * KiB, 8 * KiB), (9 * MiB, 8 * KiB)]


def _history(backend: LoopfileBackend) -> tuple[Snapshot, Snapshot]:
    vol = _volume(backend, "vol")
    _write(backend, "vol", FIRST, b"a")
    a = _snapshot(backend, "snap-a", vol)
    _write(backend, "vol", SECOND, b"b")
    b = _snapshot(backend, "snap-b", vol)
    return a, b


def test_delta_is_exactly_the_blocks_written_between(backend: LoopfileBackend) -> None:
    a, b = _history(backend)
    meta = backend.snapshot_delta(a, b, 0)
    assert meta.block_type == BlockMetadataType.VARIABLE_LENGTH
    assert meta.capacity_bytes == SIZE
    assert _ranges(meta) == SECOND_MERGED


def test_delta_of_a_snapshot_with_itself_is_empty(backend: LoopfileBackend) -> None:
    a, _ = _history(backend)
    assert _ranges(backend.snapshot_delta(a, a, 0)) == []


def test_delta_from_an_offset_starts_at_its_block(backend: LoopfileBackend) -> None:
    a, b = _history(backend)
    # Inside the second range: the backend starts from the 4 KiB block holding it.
    found = _ranges(backend.snapshot_delta(a, b, 1 * MiB + 21 * KiB))
    assert found == [(1 * MiB + 20 * KiB, 4 * KiB), SECOND_MERGED[2]]
    assert _ranges(backend.snapshot_delta(a, b, 2 * MiB)) == SECOND_MERGED[2:]


def test_allocated_covers_every_write_and_little_else(backend: LoopfileBackend) -> None:
    _, b = _history(backend)
    found = _ranges(backend.snapshot_allocated(b, 0))
    written = FIRST + SECOND
    for offset, size in written:
        assert any(o <= offset and offset + size <= o + n for o, n in found), (offset, size, found)
    # Filesystems allocate in their own units; nothing far from a write is named.
    for o, n in found:
        assert any(o < off + size + MiB and o + n > off - MiB for off, size in written), (o, n)
    assert sum(n for _, n in found) < SIZE // 2


def test_a_grown_volume_reports_the_new_region(backend: LoopfileBackend) -> None:
    vol = _volume(backend, "grow", 8 * MiB)
    _write(backend, "grow", [(0, 4 * KiB)], b"a")
    a = _snapshot(backend, "grow-a", vol)
    backend.expand_volume(vol, 12 * MiB)
    vol = Volume("grow", "grow", 12 * MiB, "block")
    _write(backend, "grow", [(10 * MiB, 4 * KiB)], b"b")
    b = _snapshot(backend, "grow-b", vol)
    meta = backend.snapshot_delta(a, b, 0)
    assert meta.capacity_bytes == 12 * MiB
    assert _ranges(meta) == [(10 * MiB, 4 * KiB)]


def test_images_are_closed_however_the_stream_ends(backend: LoopfileBackend) -> None:
    a, b = _history(backend)
    before = _open_fds()
    untouched = backend.snapshot_delta(a, b, 0).ranges
    untouched.close()  # type: ignore[attr-defined]
    partly = backend.snapshot_delta(a, b, 0).ranges
    next(partly)
    assert _open_fds() == before + 2
    partly.close()  # type: ignore[attr-defined]
    list(backend.snapshot_allocated(b, 0).ranges)
    assert _open_fds() == before


def test_a_missing_image_is_not_found(backend: LoopfileBackend) -> None:
    a, b = _history(backend)
    backend.delete_snapshot(b.snapshot_id)
    with pytest.raises(NotFound):
        backend.snapshot_delta(a, b, 0)
    with pytest.raises(NotFound):
        backend.snapshot_allocated(b, 0)
