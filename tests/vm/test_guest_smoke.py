"""The harness proves itself: real LVM thin provisioning end to end.

Runs in the VM harness (or natively on a kernel with device-mapper): PV, VG,
thin pool, thin LV, ext4 on it, data written, a thin snapshot that keeps the
old data after the origin changes, online lvextend + resize2fs, a VG
deactivated and reactivated (thin_check on the pool metadata), and a clean
teardown.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from scratch import block_device, cmd, remove_vg, unique_vg_name

pytestmark = [pytest.mark.lvm, pytest.mark.privileged]


@pytest.fixture
def vg(tmp_path: Path) -> Iterator[str]:
    with block_device(tmp_path) as device:
        name = unique_vg_name()
        cmd("pvcreate", "-q", device)
        try:
            cmd("vgcreate", "-q", name, device)
            yield name
        finally:
            remove_vg(name)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_thin_lv_snapshot_roundtrip(vg: str, tmp_path: Path) -> None:
    cmd("lvcreate", "-q", "-L", "512M", "-T", f"{vg}/pool")
    cmd("lvcreate", "-q", "-V", "1G", "-T", f"{vg}/pool", "-n", "origin")
    origin_dev = f"/dev/{vg}/origin"
    assert os.path.exists(origin_dev), "LVM did not create the device node (udev-less lvm.conf?)"
    cmd("mkfs.ext4", "-q", origin_dev)

    mnt, snap_mnt = tmp_path / "origin", tmp_path / "snap"
    mnt.mkdir()
    snap_mnt.mkdir()
    cmd("mount", origin_dev, str(mnt))
    data = mnt / "data"
    data.write_bytes(os.urandom(8 << 20))
    os.sync()
    before = sha256(data)

    cmd("lvcreate", "-q", "-s", f"{vg}/origin", "-n", "snap")
    # Thin snapshots are created with the activation-skip flag: -K overrides it.
    cmd("lvchange", "-q", "-ay", "-K", f"{vg}/snap")
    with open(data, "ab") as f:
        f.write(b"changed after the snapshot")
    os.sync()
    assert sha256(data) != before

    cmd("mount", "-o", "ro", f"/dev/{vg}/snap", str(snap_mnt))
    try:
        assert sha256(snap_mnt / "data") == before
    finally:
        cmd("umount", str(snap_mnt))

    # Online growth: the LV, then ext4 on it while mounted.
    blocks_before = os.statvfs(mnt).f_blocks
    cmd("lvextend", "-q", "-L", "+512M", f"{vg}/origin")
    cmd("resize2fs", origin_dev)
    assert os.statvfs(mnt).f_blocks > blocks_before * 1.4
    cmd("umount", str(mnt))

    # Deactivate and reactivate the whole VG: pool activation runs thin_check
    # on the pool metadata; -K brings the snapshot back despite its skip flag.
    cmd("vgchange", "-q", "-an", vg)
    assert not os.path.exists(f"/dev/{vg}/snap")
    cmd("vgchange", "-q", "-ay", "-K", vg)
    cmd("mount", "-o", "ro", f"/dev/{vg}/snap", str(snap_mnt))
    try:
        assert sha256(snap_mnt / "data") == before
    finally:
        cmd("umount", str(snap_mnt))

    lvs = cmd("lvs", "--noheadings", "-o", "lv_name,pool_lv,origin", vg).stdout.split("\n")
    rows = {tuple(line.split()) for line in lvs if line.strip()}
    assert ("snap", "pool", "origin") in rows
    assert ("origin", "pool") in rows
