"""The process's mount table is cached between changes (`csi_kit.linux.mounts._MountTable`):
every mount, stacked mount, remount and unmount made since the last read shows in the next one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_kit.linux import mounts
from csi_kit.linux.mounts import bind_mount, is_mounted, mounts_at, read_mountinfo, unmount

pytestmark = pytest.mark.privileged


def _at(path: str) -> list[mounts.MountInfo]:
    return [m for m in read_mountinfo() if m.mount_point == path]


def test_each_change_shows_in_the_next_read(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    assert not is_mounted(str(target))
    assert read_mountinfo() == read_mountinfo()  # unchanged: served from the cache
    bind_mount(str(source), str(target))
    try:
        assert is_mounted(str(target))
        assert len(_at(str(target))) == 1
        bind_mount(str(source), str(target), readonly=True)  # stacked on top
        assert len(_at(str(target))) == 2
        assert "ro" in mounts_at(str(target))[-1].options
        unmount(str(target))
        assert len(_at(str(target))) == 1
    finally:
        while is_mounted(str(target)):
            unmount(str(target))
    assert _at(str(target)) == []


def test_a_change_made_by_another_process_shows_too(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    read_mountinfo()  # the cache is warm
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            bind_mount(str(tmp_path), str(target))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    try:
        assert is_mounted(str(target))
    finally:
        unmount(str(target))
    assert not is_mounted(str(target))


def test_another_table_file_is_read_every_time(tmp_path: Path) -> None:
    sample = tmp_path / "mountinfo"
    sample.write_bytes(b"22 27 0:21 / /proc rw,relatime - proc proc rw\n")
    assert [m.mount_point for m in read_mountinfo(str(sample))] == ["/proc"]
    sample.write_bytes(b"23 27 0:22 / /sys rw,relatime - sysfs sysfs rw\n")
    assert [m.mount_point for m in read_mountinfo(str(sample))] == ["/sys"]
