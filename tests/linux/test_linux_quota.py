"""XFS project quota: the structs and ioctl/quotactl numbers must match the
kernel headers exactly, and input is validated before any syscall."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from csi_kit.errors import InvalidArgument
from csi_kit.linux import copy, fs, quota
from csi_kit.linux.mounts import MountInfo
from csi_kit.linux.quota import DiskQuota, pack_disk_quota, unpack_disk_quota

C_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/dqblk_xfs.h>
#include <linux/quota.h>
#include <linux/fs.h>
int main(void) {
    printf("disk_quota_size %zu\n", sizeof(struct fs_disk_quota));
    printf("d_id %zu\n", offsetof(struct fs_disk_quota, d_id));
    printf("d_blk_hardlimit %zu\n", offsetof(struct fs_disk_quota, d_blk_hardlimit));
    printf("d_bcount %zu\n", offsetof(struct fs_disk_quota, d_bcount));
    printf("d_icount %zu\n", offsetof(struct fs_disk_quota, d_icount));
    printf("d_rtb_hardlimit %zu\n", offsetof(struct fs_disk_quota, d_rtb_hardlimit));
    printf("quota_stat_size %zu\n", sizeof(struct fs_quota_stat));
    printf("qs_flags %zu\n", offsetof(struct fs_quota_stat, qs_flags));
    printf("fsxattr_size %zu\n", sizeof(struct fsxattr));
    printf("fsx_projid %zu\n", offsetof(struct fsxattr, fsx_projid));
    printf("FS_IOC_FSGETXATTR %lu\n", (unsigned long)FS_IOC_FSGETXATTR);
    printf("FS_IOC_FSSETXATTR %lu\n", (unsigned long)FS_IOC_FSSETXATTR);
    printf("FS_XFLAG_PROJINHERIT %lu\n", (unsigned long)FS_XFLAG_PROJINHERIT);
    printf("FICLONE %lu\n", (unsigned long)FICLONE);
    printf("FIFREEZE %lu\n", (unsigned long)FIFREEZE);
    printf("FITHAW %lu\n", (unsigned long)FITHAW);
    printf("Q_XGETQSTAT %d\n", QCMD(Q_XGETQSTAT, PRJQUOTA));
    printf("Q_XSETQLIM %d\n", QCMD(Q_XSETQLIM, PRJQUOTA));
    printf("Q_XGETQUOTA %d\n", QCMD(Q_XGETQUOTA, PRJQUOTA));
    printf("FS_PROJ_QUOTA %d\n", FS_PROJ_QUOTA);
    printf("FS_DQ_BHARD %d\n", FS_DQ_BHARD);
    printf("FS_QUOTA_PDQ_ENFD %d\n", FS_QUOTA_PDQ_ENFD);
    return 0;
}
"""


