"""XFS project quotas end to end.  Needs a kernel with XFS quota support, so
these run in the VM harness (marker `vm`); the no-quota cases run anywhere."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_kit.errors import FailedPrecondition
from csi_kit.linux import quota
from csi_kit.testing.fsimage import loop_mounted_fs

pytestmark = pytest.mark.privileged

MiB = 1 << 20


@pytest.fixture(scope="module")
def prjquota_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed")
    with loop_mounted_fs(str(tmp_path_factory.mktemp("prjquota")), "xfs", 320, options=["prjquota"]) as mp:
        yield Path(mp)


def test_not_enabled_without_the_mount_option(xfs_mount: Path) -> None:
    assert not quota.project_quota_enabled(str(xfs_mount))


def test_limit_on_a_filesystem_without_quota_fails_clearly(xfs_dir: Path) -> None:
    with pytest.raises(FailedPrecondition):
        quota.set_project_limit(str(xfs_dir), 4242, 4 * MiB)


@pytest.mark.vm
def test_project_quota_limits_a_directory(prjquota_mount: Path) -> None:
    assert quota.project_quota_enabled(str(prjquota_mount))
    volume = prjquota_mount / "vol"
    volume.mkdir()
    quota.set_project(str(volume), 1001)
    quota.set_project_limit(str(volume), 1001, 4 * MiB)
    assert quota.get_project_quota(str(volume), 1001).hard_bytes == 4 * MiB
    assert os.statvfs(volume).f_blocks * os.statvfs(volume).f_frsize == 4 * MiB  # df shows the limit
    (volume / "sub").mkdir()  # inherits the project
    with pytest.raises(OSError) as info, open(volume / "sub" / "fill", "wb") as f:
        for _ in range(8):
            f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())
    assert info.value.errno == errno.ENOSPC  # XFS reports a project over its limit as a full filesystem
    used, inodes = quota.project_usage(str(volume), 1001)
    assert 3 * MiB <= used <= 4 * MiB
    assert inodes == 3  # vol, sub, fill
    quota.clear_project_limit(str(volume), 1001)
    assert quota.get_project_quota(str(volume), 1001).hard_bytes == 0
    with open(volume / "sub" / "more", "wb") as f:
        f.write(os.urandom(2 * MiB))
        os.fsync(f.fileno())


@pytest.mark.vm
def test_recursive_set_project_moves_existing_files(prjquota_mount: Path) -> None:
    volume = prjquota_mount / "existing"
    (volume / "d").mkdir(parents=True)
    with open(volume / "d" / "f", "wb") as f:
        f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    quota.set_project(str(volume), 1002, recursive=True)
    used, inodes = quota.project_usage(str(volume), 1002)
    assert used >= MiB and inodes == 3


@pytest.mark.vm
def test_unused_project_reports_zero(prjquota_mount: Path) -> None:
    assert quota.project_usage(str(prjquota_mount), 4_000_000) == (0, 0)


@pytest.mark.vm
def test_quotactl_on_the_block_device_when_quotactl_fd_is_missing(
    prjquota_mount: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_quotactl_fd(*args: object) -> None:
        raise OSError(errno.ENOSYS, "quotactl_fd")

    monkeypatch.setattr(quota, "_quotactl_fd", no_quotactl_fd)
    volume = prjquota_mount / "old-kernel"
    volume.mkdir()
    quota.set_project(str(volume), 1003)
    assert quota.project_quota_enabled(str(volume))
    quota.set_project_limit(str(volume), 1003, 2 * MiB)
    assert quota.get_project_quota(str(volume), 1003).hard_bytes == 2 * MiB
    (volume / "f").write_bytes(b"x" * 8192)
    used, inodes = quota.project_usage(str(volume), 1003)
    assert used >= 8192 and inodes == 2
