"""Data survives snapshots, restores and clones exactly: written through a
published mount (ext4, xfs) or a published raw device node, on a root with
reflinks (XFS) and on one without (ext4: in-kernel copies)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loopfile_helpers import Csi, MiB, read_file, write_file

from csi_kit.linux import loop

pytestmark = pytest.mark.privileged


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_snapshot_restore_and_clone_hold_exactly_the_data_written(
    csi: Csi, fs_type: str, driver_root: Path
) -> None:
    size = 300 * MiB if fs_type == "xfs" else 64 * MiB
    vol = csi.create(size, fs_type=fs_type)
    target = csi.mount(vol.volume_id, fs_type=fs_type)
    first = os.urandom(3 * MiB + 123)
    write_file(f"{target}/data", first)
    # Not fsynced on purpose: the freeze around the snapshot must flush it.
    with open(f"{target}/unsynced", "wb") as f:
        f.write(b"written just before the snapshot")

    snap = csi.snapshot(vol.volume_id)
    assert snap.ready_to_use and snap.size_bytes == vol.capacity_bytes

    second = os.urandom(MiB)
    write_file(f"{target}/data", second)
    write_file(f"{target}/later", b"after the snapshot")

    restored = csi.create(size, fs_type=fs_type, snapshot=snap.snapshot_id)
    clone = csi.create(size, fs_type=fs_type, volume=vol.volume_id)
    try:
        r_target = csi.mount(restored.volume_id, fs_type=fs_type)
        assert read_file(f"{r_target}/data") == first
        assert read_file(f"{r_target}/unsynced") == b"written just before the snapshot"
        assert not os.path.exists(f"{r_target}/later")

        c_target = csi.mount(clone.volume_id, fs_type=fs_type)
        assert read_file(f"{c_target}/data") == second
        assert read_file(f"{c_target}/later") == b"after the snapshot"

        # The three volumes are independent.
        write_file(f"{r_target}/data", b"restored changed")
        assert read_file(f"{target}/data") == second
        assert read_file(f"{c_target}/data") == second
    finally:
        for v in (restored, clone, vol):
            csi.umount(v.volume_id)
            csi.delete(v.volume_id)
        csi.delete_snapshot(snap.snapshot_id)
    assert not loop.list_devices() or all(
        not d.backing_file.startswith(str(driver_root) + "/") for d in loop.list_devices()
    )
    assert os.listdir(driver_root / "volumes") == []
    assert os.listdir(driver_root / "snapshots") == []


def _read_device(path: str, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, 0)
    finally:
        os.close(fd)


def _write_device(path: str, data: bytes, *, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def test_block_volume_snapshot_restore_and_clone_through_the_device_node(csi: Csi) -> None:
    vol = csi.create(32 * MiB, block=True)
    csi.stage(vol.volume_id, block=True)
    target = csi.publish(vol.volume_id, block=True)
    assert os.path.isfile(target) or Path(target).is_block_device()
    assert Path(target).is_block_device()
    first = os.urandom(5 * MiB)
    # Left in the device's page cache: the snapshot must flush the device.
    _write_device(target, first, sync=False)

    snap = csi.snapshot(vol.volume_id)
    second = os.urandom(5 * MiB)
    _write_device(target, second, sync=True)

    restored = csi.create(32 * MiB, block=True, snapshot=snap.snapshot_id)
    clone = csi.create(32 * MiB, block=True, volume=vol.volume_id)
    try:
        for v, want in ((restored, first), (clone, second)):
            csi.stage(v.volume_id, block=True)
            t = csi.publish(v.volume_id, block=True)
            assert _read_device(t, len(want)) == want
        assert _read_device(target, len(second)) == second
    finally:
        for v in (restored, clone, vol):
            csi.unpublish(v.volume_id)
            csi.unstage(v.volume_id)
            csi.delete(v.volume_id)
        csi.delete_snapshot(snap.snapshot_id)
    assert not os.path.exists(target)


def test_restore_into_a_larger_volume_grows_the_filesystem(csi: Csi) -> None:
    vol = csi.create(64 * MiB)
    target = csi.mount(vol.volume_id)
    write_file(f"{target}/data", b"small")
    snap = csi.snapshot(vol.volume_id)
    csi.umount(vol.volume_id)
    big = csi.create(256 * MiB, snapshot=snap.snapshot_id)
    assert big.capacity_bytes == 256 * MiB
    try:
        t = csi.mount(big.volume_id)
        assert read_file(f"{t}/data") == b"small"
        total = os.statvfs(t).f_blocks * os.statvfs(t).f_frsize
        assert total > 200 * MiB
    finally:
        csi.umount(big.volume_id)
        csi.delete(big.volume_id)
        csi.delete(vol.volume_id)
        csi.delete_snapshot(snap.snapshot_id)


def test_group_snapshot_of_a_filesystem_and_a_block_volume(csi: Csi) -> None:
    fs_vol = csi.create(32 * MiB)
    blk_vol = csi.create(16 * MiB, block=True)
    fs_target = csi.mount(fs_vol.volume_id)
    blk_target = csi.mount(blk_vol.volume_id, block=True)
    fs_data, blk_data = os.urandom(MiB), os.urandom(MiB)
    write_file(f"{fs_target}/data", fs_data)
    _write_device(blk_target, blk_data, sync=False)

    group = csi.group_snapshot(fs_vol.volume_id, blk_vol.volume_id)
    assert group.ready_to_use and len(group.snapshots) == 2
    write_file(f"{fs_target}/data", b"later")
    _write_device(blk_target, b"later" * 1000, sync=True)

    member = {s.source_volume_id: s.snapshot_id for s in group.snapshots}
    fs_restored = csi.create(32 * MiB, snapshot=member[fs_vol.volume_id])
    blk_restored = csi.create(16 * MiB, block=True, snapshot=member[blk_vol.volume_id])
    try:
        assert read_file(f"{csi.mount(fs_restored.volume_id)}/data") == fs_data
        assert _read_device(csi.mount(blk_restored.volume_id, block=True), MiB) == blk_data
    finally:
        for v in (fs_restored, blk_restored, fs_vol, blk_vol):
            csi.umount(v.volume_id)
            csi.delete(v.volume_id)
        csi.delete_group_snapshot(group)
