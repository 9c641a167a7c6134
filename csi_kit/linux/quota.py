"""XFS project quotas: the capacity limit of a directory-backed volume.

A volume directory gets its own project id (FS_IOC_FSSETXATTR sets
fsx_projid plus FS_XFLAG_PROJINHERIT, so everything later created inside
inherits it), and the project gets a hard block limit.  XFS then answers
writes beyond the limit with EDQUOT, and statfs on the directory reports the
limit as the size, so `df` in the pod shows the volume's capacity.

Limits are set with quotactl(2) through ctypes rather than by running
``xfs_quota -x -c "limit -p bhard=N ID" MOUNTPOINT``: errors come back as an
errno instead of English text to parse, the driver image does not need
xfsprogs, and there is no per-call process start.  quotactl_fd(2) (Linux
5.14+) is used when present, as it needs only an open file on the filesystem;
older kernels get quotactl(2) with the filesystem's block device node, which
must then exist in the driver's /dev.

The filesystem must be mounted with ``prjquota`` (XFS cannot turn
accounting on after mount); `project_quota_enabled` checks that.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct

import attrs

from csi_kit.errors import FailedPrecondition, Internal, InvalidArgument, NotFound
from csi_kit.linux._libc import check_call, errno_name, libc
from csi_kit.linux.fs import filesystem_of
from csi_kit.linux.mounts import MountInfo

__all__ = [
    "DiskQuota",
    "clear_project_limit",
    "get_project",
    "get_project_quota",
    "project_quota_enabled",
    "project_usage",
    "set_project",
    "set_project_limit",
]

log = logging.getLogger("csi_kit.linux")

# <linux/quota.h>, <linux/dqblk_xfs.h>
PRJQUOTA = 2
SUBCMDSHIFT = 8
SUBCMDMASK = 0xFF


def _xqm_cmd(x: int) -> int:
    return (ord("X") << 8) + x


Q_XGETQUOTA = _xqm_cmd(3)
Q_XSETQLIM = _xqm_cmd(4)
Q_XGETQSTAT = _xqm_cmd(5)

FS_DQUOT_VERSION = 1
FS_PROJ_QUOTA = 2  # fs_disk_quota.d_flags
FS_DQ_ISOFT = 1 << 0
FS_DQ_IHARD = 1 << 1
FS_DQ_BSOFT = 1 << 2
FS_DQ_BHARD = 1 << 3
FS_QUOTA_PDQ_ACCT = 1 << 4
FS_QUOTA_PDQ_ENFD = 1 << 5

# <linux/fs.h>
FS_IOC_FSGETXATTR = 0x801C581F  # _IOR('X', 31, struct fsxattr)
FS_IOC_FSSETXATTR = 0x401C5820  # _IOW('X', 32, struct fsxattr)
FS_XFLAG_PROJINHERIT = 0x00000200

NR_QUOTACTL_FD = 443  # the same number on every architecture

BASIC_BLOCK = 512  # quota block counts are in 512-byte "basic blocks"
MAX_PROJECT_ID = 0xFFFFFFFE  # 0 is the default project, 2^32-1 is "no id"

# struct fs_disk_quota (112 bytes) and struct fs_quota_stat (80 bytes): every
# field is naturally aligned, so "=" (native order, no padding) plus the
# explicit pad bytes reproduces the C layout.
DISK_QUOTA = struct.Struct("=bbHIQQQQQQiiHHbbbbQQQiHh8s")
QUOTA_STAT = struct.Struct("=bxHb3xQQI4xQQI4xIiiiHH4x")
# struct fsxattr (28 bytes): xflags, extsize, nextents, projid, cowextsize, pad[8]
FSXATTR = struct.Struct("=IIIII8s")

_PROJECT_QUOTA_OPTIONS = frozenset({"prjquota", "pquota"})


def qcmd(cmd: int, quota_type: int) -> int:
    """QCMD() from <linux/quota.h>: sub-command and quota type in one int."""
    return (cmd << SUBCMDSHIFT) | (quota_type & SUBCMDMASK)


@attrs.frozen
class DiskQuota:
    """The parts of struct fs_disk_quota csi_kit uses, in bytes and inodes (0 = no limit)."""

    project_id: int
    hard_bytes: int = 0
    soft_bytes: int = 0
    hard_inodes: int = 0
    soft_inodes: int = 0
    used_bytes: int = 0
    used_inodes: int = 0


def _to_blocks(nbytes: int) -> int:
    return -(-nbytes // BASIC_BLOCK)


def pack_disk_quota(quota: DiskQuota, fieldmask: int) -> bytes:
    """struct fs_disk_quota for Q_XSETQLIM; byte limits round up to whole basic blocks."""
    head = (
        FS_DQUOT_VERSION,
        FS_PROJ_QUOTA,
        fieldmask,
        quota.project_id,
        _to_blocks(quota.hard_bytes),
        _to_blocks(quota.soft_bytes),
        quota.hard_inodes,
        quota.soft_inodes,
    )
    # counts, timers, warnings and realtime fields are ignored by Q_XSETQLIM
    # unless named in fieldmask: zero them.
    return DISK_QUOTA.pack(*head, *([0] * 16), b"")


def unpack_disk_quota(data: bytes) -> DiskQuota:
    """DiskQuota from the struct fs_disk_quota that Q_XGETQUOTA filled in."""
    fields = DISK_QUOTA.unpack(data[: DISK_QUOTA.size])
    return DiskQuota(
        project_id=fields[3],
        hard_bytes=fields[4] * BASIC_BLOCK,
        soft_bytes=fields[5] * BASIC_BLOCK,
        hard_inodes=fields[6],
        soft_inodes=fields[7],
        used_bytes=fields[8] * BASIC_BLOCK,
        used_inodes=fields[9],
    )


def has_project_quota_option(mount: MountInfo) -> bool:
    """XFS mounted with project quota enforcement (``pqnoenforce`` only accounts, so it does not count)."""
    return mount.fs_type == "xfs" and not _PROJECT_QUOTA_OPTIONS.isdisjoint(mount.super_options)


def _check_project_id(project_id: int) -> None:
    if (
        isinstance(project_id, bool)
        or not isinstance(project_id, int)
        or not 0 < project_id <= MAX_PROJECT_ID
    ):
        raise InvalidArgument(f"project id must be an integer in 1..{MAX_PROJECT_ID}, got {project_id!r}")


def _quotactl_fd(fd: int, cmd: int, qid: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    fn = libc().syscall
    fn.restype = ctypes.c_long
    result = fn(ctypes.c_long(NR_QUOTACTL_FD), ctypes.c_int(fd), ctypes.c_uint(cmd), ctypes.c_int(qid), buf)
    check_call(int(result), "quotactl_fd")


def _block_device_of(mount: MountInfo) -> str:
    """A device node for quotactl(2): the mount source, or /dev/block/MAJ:MIN (udev) if that is not it."""
    wanted = os.makedev(mount.major, mount.minor)
    for candidate in (mount.source, f"/dev/block/{mount.major}:{mount.minor}"):
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == wanted:
            return candidate
    raise FailedPrecondition(
        f"no device node for {mount.source} ({mount.major}:{mount.minor}) in this /dev, "
        "and the kernel has no quotactl_fd"
    )


def _quotactl_dev(device: str, cmd: int, qid: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    fn = libc().quotactl
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    check_call(fn(cmd, os.fsencode(device), qid, buf), "quotactl", device)


def _quotactl(path: str, subcmd: int, qid: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    """Run one project-quota quotactl on the filesystem holding `path`; raises OSError."""
    cmd = qcmd(subcmd, PRJQUOTA)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _quotactl_fd(fd, cmd, qid, buf)
            return
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
    finally:
        os.close(fd)
    _quotactl_dev(_block_device_of(filesystem_of(path)), cmd, qid, buf)


def _quota_error(e: OSError, what: str) -> Exception:
    if e.errno in (errno.ENOSYS, errno.ENOTSUP, errno.ESRCH, errno.ENOTTY):
        return FailedPrecondition(f"{what}: project quotas are not enabled here ({errno_name(e.errno)})")
    if e.errno == errno.EPERM:
        return FailedPrecondition(f"{what}: not permitted; the driver needs CAP_SYS_ADMIN")
    if e.errno == errno.ENOENT:
        return NotFound(f"{what}: {e.filename or 'path'} does not exist")
    return Internal(f"{what}: {errno_name(e.errno)} ({e.strerror})")


def project_quota_enabled(path: str) -> bool:
    """True if the filesystem of `path` is XFS with project quotas accounted and enforced."""
    try:
        mount = filesystem_of(path)
    except NotFound:
        return False
    if not has_project_quota_option(mount):
        return False
    buf = ctypes.create_string_buffer(QUOTA_STAT.size + 64)  # slack in case the kernel writes more
    try:
        _quotactl(path, Q_XGETQSTAT, 0, buf)
    except (OSError, FailedPrecondition) as e:
        log.debug("project quota status of %s unavailable: %s", path, e)
        return False
    flags = QUOTA_STAT.unpack(buf.raw[: QUOTA_STAT.size])[1]
    return bool(flags & FS_QUOTA_PDQ_ACCT) and bool(flags & FS_QUOTA_PDQ_ENFD)


def _set_projid(fd: int, project_id: int, directory: bool) -> None:
    buf = bytearray(FSXATTR.size)
    fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf, True)
    xflags, extsize, nextents, _, cowextsize, pad = FSXATTR.unpack(buf)
    if directory:
        xflags |= FS_XFLAG_PROJINHERIT
    fcntl.ioctl(fd, FS_IOC_FSSETXATTR, FSXATTR.pack(xflags, extsize, nextents, project_id, cowextsize, pad))


def get_project(directory: str) -> int:
    """The project id `directory` carries (0 when it has none or cannot be read)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        buf = bytearray(FSXATTR.size)
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf, True)
        return int(FSXATTR.unpack(buf)[3])
    except OSError:
        return 0
    finally:
        os.close(fd)


