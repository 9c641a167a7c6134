"""Bind mounts, mounts and unmounts against the real kernel."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from csi_kit.errors import CommandFailed, FailedPrecondition, InvalidArgument, NotFound
from csi_kit.linux.mounts import (
    bind_mount,
    is_mounted,
    mount,
    mounts_at,
    mounts_under,
    remount_readonly,
    unmount,
    unmount_all,
    unmount_stack,
)

pytestmark = pytest.mark.privileged

Register = Callable[[Path], Path]


def _pair(base: Path) -> tuple[Path, Path]:
    source, target = base / "source", base / "target"
    source.mkdir()
    target.mkdir()
    return source, target


def test_bind_mount_on_the_same_filesystem_is_seen(xfs_dir: Path, unmount_after: Register) -> None:
    source, target = _pair(xfs_dir)
    bind_mount(str(source), str(unmount_after(target)))
    assert is_mounted(str(target))
    assert not os.path.ismount(target)  # why mount state comes from mountinfo
    [entry] = mounts_at(str(target))
    assert entry.fs_type == "xfs"
    assert entry.root == "/" + source.relative_to(xfs_dir.parent).as_posix()
    assert not entry.readonly
    (target / "written-through").write_text("x")
    assert (source / "written-through").read_text() == "x"


def test_read_only_bind_mount_refuses_writes(xfs_dir: Path, unmount_after: Register) -> None:
    source, target = _pair(xfs_dir)
    (source / "existing").write_text("data")
    bind_mount(str(source), str(unmount_after(target)), readonly=True)
    assert mounts_at(str(target))[-1].readonly
    assert (target / "existing").read_text() == "data"
    with pytest.raises(OSError) as info:
        (target / "new").write_text("x")
    assert info.value.errno == errno.EROFS
    (source / "still-writable").write_text("y")  # only this mount is read-only


def test_read_only_bind_keeps_nosuid_nodev_noexec(tmp_path: Path, unmount_after: Register) -> None:
    source, target = _pair(tmp_path)
    mount("tmpfs", str(unmount_after(source)), "tmpfs", ["size=1m", "nosuid", "nodev", "noexec"])
    bind_mount(str(source), str(unmount_after(target)), readonly=True)
    options = mounts_at(str(target))[-1].options
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(options)


def test_remount_readonly(xfs_dir: Path, unmount_after: Register) -> None:
    source, target = _pair(xfs_dir)
    bind_mount(str(source), str(unmount_after(target)))
    remount_readonly(str(target))
    assert mounts_at(str(target))[-1].readonly
    assert not mounts_at(str(xfs_dir.parent))[-1].readonly


def test_stacked_mounts_and_unmount_all(xfs_dir: Path, unmount_after: Register) -> None:
    source, target = _pair(xfs_dir)
    unmount_after(target)
    bind_mount(str(source), str(target), readonly=True)
    bind_mount(str(source), str(target))
    stacked = mounts_at(str(target))
    assert len(stacked) == 2
    assert stacked[0].readonly and not stacked[-1].readonly
    unmount(str(target))
    assert len(mounts_at(str(target))) == 1
    nested = xfs_dir / "nested"
    nested.mkdir()
    bind_mount(str(source), str(target))
    (target / "inner").mkdir()
    bind_mount(str(nested), str(target / "inner"))
    assert len(mounts_under(str(target))) == 3
    assert unmount_all(str(target)) == 3
    assert mounts_under(str(target)) == []


def test_unmount_is_idempotent(xfs_dir: Path, unmount_after: Register) -> None:
    source, target = _pair(xfs_dir)
    bind_mount(str(source), str(unmount_after(target)))
    unmount(str(target))
    assert not is_mounted(str(target))
    unmount(str(target))  # not mounted
    unmount(str(xfs_dir / "does-not-exist"))  # no such path
    unmount(str(target), lazy=True)


def test_busy_unmount_is_failed_precondition(xfs_dir: Path, unmount_after: Register) -> None:
    source, target = _pair(xfs_dir)
    bind_mount(str(source), str(unmount_after(target)))
    fd = os.open(target / "open-file", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        with pytest.raises(FailedPrecondition, match="busy"):
            unmount(str(target))
        assert is_mounted(str(target))
    finally:
        os.close(fd)
    unmount(str(target))
    assert not is_mounted(str(target))


def test_unmount_does_not_follow_a_symlink(xfs_dir: Path, unmount_after: Register) -> None:
    source, target = _pair(xfs_dir)
    bind_mount(str(source), str(unmount_after(target)))
    link = xfs_dir / "link"
    link.symlink_to(target)
    unmount(str(link))
    assert is_mounted(str(target))


def test_file_and_block_device_bind_mounts(xfs_dir: Path, xfs_mount: Path, unmount_after: Register) -> None:
    source_file = xfs_dir / "file"
    source_file.write_text("content")
    target_file = unmount_after(xfs_dir / "file-target")
    target_file.touch()
    bind_mount(str(source_file), str(target_file), readonly=True)
    assert is_mounted(str(target_file))
    assert target_file.read_text() == "content"

    device = mounts_at(str(xfs_mount))[-1].source  # the loop device under the XFS image
    device_target = unmount_after(xfs_dir / "block-target")
    device_target.touch()
    bind_mount(device, str(device_target))
    target_stat = os.stat(device_target)
    assert stat.S_ISBLK(target_stat.st_mode)
    assert target_stat.st_rdev == os.stat(device).st_rdev
    assert is_mounted(str(device_target))


def test_path_with_spaces_round_trips(xfs_dir: Path, unmount_after: Register) -> None:
    source = xfs_dir / "src dir"
    target = xfs_dir / "tgt dir\twith tab"
    source.mkdir()
    target.mkdir()
    bind_mount(str(source), str(unmount_after(target)))
    assert mounts_at(str(target))[-1].mount_point == str(target)


def test_bind_mount_of_a_missing_source(xfs_dir: Path) -> None:
    target = xfs_dir / "target"
    target.mkdir()
    with pytest.raises(NotFound):
        bind_mount(str(xfs_dir / "missing"), str(target))
    assert not is_mounted(str(target))


def test_mount_tool_with_options(tmp_path: Path, unmount_after: Register) -> None:
    target = unmount_after(tmp_path / "mnt")
    target.mkdir()
    mount("tmpfs", str(target), "tmpfs", ["size=2m", "mode=0750"], readonly=True)
    entry = mounts_at(str(target))[-1]
    assert entry.fs_type == "tmpfs" and entry.readonly
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o750
    assert "size=2048k" in entry.super_options


def test_mount_failure_is_command_failed(tmp_path: Path, xfs_dir: Path) -> None:
    not_a_filesystem = xfs_dir / "zeros.img"
    with open(not_a_filesystem, "wb") as f:
        f.truncate(1 << 20)
    target = tmp_path / "mnt"
    target.mkdir()
    with pytest.raises(CommandFailed) as info:
        mount(str(not_a_filesystem), str(target), "xfs", ["loop"])
    assert info.value.returncode != 0
    assert not is_mounted(str(target))


def test_option_looking_source_is_not_an_option(tmp_path: Path, unmount_after: Register) -> None:
    target = unmount_after(tmp_path / "mnt")
    target.mkdir()
    mount("--bind", str(target), "tmpfs")  # after "--" it is tmpfs's (ignored) source, not a flag
    entry = mounts_at(str(target))[-1]
    assert (entry.fs_type, entry.source) == ("tmpfs", "--bind")


# -- caller paths: no symlink followed, exact paths only ---------------------------------------


def test_bind_onto_a_symlinked_target_mounts_nothing(xfs_dir: Path, unmount_after: Register) -> None:
    source, victim = _pair(xfs_dir)
    (xfs_dir / "link").symlink_to(victim)
    for target in (xfs_dir / "link", xfs_dir / "link" / "sub"):
        with pytest.raises(InvalidArgument, match="symlink"):
            bind_mount(str(source), str(unmount_after(target)))
    assert not is_mounted(str(victim))
    assert os.path.islink(xfs_dir / "link")


def test_unmount_through_a_symlinked_parent_leaves_the_mount(xfs_dir: Path, unmount_after: Register) -> None:
    source, target = _pair(xfs_dir)
    bind_mount(str(source), str(unmount_after(target)))
    (xfs_dir / "link").symlink_to(xfs_dir)
    with pytest.raises(InvalidArgument, match="symlink"):
        unmount(str(xfs_dir / "link" / "target"))
    # The last component a link: UMOUNT_NOFOLLOW means "not a mount point", nothing happens.
    (xfs_dir / "tlink").symlink_to(target)
    unmount(str(xfs_dir / "tlink"))
    assert is_mounted(str(target))


def test_unmount_stack_takes_only_the_exact_path(xfs_dir: Path, unmount_after: Register) -> None:
    source, target = _pair(xfs_dir)
    other = xfs_dir / "other"
    other.mkdir()
    bind_mount(str(source), str(unmount_after(target)))
    bind_mount(str(source), str(target))  # a retried publish: the same bind twice
    inner = target / "inner"
    inner.mkdir()
    bind_mount(str(other), str(unmount_after(inner)))  # something below it that is not ours
    with pytest.raises(FailedPrecondition, match="busy"):
        unmount_stack(str(target))  # the kernel refuses: a mount below the target
    assert is_mounted(str(inner))
    unmount(str(inner))
    assert unmount_stack(str(target)) == 2
    assert not is_mounted(str(target))


def test_unmount_stack_stops_at_a_foreign_mount_below(xfs_dir: Path, unmount_after: Register) -> None:
    source, target = _pair(xfs_dir)
    foreign = xfs_dir / "foreign"
    foreign.mkdir()
    bind_mount(str(foreign), str(unmount_after(target)))  # was there before us
    bind_mount(str(source), str(target))
    assert unmount_stack(str(target)) == 1
    (left,) = mounts_at(str(target))
    assert left.root.endswith("/foreign")  # the foreign bind is still there


def test_unmount_of_root_is_refused() -> None:
    before = len(mounts_under("/"))
    with pytest.raises(InvalidArgument):
        unmount("/")
    assert len(mounts_under("/")) == before


def test_mount_tool_mounts_through_the_descriptor(xfs_dir: Path, unmount_after: Register) -> None:
    target = xfs_dir / "tmpfs"
    target.mkdir()
    mount("csi-kit-test", str(unmount_after(target)), "tmpfs", ["size=4k"])
    (here,) = mounts_at(str(target))
    assert here.source == "csi-kit-test" and here.fs_type == "tmpfs"
    (xfs_dir / "link").symlink_to(xfs_dir)
    with pytest.raises(InvalidArgument, match="symlink"):
        mount("csi-kit-test", str(xfs_dir / "link" / "tmpfs"), "tmpfs", ["size=4k"])
    assert len(mounts_at(str(target))) == 1
