"""Caller paths, opened without following a symlink in any component.

The driver runs privileged, and in a DaemonSet its mounts propagate to the
host.  A target, staging or stats path that goes through a symlink — in its
last component or in any parent — lets whoever controls that link choose
where a mount lands or which mount is undone (a bind over /etc, an unmount of
something that was never ours).  So every caller path is opened here with no
symlink followed anywhere: ``openat2(RESOLVE_NO_SYMLINKS)`` where the kernel
has it (Linux 5.6+), a component-by-component ``O_PATH|O_NOFOLLOW`` walk
otherwise.  Mounts and unmounts are then made through the descriptor
(``/proc/self/fd/N``, see `fd_path`), so nothing can swap a component between
the check and the mount.

Callers have already checked the path lexically (absolute, normal, not ``/``);
a ``..`` component is refused here again because a walk must never climb.

Errors: a symlink in the path, or a component that is not a directory, is
INVALID_ARGUMENT; a missing component is NOT_FOUND.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterator

from csi_kit.errors import FailedPrecondition, Internal, InvalidArgument, NotFound
from csi_kit.linux._libc import errno_name, libc

__all__ = [
    "fd_path",
    "identity",
    "lstat",
    "make_target",
    "opened",
    "open_nofollow",
    "remove_target",
]

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the syscall table unification)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_AT_FDCWD = -100


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2_works: bool | None = None


def _openat2(path: str, flags: int) -> int | None:
    """openat2 with no symlink resolution; None where the kernel lacks the syscall."""
    global _openat2_works
    if _openat2_works is False:
        return None
    fn = libc().syscall
    fn.restype = ctypes.c_long
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = fn(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd >= 0:
        _openat2_works = True
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM) and _openat2_works is None:
        # ENOSYS: an old kernel; EPERM: a seccomp filter that predates openat2.
        _openat2_works = False
        return None
    raise OSError(err, os.strerror(err), path)


def _walk(path: str, flags: int) -> int:
    """The fallback: open each component relative to the last with O_NOFOLLOW.

    O_PATH|O_NOFOLLOW opens a symlink itself instead of failing, so each
    component is fstat'ed and a link is refused as ELOOP, as openat2 would.
    """
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            # O_DIRECTORY is checked after fstat: with O_NOFOLLOW it would call a link ENOTDIR.
            open_flags = (flags & ~os.O_DIRECTORY if last else os.O_PATH) | os.O_NOFOLLOW | os.O_CLOEXEC
            nxt = os.open(part, open_flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            if (not last or flags & os.O_DIRECTORY) and not stat.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _error(e: OSError, path: str, field: str) -> Exception:
    if e.errno == errno.ELOOP:
        return InvalidArgument(
            f"{field} {path} goes through a symlink; symlinks are not followed in caller paths"
        )
    if e.errno == errno.ENOENT:
        return NotFound(f"{field} {path} does not exist")
    if e.errno == errno.ENOTDIR:
        return InvalidArgument(f"{field} {path}: a parent component is not a directory")
    if e.errno in (errno.EACCES, errno.EPERM):
        return FailedPrecondition(f"{field} {path}: permission denied")
    return Internal(f"{field} {path}: {errno_name(e.errno)} ({e.strerror})")


def open_nofollow(path: str, *, field: str = "path", flags: int = os.O_PATH) -> int:
    """Open absolute `path` (O_PATH by default) with no symlink followed in any component.

    The caller closes the descriptor; prefer `opened`.
    """
    if not path.startswith("/") or ".." in path.split("/"):
        raise InvalidArgument(f"{field} {path!r} must be absolute and must not contain '..'")
    try:
        fd = _openat2(path, flags)
        return fd if fd is not None else _walk(path, flags)
    except OSError as e:
        raise _error(e, path, field) from None


@contextlib.contextmanager
def opened(path: str, *, field: str = "path", flags: int = os.O_PATH) -> Iterator[int]:
    """`open_nofollow` as a context manager that closes the descriptor."""
    fd = open_nofollow(path, field=field, flags=flags)
    try:
        yield fd
    finally:
        os.close(fd)


def fd_path(fd: int) -> str:
    """The magic link to an open descriptor: mount(2) and umount2(2) given it act on exactly that file."""
    return f"/proc/self/fd/{fd}"


@contextlib.contextmanager
def _parent(path: str, field: str) -> Iterator[tuple[int, str]]:
    parent, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise InvalidArgument(f"{field} {path!r} has no last component")
    with opened(
        parent or "/", field=f"the parent directory of {field}", flags=os.O_PATH | os.O_DIRECTORY
    ) as fd:
        yield fd, name


def lstat(path: str, *, field: str = "path") -> os.stat_result | None:
    """lstat of `path`, no symlink followed in its parents; None if only the last component is missing.

    A missing parent is NOT_FOUND, a symlink among the parents INVALID_ARGUMENT.
    """
    with _parent(path, field) as (fd, name):
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _error(e, path, field) from None


def identity(path: str, *, field: str = "path") -> tuple[int, int]:
    """(st_dev, st_ino) of what `path` shows now (for a mount point: the mounted root), no symlink followed.

    A bind mount shows its source's identity, so this ties a mount point to
    the volume it was made from, across driver restarts.
    """
    with opened(path, field=field) as fd:
        st = os.fstat(fd)
    return st.st_dev, st.st_ino


def make_target(path: str, *, directory: bool, field: str = "target_path") -> bool:
    """Create the last component of `path` (a directory, or an empty file for a block volume).

    Returns True if this call created it, False if the right kind of file was
    already there.  The parent must exist; nothing in the path may be a symlink.
    """
    with _parent(path, field) as (fd, name):
        try:
            if directory:
                os.mkdir(name, 0o750, dir_fd=fd)
            else:
                os.close(
                    os.open(
                        name,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600,
                        dir_fd=fd,
                    )
                )
            return True
        except FileExistsError:
            pass
        except OSError as e:
            raise _error(e, path, field) from None
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise InvalidArgument(f"{field} {path} is a symlink; symlinks are not followed in caller paths")
    if directory and not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(
            f"{field} {path} exists and is not a directory (a mount volume is published on one)"
        )
    if not directory and stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{field} {path} is a directory; a block volume is published on a file")
    return False


def remove_target(path: str, *, field: str = "target_path") -> None:
    """Remove the last component of `path` (an empty directory or a file), never through a symlink.

    Missing is success.  A directory that is not empty, or is a mount point,
    is refused (FAILED_PRECONDITION): it holds something that is not ours to delete.
    """
    try:
        with _parent(path, field) as (fd, name):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if os.stat(fd).st_dev != st.st_dev:
                    raise FailedPrecondition(
                        f"cannot remove {field} {path}: something is still mounted there"
                    )
                os.rmdir(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
    except (FileNotFoundError, NotFound):
        return
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
            raise FailedPrecondition(
                f"cannot remove {field} {path}: {errno_name(e.errno)} ({e.strerror})"
            ) from None
        raise _error(e, path, field) from None
