"""mountinfo parsing and the mount-table queries built on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_kit.errors import Internal, InvalidArgument, NotFound
from csi_kit.linux.mounts import (
    MountInfo,
    is_mounted,
    mount,
    mounts_at,
    mounts_under,
    normalize,
    parse_mountinfo,
    read_mountinfo,
)

SAMPLE = rb"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
60 27 7:3 / /mnt/with\040space rw,nosuid,nodev shared:31 master:7 - xfs /dev/loop3 rw,inode64,prjquota
61 27 7:3 /vols/a /var/lib/kubelet/pods/p1/volumes/x/mount ro,relatime - xfs /dev/loop3 rw,prjquota
62 27 7:3 /vols/a /var/lib/kubelet/pods/p1/volumes/x/mount rw,relatime - xfs /dev/loop3 rw,prjquota
63 27 0:50 / /mnt/back\134slash\011tab\012nl rw unbindable - fuse.sshfs user@host:/a\040b rw,user_id=0
64 27 0:51 / /mnt/ab rw - tmpfs tmpfs ro
65 64 0:52 / /mnt/ab/sub rw - tmpfs tmpfs rw
66 27 0:53 / /mnt/a rw - nsfs nsfs rw
"""


@pytest.fixture
def table() -> list[MountInfo]:
    return parse_mountinfo(SAMPLE)


def test_fields(table: list[MountInfo]) -> None:
    root = table[1]
    assert root == MountInfo(
        mount_id=27,
        parent_id=1,
        major=254,
        minor=0,
        root="/",
        mount_point="/",
        options=("rw", "relatime"),
        fs_type="ext4",
        source="/dev/vda",
        super_options=("rw", "discard"),
        optional_fields=("shared:1",),
    )
    assert len(table) == 9


def test_octal_escapes(table: list[MountInfo]) -> None:
    assert table[2].mount_point == "/mnt/with space"
    assert table[5].mount_point == "/mnt/back\\slash\ttab\nnl"
    assert table[5].source == "user@host:/a b"
    assert table[5].fs_type == "fuse.sshfs"


def test_optional_fields_and_separator(table: list[MountInfo]) -> None:
    assert table[0].optional_fields == ()
    assert table[2].optional_fields == ("shared:31", "master:7")
    assert table[5].optional_fields == ("unbindable",)
    assert table[2].fs_type == "xfs" and table[2].source == "/dev/loop3"
    assert table[2].super_options == ("rw", "inode64", "prjquota")
    assert table[3].root == "/vols/a"


def test_readonly_from_mount_or_superblock(table: list[MountInfo]) -> None:
    assert table[3].readonly  # per-mount ro (a read-only bind)
    assert table[6].readonly  # filesystem ro, mount rw
    assert not table[4].readonly


def test_malformed_line_is_internal() -> None:
    with pytest.raises(Internal, match="cannot parse mountinfo"):
        parse_mountinfo(b"22 27 0:21 / /proc rw,relatime proc proc rw\n")
    with pytest.raises(Internal):
        parse_mountinfo(b"x 27 0:21 / /proc rw - proc proc rw\n")


def test_non_utf8_path_round_trips() -> None:
    [entry] = parse_mountinfo(b"70 27 0:60 / /mnt/\xff\xfe rw - tmpfs tmpfs rw\n")
    assert os.fsencode(entry.mount_point) == b"/mnt/\xff\xfe"


def test_mounts_at_keeps_stacking_order(table: list[MountInfo]) -> None:
    target = "/var/lib/kubelet/pods/p1/volumes/x/mount"
    found = mounts_at(target, table=table)
    assert [m.mount_id for m in found] == [61, 62]
    assert not found[-1].readonly  # the visible one is the last
    assert [m.mount_id for m in mounts_at(target + "/", table=table)] == [61, 62]
    assert [m.mount_id for m in mounts_at(target + "/../mount/.", table=table)] == [61, 62]
    assert mounts_at("/var/lib/kubelet", table=table) == []


def test_mounts_under_respects_component_boundaries(table: list[MountInfo]) -> None:
    assert [m.mount_id for m in mounts_under("/mnt/a", table=table)] == [66]
    assert [m.mount_id for m in mounts_under("/mnt/ab", table=table)] == [64, 65]
    assert [m.mount_id for m in mounts_under("/mnt/ab/", table=table)] == [64, 65]


def test_normalize_resolves_parent_symlinks_only(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (real / "leaf").symlink_to("/nonexistent")
    resolved = os.path.realpath(real)
    assert normalize(str(tmp_path / "link" / "x")) == os.path.join(resolved, "x")
    assert normalize(str(tmp_path / "link" / "leaf")) == os.path.join(resolved, "leaf")
    assert normalize("/") == "/"


def test_read_mountinfo_of_this_process() -> None:
    table = read_mountinfo()
    assert any(m.mount_point == "/" for m in table)
    assert any(m.mount_point == "/proc" and m.fs_type == "proc" for m in table)
    assert is_mounted("/proc")
    assert is_mounted("/proc/")


def test_plain_directory_is_not_mounted(tmp_path: Path) -> None:
    assert not is_mounted(str(tmp_path))
    assert not is_mounted(str(tmp_path / "missing"))


def test_read_mountinfo_from_a_file(tmp_path: Path) -> None:
    sample = tmp_path / "mountinfo"
    sample.write_bytes(SAMPLE)
    assert read_mountinfo(str(sample)) == parse_mountinfo(SAMPLE)
    with pytest.raises(NotFound):
        read_mountinfo(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("options", "fs_type"),
    [
        (["rw,exec"], "tmpfs"),
        (["size=1m\nro"], "tmpfs"),
        ([""], "tmpfs"),
        ("ro,nosuid", "tmpfs"),
        ([], "tmp fs"),
        ([], "xfs,ext4"),
        ([], ""),
    ],
)
def test_mount_validates_before_running(tmp_path: Path, options: list[str], fs_type: str) -> None:
    with pytest.raises(InvalidArgument):
        mount("none", str(tmp_path), fs_type, options)
    assert not is_mounted(str(tmp_path))
