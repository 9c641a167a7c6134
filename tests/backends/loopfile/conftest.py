"""A real loopfile driver for the tests: served over gRPC on a unix socket,
its root on a loop-mounted XFS (reflink) or ext4 (copy fallback) image.

Every test gets a fresh root directory and a tmp_path for staging and target
paths; whatever the test leaves mounted below them, or attached to an image
under its root, is undone afterwards (even when the test failed) and then
reported as a failure — a leak is a bug.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopfile_helpers import Csi, cleanup_leaks, serve

from csi_kit.testing.fsimage import loop_mounted_fs


def _filesystem(tmp_path_factory: pytest.TempPathFactory, fs_type: str, size_mb: int) -> Iterator[Path]:
    for tool in (f"mkfs.{fs_type}", "mkfs.ext4", "mkfs.xfs", "blkid", "e2fsck", "resize2fs", "xfs_growfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    with loop_mounted_fs(str(tmp_path_factory.mktemp(f"root-{fs_type}")), fs_type, size_mb) as mount_point:
        yield Path(mount_point)


@pytest.fixture(scope="session")
def xfs_root_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """XFS with reflink=1: snapshots and clones are reflinks."""
    yield from _filesystem(tmp_path_factory, "xfs", 2048)


@pytest.fixture(scope="session")
def ext4_root_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """ext4: no reflink, snapshots and clones are in-kernel sparse copies."""
    yield from _filesystem(tmp_path_factory, "ext4", 2048)


@pytest.fixture(params=["xfs-root", "ext4-root"])
def root_fs(request: pytest.FixtureRequest) -> Path:
    """The filesystem under the driver's root: XFS (reflink) or ext4 (copies)."""
    name = "xfs_root_fs" if request.param == "xfs-root" else "ext4_root_fs"
    return Path(request.getfixturevalue(name))


@pytest.fixture
def xfs_root(xfs_root_fs: Path) -> Path:
    return xfs_root_fs


@pytest.fixture
def driver_root(root_fs: Path) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="lf-", dir=root_fs))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def work() -> Iterator[Path]:
    """Staging and target paths; short, so the socket path stays under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="csi-kit-lf-"))
    yield path
    with contextlib.suppress(OSError):
        shutil.rmtree(path)


@pytest.fixture
def csi(driver_root: Path, work: Path) -> Iterator[Csi]:
    """A driver on `driver_root`; leaks are cleaned up and then fail the test."""
    try:
        with serve(driver_root, work) as client:
            yield client
    finally:
        leaks = cleanup_leaks(driver_root, work)
    assert not leaks, f"left behind: {leaks}"
