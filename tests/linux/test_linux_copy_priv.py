"""copy_tree / copy_file on real XFS (reflink) and ext4 (no reflink)."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from csi_kit.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi_kit.linux.copy import (
    clone_file,
    copy_file,
    copy_file_sparse,
    copy_tree,
    reflink_supported,
)
from csi_kit.linux.mounts import bind_mount
from csi_kit.testing.fsimage import loop_mounted_fs

pytestmark = pytest.mark.privileged

GiB = 1 << 30
MTIME_NS = 1_600_000_000_123_456_789
ATIME_NS = 1_500_000_000_987_654_321


def _make_tree(root: Path) -> None:
    """A tree with one of everything copy_tree must handle."""
    root.mkdir()
    (root / "plain").write_bytes(os.urandom(100_000))
    (root / "empty").touch()
    with open(root / "sparse", "wb") as f:
        f.truncate(GiB)
        f.seek(GiB // 2)
        f.write(b"middle")
        f.seek(GiB - 4)
        f.write(b"tail")
    sub = root / "a" / "b" / "c"
    sub.mkdir(parents=True)
    (sub / "deep").write_text("deep")
    os.chmod(root / "a", 0o711)
    (root / "setuid").write_text("#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    os.chown(root / "plain", 1234, 5678)
    os.chmod(root / "plain", 0o640)
    os.setxattr(root / "plain", "user.csi-kit", b"kept")
    os.link(root / "plain", root / "a" / "hardlink")
    (root / "abs-link").symlink_to("/etc")
    (root / "rel-link").symlink_to("a/b/c/deep")
    (root / "escape").symlink_to("../../../../../../etc/passwd")
    (root / "dangling").symlink_to("nowhere")
    os.chown(root / "rel-link", 42, 43, follow_symlinks=False)
    os.mkfifo(root / "fifo")
    os.chmod(root / "fifo", 0o620)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
    for path in (root / "plain", root / "a" / "b", root / "rel-link", root / "fifo", root / "a"):
        os.utime(path, ns=(ATIME_NS, MTIME_NS), follow_symlinks=False)


def _check_copy(src: Path, dst: Path) -> None:
    plain = os.stat(dst / "plain")  # before reading it: relatime would move an atime older than mtime
    assert plain.st_mtime_ns == MTIME_NS and plain.st_atime_ns == ATIME_NS
    assert (dst / "plain").read_bytes() == (src / "plain").read_bytes()
    assert (dst / "empty").read_bytes() == b""
    assert (dst / "a" / "b" / "c" / "deep").read_text() == "deep"

    sparse = os.stat(dst / "sparse")
    assert sparse.st_size == GiB
    assert sparse.st_blocks * 512 < 1 << 20  # holes stayed holes
    with open(dst / "sparse", "rb") as f:
        f.seek(GiB // 2)
        assert f.read(6) == b"middle"
        f.seek(GiB - 4)
        assert f.read() == b"tail"
        f.seek(4096)
        assert f.read(4096) == bytes(4096)

    assert (plain.st_uid, plain.st_gid) == (1234, 5678)
    assert stat.S_IMODE(plain.st_mode) == 0o640
    assert os.getxattr(dst / "plain", "user.csi-kit") == b"kept"
    assert os.stat(dst / "a" / "hardlink").st_ino == plain.st_ino  # hard link kept
    assert stat.S_IMODE(os.stat(dst / "setuid").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(dst / "a").st_mode) == 0o711
    assert os.stat(dst / "a").st_mtime_ns == MTIME_NS  # set after its contents were made
    assert os.stat(dst / "a" / "b").st_mtime_ns == MTIME_NS

    for name, target in [
        ("abs-link", "/etc"),
        ("rel-link", "a/b/c/deep"),
        ("escape", "../../../../../../etc/passwd"),
        ("dangling", "nowhere"),
    ]:
        assert os.path.islink(dst / name)
        assert os.readlink(dst / name) == target
    link = os.lstat(dst / "rel-link")
    assert (link.st_uid, link.st_gid) == (42, 43)
    assert link.st_mtime_ns == MTIME_NS

    fifo = os.lstat(dst / "fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620
    assert not os.path.lexists(dst / "sock")


def test_reflink_support_is_probed_per_filesystem(
    xfs_mount: Path, ext4_mount: Path, xfs_noreflink_mount: Path
) -> None:
    assert reflink_supported(str(xfs_mount))
    assert not reflink_supported(str(ext4_mount))
    assert not reflink_supported(str(xfs_noreflink_mount))
    assert reflink_supported(str(xfs_mount))  # cached answer
    assert not [p for p in os.listdir(xfs_mount) if p.startswith(".csi-kit-reflink-probe")]
    with pytest.raises(NotFound):
        reflink_supported(str(xfs_mount / "missing"))


def test_copy_tree_with_reflink_on_xfs(xfs_dir: Path) -> None:
    src, dst = xfs_dir / "src", xfs_dir / "dst"
    _make_tree(src)
    stats = copy_tree(str(src), str(dst))
    _check_copy(src, dst)
    assert stats.method == "reflink"
    # plain, empty, sparse, setuid, deep + the hard link
    assert (stats.files, stats.directories, stats.symlinks, stats.skipped) == (6, 4, 4, 1)
    assert stats.bytes == 100_000 + GiB + len("#!/bin/sh\n") + len("deep")


def test_copy_tree_without_reflink_on_ext4(ext4_dir: Path) -> None:
    src, dst = ext4_dir / "src", ext4_dir / "dst"
    _make_tree(src)
    stats = copy_tree(str(src), str(dst))
    _check_copy(src, dst)
    assert stats.method == "copy"


def test_copy_tree_across_filesystems(xfs_dir: Path, ext4_dir: Path) -> None:
    src, dst = xfs_dir / "src", ext4_dir / "dst"
    _make_tree(src)
    assert copy_tree(str(src), str(dst), reflink=None).method == "copy"
    _check_copy(src, dst)


def test_reflinked_copy_is_independent(xfs_dir: Path) -> None:
    src, dst = xfs_dir / "src", xfs_dir / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"A" * 65536)
    assert copy_tree(str(src), str(dst), reflink=True).method == "reflink"
    with open(dst / "f", "r+b") as f:
        f.write(b"B" * 100)
    assert (src / "f").read_bytes() == b"A" * 65536


def test_symlinked_directory_is_not_entered(xfs_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("must not be copied")
    src = xfs_dir / "src"
    src.mkdir()
    (src / "door").symlink_to(outside)
    stats = copy_tree(str(src), str(xfs_dir / "dst"))
    assert os.readlink(xfs_dir / "dst" / "door") == str(outside)
    assert stats.files == 0 and stats.method == "none"


def test_reflink_required_but_unsupported(ext4_dir: Path) -> None:
    src = ext4_dir / "src"
    src.mkdir()
    (src / "f").write_text("x")
    with pytest.raises(FailedPrecondition, match="reflink"):
        copy_tree(str(src), str(ext4_dir / "dst"), reflink=True)
    assert not (ext4_dir / "dst").exists()


def test_copy_tree_argument_errors(xfs_dir: Path) -> None:
    src = xfs_dir / "src"
    src.mkdir()
    (xfs_dir / "taken").mkdir()
    with pytest.raises(AlreadyExists):
        copy_tree(str(src), str(xfs_dir / "taken"))
    with pytest.raises(InvalidArgument, match="into itself"):
        copy_tree(str(src), str(src / "inner"))
    with pytest.raises(NotFound):
        copy_tree(str(xfs_dir / "missing"), str(xfs_dir / "dst"))
    with pytest.raises(NotFound):
        copy_tree(str(src), str(xfs_dir / "no-parent" / "dst"))
    assert sorted(os.listdir(src)) == []


def test_failed_copy_removes_the_partial_tree(xfs_dir: Path, tiny_ext4_mount: Path) -> None:
    src = xfs_dir / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "small").write_text("fits")
    (src / "sub" / "big").write_bytes(os.urandom(32 << 20))  # twice the filesystem
    dst = tiny_ext4_mount / "dst"
    with pytest.raises(ResourceExhausted, match="no space"):
        copy_tree(str(src), str(dst))
    assert not dst.exists()


def test_copy_file_reports_the_method(xfs_dir: Path, ext4_dir: Path) -> None:
    data = os.urandom(300_000)
    (xfs_dir / "src").write_bytes(data)
    os.chmod(xfs_dir / "src", 0o640)
    assert copy_file(str(xfs_dir / "src"), str(xfs_dir / "dst")) == "reflink"
    assert copy_file(str(xfs_dir / "src"), str(xfs_dir / "dst2"), reflink=False) == "copy"
    assert copy_file(str(xfs_dir / "src"), str(ext4_dir / "dst")) == "copy"
    for copied in (xfs_dir / "dst", xfs_dir / "dst2", ext4_dir / "dst"):
        assert copied.read_bytes() == data
        assert stat.S_IMODE(os.stat(copied).st_mode) == 0o640


def test_copy_file_overwrites_an_existing_file(xfs_dir: Path) -> None:
    (xfs_dir / "src").write_bytes(b"new")
    (xfs_dir / "dst").write_bytes(b"old and longer")
    copy_file(str(xfs_dir / "src"), str(xfs_dir / "dst"))
    assert (xfs_dir / "dst").read_bytes() == b"new"


def test_clone_file_unsupported_leaves_nothing(ext4_dir: Path) -> None:
    (ext4_dir / "src").write_bytes(b"data")
    with pytest.raises(FailedPrecondition, match="reflink"):
        clone_file(str(ext4_dir / "src"), str(ext4_dir / "dst"))
    assert not (ext4_dir / "dst").exists()


def test_clone_file_shares_then_diverges(xfs_dir: Path) -> None:
    (xfs_dir / "src").write_bytes(b"Z" * 8192)
    clone_file(str(xfs_dir / "src"), str(xfs_dir / "dst"))
    with open(xfs_dir / "dst", "r+b") as f:
        f.write(b"changed")
    assert (xfs_dir / "src").read_bytes() == b"Z" * 8192


def test_copy_file_sparse_keeps_holes(ext4_dir: Path) -> None:
    image = ext4_dir / "image"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
        for offset in (0, 5 << 20, 100 << 20):
            f.seek(offset)
            f.write(os.urandom(8192))
    copy_file_sparse(str(image), str(ext4_dir / "copy"))
    copied = os.stat(ext4_dir / "copy")
    assert copied.st_size == 256 << 20
    assert copied.st_blocks <= os.stat(image).st_blocks
    with open(image, "rb") as a, open(ext4_dir / "copy", "rb") as b:
        for offset in (0, 5 << 20, 100 << 20):
            a.seek(offset)
            b.seek(offset)
            assert a.read(8192) == b.read(8192)


def test_copy_file_rejects_directories_and_missing_sources(xfs_dir: Path) -> None:
    with pytest.raises(InvalidArgument):
        copy_file(str(xfs_dir), str(xfs_dir / "dst"))
    with pytest.raises(NotFound):
        copy_file(str(xfs_dir / "missing"), str(xfs_dir / "dst"))
    assert not (xfs_dir / "dst").exists()


def test_read_only_destination_is_a_csi_error(xfs_dir: Path, unmount_after: Callable[[Path], Path]) -> None:
    src = xfs_dir / "src"
    src.mkdir()
    (xfs_dir / "ro-origin").mkdir()
    read_only = unmount_after(xfs_dir / "ro")
    read_only.mkdir()
    bind_mount(str(xfs_dir / "ro-origin"), str(read_only), readonly=True)
    with pytest.raises(Internal, match="EROFS"):
        copy_tree(str(src), str(read_only / "dst"))


def test_reflink_cache_is_not_fooled_by_a_reused_device(tmp_path: Path) -> None:
    """A new filesystem on the loop device (so the st_dev) an earlier one had is probed anew."""
    with loop_mounted_fs(str(tmp_path), "xfs", 320, reflink=True) as first:
        first_dev = os.stat(first).st_dev
        assert reflink_supported(first)
    with loop_mounted_fs(str(tmp_path), "xfs", 320, reflink=False) as second:
        # Usually the same loop device comes back; either way the answer must be right.
        same_device = os.stat(second).st_dev == first_dev
        assert not reflink_supported(second), f"same st_dev as before: {same_device}"