def set_project(directory: str, project_id: int, *, recursive: bool = False) -> None:
    """Give `directory` (and, if recursive, the files and directories below it) a project id.

    The directory gets FS_XFLAG_PROJINHERIT so that new entries inherit the
    id.  The walk never follows symlinks; symlinks, fifos and device nodes
    keep their old id (they cannot be opened for the ioctl), costing only an
    inode each against the old project.
    """
    _check_project_id(project_id)
    what = f"set project {project_id} on {directory}"
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        root = os.open(directory, flags)
    except FileNotFoundError:
        raise NotFound(f"{what}: the directory does not exist") from None
    except OSError as e:
        raise _quota_error(e, what) from e
    pending = [root]
    try:
        while pending:
            fd = pending.pop()
            try:
                _set_projid(fd, project_id, directory=True)
                if not recursive:
                    continue
                for name in os.listdir(fd):
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        if stat.S_ISDIR(st.st_mode):
                            pending.append(os.open(name, flags, dir_fd=fd))
                        elif stat.S_ISREG(st.st_mode):
                            child = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                            try:
                                _set_projid(child, project_id, directory=False)
                            finally:
                                os.close(child)
                    except FileNotFoundError:
                        continue
            finally:
                os.close(fd)
    except OSError as e:
        for fd in pending:
            os.close(fd)
        raise _quota_error(e, what) from e
    log.debug("%s%s", what, " (recursive)" if recursive else "")