@pytest.fixture(scope="module")
def kernel_abi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """The numbers as the C compiler sees them in this machine's kernel headers."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/linux/dqblk_xfs.h").exists():
        pytest.skip("needs a C compiler and the Linux UAPI headers")
    work = tmp_path_factory.mktemp("abi")
    (work / "probe.c").write_text(C_PROBE)
    subprocess.run([cc, "-o", str(work / "probe"), str(work / "probe.c")], check=True)
    out = subprocess.run([str(work / "probe")], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_struct_layouts_match_the_kernel(kernel_abi: dict[str, int]) -> None:
    assert quota.DISK_QUOTA.size == kernel_abi["disk_quota_size"] == 112
    assert quota.QUOTA_STAT.size == kernel_abi["quota_stat_size"]
    assert quota.FSXATTR.size == kernel_abi["fsxattr_size"]
    # Offsets: pack a struct with distinct values and find where each landed.
    packed = quota.DISK_QUOTA.pack(
        1, 2, 3, 0x11111111, *range(100, 106), 7, 8, 9, 10, 11, 12, 13, 14, 200, 201, 202, 15, 16, 17, b""
    )
    assert int.from_bytes(packed[kernel_abi["d_id"] :][:4], sys.byteorder) == 0x11111111
    assert int.from_bytes(packed[kernel_abi["d_blk_hardlimit"] :][:8], sys.byteorder) == 100
    assert int.from_bytes(packed[kernel_abi["d_bcount"] :][:8], sys.byteorder) == 104
    assert int.from_bytes(packed[kernel_abi["d_icount"] :][:8], sys.byteorder) == 105
    assert int.from_bytes(packed[kernel_abi["d_rtb_hardlimit"] :][:8], sys.byteorder) == 200
    stat = quota.QUOTA_STAT.pack(1, 0x1234, 0, *([0] * 6), 0, 0, 0, 0, 0, 0)
    assert int.from_bytes(stat[kernel_abi["qs_flags"] :][:2], sys.byteorder) == 0x1234
    fsx = quota.FSXATTR.pack(0, 0, 0, 0xABCDEF, 0, b"")
    assert int.from_bytes(fsx[kernel_abi["fsx_projid"] :][:4], sys.byteorder) == 0xABCDEF


def test_ioctl_and_command_numbers_match_the_kernel(kernel_abi: dict[str, int]) -> None:
    ours = {
        "FS_IOC_FSGETXATTR": quota.FS_IOC_FSGETXATTR,
        "FS_IOC_FSSETXATTR": quota.FS_IOC_FSSETXATTR,
        "FS_XFLAG_PROJINHERIT": quota.FS_XFLAG_PROJINHERIT,
        "FICLONE": copy.FICLONE,
        "FIFREEZE": fs.FIFREEZE,
        "FITHAW": fs.FITHAW,
        "Q_XGETQSTAT": quota.qcmd(quota.Q_XGETQSTAT, quota.PRJQUOTA),
        "Q_XSETQLIM": quota.qcmd(quota.Q_XSETQLIM, quota.PRJQUOTA),
        "Q_XGETQUOTA": quota.qcmd(quota.Q_XGETQUOTA, quota.PRJQUOTA),
        "FS_PROJ_QUOTA": quota.FS_PROJ_QUOTA,
        "FS_DQ_BHARD": quota.FS_DQ_BHARD,
        "FS_QUOTA_PDQ_ENFD": quota.FS_QUOTA_PDQ_ENFD,
    }
    assert ours == {name: kernel_abi[name] for name in ours}


def test_known_values_without_a_compiler() -> None:
    assert quota.qcmd(quota.Q_XGETQSTAT, quota.PRJQUOTA) == 0x580502
    assert (quota.DISK_QUOTA.size, quota.QUOTA_STAT.size, quota.FSXATTR.size) == (112, 80, 28)


def test_pack_limit_rounds_up_to_basic_blocks() -> None:
    data = pack_disk_quota(DiskQuota(project_id=7, hard_bytes=1000, soft_bytes=512), quota.FS_DQ_BHARD)
    fields = quota.DISK_QUOTA.unpack(data)
    assert fields[:6] == (1, quota.FS_PROJ_QUOTA, quota.FS_DQ_BHARD, 7, 2, 1)
    assert set(fields[6:-1]) == {0}


def test_unpack_reports_bytes_and_inodes() -> None:
    data = quota.DISK_QUOTA.pack(1, 2, 0, 42, 2048, 1024, 50, 40, 10, 3, *([0] * 14), b"")
    assert unpack_disk_quota(data + b"\0" * 8) == DiskQuota(
        project_id=42,
        hard_bytes=2048 * 512,
        soft_bytes=1024 * 512,
        hard_inodes=50,
        soft_inodes=40,
        used_bytes=5120,
        used_inodes=3,
    )


def _mount(fs_type: str, super_options: tuple[str, ...]) -> MountInfo:
    return MountInfo(1, 0, 7, 0, "/", "/m", ("rw",), fs_type, "/dev/loop0", super_options)


def test_project_quota_mount_options() -> None:
    assert quota.has_project_quota_option(_mount("xfs", ("rw", "inode64", "prjquota")))
    assert quota.has_project_quota_option(_mount("xfs", ("rw", "pquota")))
    assert not quota.has_project_quota_option(_mount("xfs", ("rw", "pqnoenforce")))
    assert not quota.has_project_quota_option(_mount("xfs", ("rw", "noquota")))
    assert not quota.has_project_quota_option(_mount("ext4", ("rw", "prjquota")))


@pytest.mark.parametrize("project_id", [0, -1, 2**32 - 1, 2**32, True])
def test_bad_project_ids_are_rejected(tmp_path: Path, project_id: int) -> None:
    with pytest.raises(InvalidArgument, match="project id"):
        quota.set_project(str(tmp_path), project_id)
    with pytest.raises(InvalidArgument, match="project id"):
        quota.set_project_limit(str(tmp_path), project_id, 1 << 20)
    with pytest.raises(InvalidArgument, match="project id"):
        quota.project_usage(str(tmp_path), project_id)


@pytest.mark.parametrize("limit", [0, -4096])
def test_non_positive_limit_is_rejected(tmp_path: Path, limit: int) -> None:
    with pytest.raises(InvalidArgument, match="positive"):
        quota.set_project_limit(str(tmp_path), 10, limit)


def test_not_enabled_on_a_filesystem_without_project_quota(tmp_path: Path) -> None:
    # tmp_path lives on the root filesystem (not XFS with prjquota here or in CI containers).
    mount = fs.filesystem_of(str(tmp_path))
    if quota.has_project_quota_option(mount):
        pytest.skip("tmp_path is on an XFS filesystem with project quotas")
    assert not quota.project_quota_enabled(str(tmp_path))
    assert not quota.project_quota_enabled(str(tmp_path / "missing"))
