"""Real filesystems for the csi_kit.linux tests: loop-mounted images in a
temporary directory, made once per session and always torn down."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from csi_kit.errors import CSIError
from csi_kit.linux.mounts import mounts_under, unmount
from csi_kit.testing.fsimage import loop_mounted_fs


def _filesystem(
    tmp_path_factory: pytest.TempPathFactory, fs_type: str, size_mb: int, **kw: bool
) -> Iterator[Path]:
    tool = f"mkfs.{fs_type}"
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    with loop_mounted_fs(str(tmp_path_factory.mktemp(fs_type)), fs_type, size_mb, **kw) as mount_point:
        yield Path(mount_point)


@pytest.fixture(scope="session")
def xfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """XFS with reflink=1."""
    yield from _filesystem(tmp_path_factory, "xfs", 320, reflink=True)


@pytest.fixture(scope="session")
def xfs_noreflink_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield from _filesystem(tmp_path_factory, "xfs", 320, reflink=False)


@pytest.fixture(scope="session")
def ext4_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield from _filesystem(tmp_path_factory, "ext4", 256)


@pytest.fixture(scope="session")
def tiny_ext4_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """16 MiB: small enough to fill up on purpose."""
    yield from _filesystem(tmp_path_factory, "ext4", 16)


def _fresh(base: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=base, prefix="t-"))


@pytest.fixture
def xfs_dir(xfs_mount: Path) -> Path:
    """A new empty directory on the reflink XFS filesystem."""
    return _fresh(xfs_mount)


@pytest.fixture
def ext4_dir(ext4_mount: Path) -> Path:
    return _fresh(ext4_mount)


@pytest.fixture
def unmount_after(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """Register mount points the test makes; whatever is still mounted below them is undone at the end."""
    targets: list[Path] = []

    def register(target: Path) -> Path:
        targets.append(target)
        return target

    yield register
    for target in reversed(targets):
        for m in reversed(mounts_under(str(target))):
            try:
                unmount(m.mount_point)
            except CSIError:
                unmount(m.mount_point, lazy=True)
