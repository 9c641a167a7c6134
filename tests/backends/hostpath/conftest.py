"""Real filesystems and real drivers for the hostPath privileged tests.

Each filesystem is a loop-mounted image in a temporary directory made once per
module and always torn down; each driver serves a hostPath root on one of
them from a short state directory (socket paths are limited to 107 bytes).
Every mount a test makes under its own directories is undone at teardown,
even when the test fails, before the filesystem goes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from helpers import Csi, short_dir
from hp_helpers import HostPath

from csi_kit.errors import CSIError
from csi_kit.linux.mounts import mounts_under, unmount
from csi_kit.testing.driver import running_driver
from csi_kit.testing.fsimage import loop_mounted_fs


def _unmount_below(path: str) -> None:
    for m in reversed(mounts_under(path)):
        try:
            unmount(m.mount_point)
        except CSIError:
            unmount(m.mount_point, lazy=True)


@pytest.fixture(scope="module")
def filesystem(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh filesystem of the type the test module names in FS_TYPE (default: none, plain /tmp)."""
    fs_type: str = getattr(request.module, "FS_TYPE", "")
    if not fs_type:
        with short_dir("ck-root-") as d:
            yield d
        return
    tool = f"mkfs.{fs_type}"
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    size = int(getattr(request.module, "FS_SIZE_MB", 320 if fs_type == "xfs" else 128))
    options = list(getattr(request.module, "FS_OPTIONS", ()))
    with loop_mounted_fs(
        str(tmp_path_factory.mktemp(fs_type)), fs_type, size, options=options
    ) as mount_point:
        yield mount_point


@pytest.fixture(scope="module")
def hostpath(filesystem: str) -> Iterator[HostPath]:
    root = os.path.join(filesystem, "hp")
    # Targets live outside the state directory: the driver refuses paths inside its own roots.
    with short_dir() as state, short_dir("ck-tg-") as targets:
        try:
            with running_driver(state, backend_options={"root": root}) as ep, Csi(ep) as csi:
                yield HostPath(csi, state, root, targets)
        finally:
            _unmount_below(targets)
            _unmount_below(state)


@pytest.fixture
def targets(hostpath: HostPath) -> Iterator[str]:
    """A per-test directory for publish targets; whatever is mounted below it is undone after."""
    path = os.path.join(hostpath.targets, os.urandom(4).hex())
    os.mkdir(path)
    try:
        yield path
    finally:
        _unmount_below(path)
        shutil.rmtree(path, ignore_errors=True)
