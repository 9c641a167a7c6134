"""Usage, filesystem lookup, freeze/thaw and sync on real filesystems."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from csi_kit.errors import FailedPrecondition, NotFound
from csi_kit.linux.fs import FIFREEZE, FITHAW, filesystem_of, frozen, statvfs_usage, sync_path, tree_usage
from csi_kit.linux.mounts import bind_mount, mount, mounts_at

pytestmark = pytest.mark.privileged

MiB = 1 << 20


def test_statvfs_usage_follows_writes(xfs_dir: Path, xfs_mount: Path) -> None:
    before = statvfs_usage(str(xfs_dir))
    assert 200 * MiB < before.total_bytes <= 320 * MiB  # 320 MiB image minus the internal log
    assert before.used_bytes + before.available_bytes <= before.total_bytes
    assert before.used_inodes == before.total_inodes - before.free_inodes
    with open(xfs_dir / "data", "wb") as f:
        f.write(os.urandom(8 * MiB))
        os.fsync(f.fileno())
    after = statvfs_usage(str(xfs_dir))
    assert after.used_bytes - before.used_bytes >= 8 * MiB
    assert after.used_inodes > before.used_inodes
    with pytest.raises(NotFound):
        statvfs_usage(str(xfs_dir / "missing"))


def test_tree_usage_counts_allocation_and_inodes(xfs_dir: Path, tmp_path: Path) -> None:
    root = xfs_dir / "tree"
    (root / "sub").mkdir(parents=True)
    with open(root / "sub" / "data", "wb") as f:
        f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    os.link(root / "sub" / "data", root / "hardlink")
    with open(root / "sparse", "wb") as f:
        f.truncate(1 << 30)
    outside = tmp_path / "big"
    outside.write_bytes(os.urandom(2 * MiB))
    (root / "link-out").symlink_to(outside)
    allocated, inodes = tree_usage(str(root))
    # root, sub, data (+ its hard link, once), sparse, link-out
    assert inodes == 5
    assert MiB <= allocated < 2 * MiB  # no 1 GiB hole, no symlink target, no double count
    assert tree_usage(str(root / "sub" / "data")) == (os.stat(root / "sub" / "data").st_blocks * 512, 1)
    with pytest.raises(NotFound):
        tree_usage(str(root / "missing"))


def test_tree_usage_stays_on_one_filesystem(
    xfs_dir: Path, tmp_path: Path, unmount_after: Callable[[Path], Path]
) -> None:
    inner = xfs_dir / "inner"
    inner.mkdir()
    mount("tmpfs", str(unmount_after(inner)), "tmpfs", ["size=4m"])
    (inner / "hidden").write_bytes(os.urandom(MiB))
    allocated, inodes = tree_usage(str(xfs_dir))
    assert inodes == 1  # like du -x: the mount point shows the tmpfs root, which is not counted
    assert allocated < MiB


def test_filesystem_of(
    xfs_dir: Path, xfs_mount: Path, ext4_dir: Path, unmount_after: Callable[[Path], Path]
) -> None:
    (xfs_dir / "f").write_text("x")
    assert filesystem_of(str(xfs_dir / "f")).mount_point == str(xfs_mount)
    assert filesystem_of(str(xfs_mount)).fs_type == "xfs"
    (ext4_dir / "into-xfs").symlink_to(xfs_dir)
    assert filesystem_of(str(ext4_dir / "into-xfs" / "f")).mount_point == str(xfs_mount)
    assert filesystem_of(str(ext4_dir)).fs_type == "ext4"
    # A bind mount of a directory on the same filesystem is its own mount.
    target = unmount_after(xfs_dir / "bound")
    target.mkdir()
    (xfs_dir / "origin").mkdir()
    bind_mount(str(xfs_dir / "origin"), str(target))
    found = filesystem_of(str(target))
    assert found.mount_point == str(target)
    assert found.root.endswith("/origin")
    with pytest.raises(NotFound):
        filesystem_of(str(xfs_dir / "missing"))


def test_filesystem_of_skips_a_hidden_mount(tmp_path: Path, unmount_after: Callable[[Path], Path]) -> None:
    outer = unmount_after(tmp_path / "outer")
    (outer / "inner").mkdir(parents=True)
    mount("tmpfs", str(outer / "inner"), "tmpfs", ["size=1m"])
    mount("tmpfs", str(outer), "tmpfs", ["size=2m"])  # hides outer/inner
    (outer / "inner").mkdir()
    entry = filesystem_of(str(outer / "inner"))
    assert entry.mount_point == str(outer)
    assert entry is not mounts_at(str(outer / "inner"))[-1]


def _frozen_now(path: Path) -> bool:
    """A second FIFREEZE answers EBUSY exactly when the filesystem is frozen (it thaws it if not)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError as e:
        assert e.errno == errno.EBUSY
        return True
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    finally:
        os.close(fd)
    return False


def test_freeze_and_thaw_xfs(xfs_mount: Path, xfs_dir: Path) -> None:
    with frozen(str(xfs_mount)):
        assert _frozen_now(xfs_mount)
        with pytest.raises(FailedPrecondition, match="already frozen"), frozen(str(xfs_mount)):
            pass
    assert not _frozen_now(xfs_mount)
    (xfs_dir / "after-thaw").write_text("writable again")


def test_thaw_happens_when_the_block_raises(xfs_mount: Path, xfs_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="snapshot failed"), frozen(str(xfs_mount)):
        raise RuntimeError("snapshot failed")
    assert not _frozen_now(xfs_mount)
    (xfs_dir / "after-error").write_text("writable again")


def test_unfreezable_filesystem_still_runs_the_block(
    tmp_path: Path, unmount_after: Callable[[Path], Path]
) -> None:
    target = unmount_after(tmp_path / "tmpfs")
    target.mkdir()
    mount("tmpfs", str(target), "tmpfs", ["size=1m"])
    ran = False
    with frozen(str(target)):
        ran = True
        (target / "still-writable").write_text("x")
    assert ran


def test_sync_path(xfs_dir: Path) -> None:
    (xfs_dir / "tree" / "sub").mkdir(parents=True)
    (xfs_dir / "tree" / "sub" / "f").write_text("x")
    (xfs_dir / "tree" / "link").symlink_to("/nonexistent")
    sync_path(str(xfs_dir / "tree"))
    sync_path(str(xfs_dir / "tree" / "sub" / "f"))
    with pytest.raises(NotFound):
        sync_path(str(xfs_dir / "missing"))
