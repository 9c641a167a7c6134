"""The libc handle and the small syscall wrappers the Linux helpers share.

Only calls that Python's `os` lacks go through ctypes (mount, umount2,
quotactl, syncfs, statx); everything else uses `os` and `fcntl`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import sys

__all__ = ["check_call", "errno_name", "libc"]


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, loaded once with errno capture."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    return ctypes.CDLL(name, use_errno=True)


def check_call(result: int, what: str, path: str | None = None) -> int:
    """Raise OSError with the current errno when a libc call returned -1."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def errno_name(err: int | None) -> str:
    """'EBUSY' for 16: the symbolic name reads better in messages than the number."""
    if err is None:
        return "unknown error"
    return errno.errorcode.get(err, str(err))


_STATX_MNT_ID_UNIQUE = 0x4000
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_STATX_DONT_SYNC = 0x4000
_STATX_SIZE = 256
_STX_MNT_ID_OFFSET = 144


def unique_mount_id(fd: int) -> int | None:
    """The kernel's never-reused 64-bit id of the mount holding `fd` (Linux 6.8+), else None.

    Lets a per-filesystem cache tell a new filesystem from an old one that had
    the same device number (loop devices are reused all the time).
    """
    try:
        fn = libc().statx
    except AttributeError:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    # AT_EMPTY_PATH (0x1000): stat the fd itself.
    if fn(fd, b"", 0x1000 | _AT_SYMLINK_NOFOLLOW | _AT_STATX_DONT_SYNC, _STATX_MNT_ID_UNIQUE, buf) != 0:
        return None
    mask = int.from_bytes(buf.raw[0:4], sys.byteorder)
    if not mask & _STATX_MNT_ID_UNIQUE:
        return None
    return int.from_bytes(buf.raw[_STX_MNT_ID_OFFSET : _STX_MNT_ID_OFFSET + 8], sys.byteorder)


def syncfs(fd: int) -> None:
    """syncfs(2): write out everything dirty on the filesystem holding `fd`."""
    fn = libc().syncfs
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    check_call(fn(fd), "syncfs")
