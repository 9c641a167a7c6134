"""The lvm backend's SnapshotMetadata hooks on a real thin pool: thin_dump and
thin_delta through a metadata snapshot of the live pool (device-mapper needed:
the VM harness, or a native device-mapper kernel)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lvm_backend_helpers import MiB, make_backend, request, staged, volume

from csi_kit.errors import NotFound
from csi_kit.linux.run import run
from csi_kit.types import BlockMetadata, Snapshot

pytestmark = [pytest.mark.lvm, pytest.mark.privileged]

KiB = 1024
SIZE = 32 * MiB


def _ranges(meta: BlockMetadata) -> list[tuple[int, int]]:
    return [(r.offset, r.end) for r in meta.ranges]


def _write(device: str, writes: list[tuple[int, int]], tag: bytes) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        for offset, size in writes:
            os.pwrite(fd, (tag * size)[:size], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _covered(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(start <= lo and hi <= end for start, end in ranges)


def test_delta_and_allocated_of_thin_snapshots(vg: str, tmp_path: Path) -> None:
    backend = make_backend(vg, str(tmp_path))
    made = backend.create_volume("cbt", request("cbt", SIZE, "block"))
    vol = volume("cbt", made.capacity_bytes, "block")
    first = [(0, 4 * KiB), (4 * MiB, 64 * KiB)]
    second = [(1 * MiB + 8 * KiB, 4 * KiB), (4 * MiB + 16 * KiB, 4 * KiB), (20 * MiB, 128 * KiB)]
    try:
        with staged(backend, "cbt", "block", str(tmp_path)) as device:
            _write(device, first, b"1")
            a = backend.create_snapshot("cbt-a", vol, {})
            _write(device, second, b"2")
            b = backend.create_snapshot("cbt-b", vol, {})
        snap_a = Snapshot("cbt-a", "cbt-a", "cbt", a.size_bytes, 1)
        snap_b = Snapshot("cbt-b", "cbt-b", "cbt", b.size_bytes, 1)

        delta = _ranges(backend.snapshot_delta(snap_a, snap_b, 0))
        for offset, size in second:
            assert _covered(delta, offset, offset + size), (offset, size, delta)
        # At the pool's chunk size (64 KiB here): nothing else is named.
        chunk = 64 * KiB
        for start, end in delta:
            assert any(start >= o - o % chunk and end <= -(-(o + n) // chunk) * chunk for o, n in second), (
                start,
                end,
                delta,
            )

        allocated = _ranges(backend.snapshot_allocated(snap_b, 0))
        for offset, size in first + second:
            assert _covered(allocated, offset, offset + size), (offset, size, allocated)
        assert sum(end - start for start, end in allocated) < SIZE // 2

        # The metadata snapshot was released: a second read reserves it again.
        assert _ranges(backend.snapshot_delta(snap_a, snap_b, 0)) == delta
        assert _ranges(backend.snapshot_delta(snap_a, snap_a, 0)) == []
    finally:
        for snapshot_id in ("cbt-a", "cbt-b"):
            backend.delete_snapshot(snapshot_id)
        backend.delete_volume("cbt")


def test_a_metadata_snapshot_left_behind_is_taken_over(vg: str, tmp_path: Path) -> None:
    from csi_kit.linux import lvm

    backend = make_backend(vg, str(tmp_path))
    made = backend.create_volume("left", request("left", SIZE, "block"))
    backend.create_snapshot("left-a", volume("left", made.capacity_bytes, "block"), {})
    try:
        with lvm.metadata_snapshot(vg, "pool"):
            pass
        device = lvm._pool_device(vg, "pool")
        run(["dmsetup", "message", device, "0", "reserve_metadata_snap"])  # a crashed holder's
        snap = Snapshot("left-a", "left-a", "left", made.capacity_bytes, 1)
        assert _ranges(backend.snapshot_allocated(snap, 0)) == []
    finally:
        backend.delete_snapshot("left-a")
        backend.delete_volume("left")


def test_a_missing_snapshot_lv_is_not_found(vg: str, tmp_path: Path) -> None:
    backend = make_backend(vg, str(tmp_path))
    with pytest.raises(NotFound):
        backend.snapshot_allocated(Snapshot("nope", "nope", "v", MiB, 1), 0)