def get_project_quota(path: str, project_id: int) -> DiskQuota:
    """Limits and usage of a project on the filesystem of `path` (all zero if it has none yet)."""
    _check_project_id(project_id)
    buf = ctypes.create_string_buffer(DISK_QUOTA.size)
    try:
        _quotactl(path, Q_XGETQUOTA, project_id, buf)
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.exists(path):
            return DiskQuota(project_id=project_id)  # no dquot: nothing used, no limit
        raise _quota_error(e, f"get quota of project {project_id} on {path}") from e
    return unpack_disk_quota(buf.raw)


def project_usage(path: str, project_id: int) -> tuple[int, int]:
    """(used bytes, used inodes) of a project, as XFS accounts them."""
    quota = get_project_quota(path, project_id)
    return quota.used_bytes, quota.used_inodes


def _set_limits(path: str, quota: DiskQuota, fieldmask: int, what: str) -> None:
    buf = ctypes.create_string_buffer(pack_disk_quota(quota, fieldmask), DISK_QUOTA.size)
    try:
        _quotactl(path, Q_XSETQLIM, quota.project_id, buf)
    except OSError as e:
        raise _quota_error(e, what) from e
    log.debug("%s", what)


def set_project_limit(path: str, project_id: int, hard_bytes: int) -> None:
    """Set the project's hard block limit (rounded up to 512 bytes) and clear its soft limit."""
    _check_project_id(project_id)
    if hard_bytes <= 0:
        raise InvalidArgument(f"quota limit must be positive, got {hard_bytes}; use clear_project_limit")
    _set_limits(
        path,
        DiskQuota(project_id=project_id, hard_bytes=hard_bytes),
        FS_DQ_BHARD | FS_DQ_BSOFT,
        f"limit project {project_id} on {path} to {hard_bytes} bytes",
    )


def clear_project_limit(path: str, project_id: int) -> None:
    """Remove every block and inode limit of the project (usage stays accounted)."""
    _check_project_id(project_id)
    _set_limits(
        path,
        DiskQuota(project_id=project_id),
        FS_DQ_BHARD | FS_DQ_BSOFT | FS_DQ_IHARD | FS_DQ_ISOFT,
        f"clear the limits of project {project_id} on {path}",
    )
