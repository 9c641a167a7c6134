"""Copies of directory trees and image files, for snapshots and clones.

The fast path is a reflink (FICLONE): the copy shares the source's extents
and costs no data I/O, so a snapshot of a large volume on XFS (reflink=1) or
btrfs takes milliseconds.  Elsewhere data is copied in the kernel with
copy_file_range(2), one call per data extent found with SEEK_DATA/SEEK_HOLE,
so sparse image files stay sparse.  No tar, no ``cp``: the walk is done here,
so its rules are ours:

- nothing is followed: every open is relative to an already open directory
  and uses O_NOFOLLOW, so a symlink (or a directory swapped for one while we
  copy) inside a volume can never make us read or write outside it;
- symlinks are recreated as symlinks, fifos as fifos, hard links as hard
  links; sockets and device nodes are skipped (counted in `skipped`);
- mode, owner, atime/mtime (ns) and user xattrs / POSIX ACLs are preserved
  where the destination allows it;
- a failed `copy_tree` removes what it had made of the destination.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import threading
from typing import Literal

import attrs

from csi_kit.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi_kit.linux._libc import errno_name, unique_mount_id

__all__ = ["CopyStats", "clone_file", "copy_file", "copy_file_sparse", "copy_tree", "reflink_supported"]

log = logging.getLogger("csi_kit.linux")

FICLONE = 0x40049409  # _IOW(0x94, 9, int)

# FICLONE errors meaning "this filesystem (pair) cannot reflink at all".
_NO_REFLINK = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.ENOSYS})
# ... and errors meaning "not this file" (e.g. different XFS realtime flags).
_NOT_THIS_FILE = frozenset({errno.EINVAL, errno.ETXTBSY})
# copy_file_range errors after which a read/write loop still works.
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF})

_CHUNK = 1 << 30  # per copy_file_range call
_RW_CHUNK = 1 << 20  # per read/write in the fallback loop
_XATTR_PREFIXES = ("user.", "system.posix_acl_access", "system.posix_acl_default")
_XATTR_IGNORED = frozenset(
    {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.E2BIG, errno.ENODATA}
)

_probe_cache: dict[tuple[int, int], bool] = {}
_probe_lock = threading.Lock()

Method = Literal["reflink", "copy"]


@attrs.frozen
class CopyStats:
    """What `copy_tree` did.

    `directories` counts the top directory too; `bytes` is the apparent size of
    the regular files copied (hard links counted once); `method` is "reflink",
    "copy", "mixed" (some files could not be cloned) or "none" (no regular
    files); `skipped` counts sockets and device nodes left out.
    """

    files: int
    directories: int
    bytes: int
    method: str
    symlinks: int = 0
    skipped: int = 0


def _open_read(name: str, dir_fd: int | None = None) -> int:
    """Open for reading without following a symlink, and without touching atime where allowed."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(name, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
        return os.open(name, flags, dir_fd=dir_fd)


def _os_error(e: OSError, what: str) -> Exception:
    if e.errno == errno.ENOENT:
        return NotFound(f"{what}: {e.filename or 'path'} does not exist")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: no space left on the destination ({errno_name(e.errno)})")
    return Internal(f"{what}: {errno_name(e.errno)} ({e.strerror})")


def reflink_supported(directory: str) -> bool:
    """True if files in `directory` can be cloned with FICLONE.

    Probed once per mounted filesystem by cloning a small temporary file.
    The cache key is the device number plus the kernel's never-reused mount
    id, so a new filesystem on a reused loop device is probed again (where
    the kernel has no such id, every call probes: a few hundred microseconds).
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"directory {directory} does not exist") from None
    except NotADirectoryError:
        raise InvalidArgument(f"{directory} is not a directory") from None
    try:
        mount_id = unique_mount_id(dir_fd)
        key = (os.fstat(dir_fd).st_dev, mount_id) if mount_id is not None else None
        if key is not None:
            with _probe_lock:
                cached = _probe_cache.get(key)
            if cached is not None:
                return cached
        supported = _probe(directory)
        if key is not None:
            with _probe_lock:
                _probe_cache[key] = supported
        log.debug("reflink support in %s: %s", directory, supported)
        return supported
    finally:
        os.close(dir_fd)


def _probe(directory: str) -> bool:
    names: list[str] = []
    fds: list[int] = []
    try:
        for _ in range(2):
            fd, name = tempfile.mkstemp(prefix=".csi-kit-reflink-probe-", dir=directory)
            fds.append(fd)
            names.append(name)
        os.write(fds[0], b"\x5a" * 4096)
        try:
            fcntl.ioctl(fds[1], FICLONE, fds[0])
        except OSError as e:
            if e.errno in _NO_REFLINK or e.errno in _NOT_THIS_FILE:
                return False
            raise
        return True
    except OSError as e:
        raise FailedPrecondition(
            f"cannot probe reflink support in {directory}: {errno_name(e.errno)} ({e.strerror})"
        ) from e
    finally:
        for fd in fds:
            os.close(fd)
        for name in names:
            try:
                os.unlink(name)
            except OSError:
                log.warning("cannot remove reflink probe file %s", name)


def _copy_range_rw(src_fd: int, dst_fd: int, offset: int, end: int) -> None:
    """pread/pwrite loop that leaves all-zero chunks as holes (dst is already sized)."""
    zeros = bytes(_RW_CHUNK)
    while offset < end:
        chunk = os.pread(src_fd, min(_RW_CHUNK, end - offset), offset)
        if not chunk:
            return
        if chunk != zeros[: len(chunk)]:
            view = memoryview(chunk)
            written = 0
            while written < len(chunk):
                written += os.pwrite(dst_fd, view[written:], offset + written)
        offset += len(chunk)


def _copy_range(src_fd: int, dst_fd: int, offset: int, end: int) -> None:
    while offset < end:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(_CHUNK, end - offset), offset, offset)
        except OSError as e:
            if e.errno not in _NO_COPY_RANGE:
                raise
            _copy_range_rw(src_fd, dst_fd, offset, end)
            return
        if n == 0:  # the source shrank under us
            return
        offset += n


def _copy_sparse_fd(src_fd: int, dst_fd: int) -> int:
    """Copy data extents only; return the apparent size copied."""
    size = os.fstat(src_fd).st_size
    os.ftruncate(dst_fd, size)
    pos = 0
    while pos < size:
        try:
            data = os.lseek(src_fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                break
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            _copy_range(src_fd, dst_fd, pos, size)
            break
        if data >= size:
            break
        hole = min(os.lseek(src_fd, data, os.SEEK_HOLE), size)
        _copy_range(src_fd, dst_fd, data, hole)
        pos = hole
    return size


class _Mode:
    """Whether cloning is still worth trying, shared across the files of one copy."""

    def __init__(self, reflink: bool | None) -> None:
        self.reflink = reflink
        self.try_clone = reflink is not False


def _copy_data(src_fd: int, dst_fd: int, mode: _Mode) -> Method:
    if mode.try_clone:
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
            return "reflink"
        except OSError as e:
            if mode.reflink is True:
                raise FailedPrecondition(f"cannot reflink: {errno_name(e.errno)} ({e.strerror})") from e
            if e.errno in _NO_REFLINK:
                mode.try_clone = False
            elif e.errno not in _NOT_THIS_FILE:
                raise
        os.ftruncate(dst_fd, 0)
    _copy_sparse_fd(src_fd, dst_fd)
    return "copy"


def _copy_path(src: str, dst: str, mode: _Mode) -> Method:
    """Copy one file by path; dst is created or truncated, and removed again on failure if we created it."""
    try:
        src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _os_error(e, f"copy {src}") from e
    try:
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{src} is not a regular file")
        created = not os.path.lexists(dst)
        try:
            dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _os_error(e, f"create {dst}") from e
        try:
            method = _copy_data(src_fd, dst_fd, mode)
            os.fchmod(dst_fd, stat.S_IMODE(st.st_mode) & 0o777)
        except BaseException:
            if created:
                os.unlink(dst)
            raise
        finally:
            os.close(dst_fd)
    except OSError as e:
        raise _os_error(e, f"copy {src} to {dst}") from e
    finally:
        os.close(src_fd)
    return method


def clone_file(src: str, dst: str) -> None:
    """Make dst a reflink copy of src (created or truncated); raise FailedPrecondition if not supported."""
    _copy_path(src, dst, _Mode(True))


def copy_file_sparse(src: str, dst: str) -> None:
    """Copy src to dst in the kernel, data extents only, so holes stay holes."""
    _copy_path(src, dst, _Mode(False))


def copy_file(src: str, dst: str, *, reflink: bool | None = None) -> str:
    """Copy a regular file, keeping its permission bits; return "reflink" or "copy".

    reflink=True requires a clone, False never clones, None clones when the
    filesystem can and copies otherwise.
    """
    return _copy_path(src, dst, _Mode(reflink))


@attrs.define
class _Frame:
    src_fd: int
    dst_fd: int
    names: list[str]
    st: os.stat_result
    index: int = 0


class _TreeCopier:
    """Iterative (no recursion limit) depth-first copy between open directory fds."""

    def __init__(self, reflink: bool | None, dst_root_fd: int) -> None:
        self.mode = _Mode(reflink)
        self.dst_root_fd = dst_root_fd
        self.links: dict[tuple[int, int], str] = {}
        self.files = self.directories = self.bytes = self.symlinks = self.skipped = 0
        self.cloned = self.copied = 0

    def stats(self) -> CopyStats:
        if self.cloned and self.copied:
            method = "mixed"
        elif self.cloned:
            method = "reflink"
        elif self.copied:
            method = "copy"
        else:
            method = "none"
        return CopyStats(
            files=self.files,
            directories=self.directories,
            bytes=self.bytes,
            method=method,
            symlinks=self.symlinks,
            skipped=self.skipped,
        )

    def run(self, src_root_fd: int) -> None:
        root = _Frame(src_root_fd, self.dst_root_fd, os.listdir(src_root_fd), os.fstat(src_root_fd))
        self.directories += 1
        stack = [root]
        rel: list[str] = []
        try:
            while stack:
                frame = stack[-1]
                if frame.index == len(frame.names):
                    _set_meta_fd(frame.dst_fd, frame.st, frame.src_fd)
                    stack.pop()
                    if frame is not root:
                        rel.pop()
                        os.close(frame.src_fd)
                        os.close(frame.dst_fd)
                    continue
                name = frame.names[frame.index]
                frame.index += 1
                child = self._entry(frame, name, rel)
                if child is not None:
                    stack.append(child)
                    rel.append(name)
        finally:
            for frame in stack:
                if frame is not root:
                    os.close(frame.src_fd)
                    os.close(frame.dst_fd)

    def _entry(self, frame: _Frame, name: str, rel: list[str]) -> _Frame | None:
        sfd, dfd = frame.src_fd, frame.dst_fd
        try:
            st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        except FileNotFoundError:  # deleted while we copy a live volume
            return None
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFDIR:
            return self._dir(sfd, dfd, name, st)
        if kind == stat.S_IFREG:
            self._file(sfd, dfd, name, st, rel)
        elif kind == stat.S_IFLNK:
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
            _set_meta_path(dfd, name, st, symlink=True)
            self.symlinks += 1
        elif kind == stat.S_IFIFO:
            os.mkfifo(name, 0o600, dir_fd=dfd)
            _set_meta_path(dfd, name, st, symlink=False)
        else:
            log.debug("copy_tree: skipping %s (not a file, directory, symlink or fifo)", name)
            self.skipped += 1
        return None

    def _dir(self, sfd: int, dfd: int, name: str, st: os.stat_result) -> _Frame | None:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            child_src = os.open(name, flags, dir_fd=sfd)
        except FileNotFoundError:
            return None
        try:
            names = os.listdir(child_src)
            os.mkdir(name, 0o700, dir_fd=dfd)
            child_dst = os.open(name, flags, dir_fd=dfd)
        except BaseException:
            os.close(child_src)
            raise
        self.directories += 1
        return _Frame(child_src, child_dst, names, st)

    def _file(self, sfd: int, dfd: int, name: str, st: os.stat_result, rel: list[str]) -> None:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links:
            os.link(self.links[key], name, src_dir_fd=self.dst_root_fd, dst_dir_fd=dfd, follow_symlinks=False)
            self.files += 1
            return
        try:
            src_fd = _open_read(name, sfd)
        except FileNotFoundError:
            return
        try:
            dst_fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd
            )
            try:
                method = _copy_data(src_fd, dst_fd, self.mode)
                fresh = os.fstat(src_fd)
                _set_meta_fd(dst_fd, fresh, src_fd)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        if method == "reflink":
            self.cloned += 1
        else:
            self.copied += 1
        self.files += 1
        self.bytes += fresh.st_size
        if st.st_nlink > 1:
            self.links[key] = os.path.join(*rel, name)


def _chown_ok(e: OSError) -> bool:
    return e.errno in (errno.EPERM, errno.EINVAL)  # not root, or an id unmapped in this user namespace


def _copy_xattrs(src_fd: int, dst_fd: int) -> None:
    try:
        names = os.listxattr(src_fd)
    except OSError as e:
        if e.errno in _XATTR_IGNORED:
            return
        raise
    for attr in names:
        if not attr.startswith(_XATTR_PREFIXES):
            continue
        try:
            os.setxattr(dst_fd, attr, os.getxattr(src_fd, attr))
        except OSError as e:
            if e.errno not in _XATTR_IGNORED:
                raise
            log.debug("copy_tree: xattr %s not copied: %s", attr, errno_name(e.errno))


def _set_meta_fd(dst_fd: int, st: os.stat_result, src_fd: int) -> None:
    """Owner, then mode (chown clears set-id bits), then xattrs/ACLs, then times.

    Times go last so nothing after them moves mtime.
    """
    try:
        os.fchown(dst_fd, st.st_uid, st.st_gid)
    except OSError as e:
        if not _chown_ok(e):
            raise
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    _copy_xattrs(src_fd, dst_fd)
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _set_meta_path(dir_fd: int, name: str, st: os.stat_result, *, symlink: bool) -> None:
    try:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        if not _chown_ok(e):
            raise
    if not symlink:  # a fifo we just made ourselves in our own directory
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def _open_dir(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{what} does not exist") from None
    except NotADirectoryError:
        raise InvalidArgument(f"{what} is not a directory") from None
    except OSError as e:
        raise _os_error(e, f"open {what}") from e


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def copy_tree(src: str, dst: str, *, reflink: bool | None = None) -> CopyStats:
    """Copy the directory tree `src` to the new directory `dst` (which must not exist).

    reflink as for `copy_file`; with reflink=True an unsupported destination
    fails before anything is made.  On failure the partial copy is removed.
    """
    src_abs = os.path.realpath(src)
    dst_abs = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(dst))), os.path.basename(dst))
    if not os.path.basename(dst_abs):
        raise InvalidArgument(f"invalid copy destination {dst!r}")
    if _inside(dst_abs, src_abs):
        raise InvalidArgument(f"cannot copy {src} into itself ({dst})")
    src_fd = _open_dir(src_abs, f"copy source {src}")
    try:
        parent, name = os.path.split(dst_abs)
        if reflink is True and not reflink_supported(parent):
            raise FailedPrecondition(f"the filesystem of {parent} does not support reflinks")
        parent_fd = _open_dir(parent, f"parent directory of {dst}")
        try:
            try:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            except FileExistsError:
                raise AlreadyExists(f"copy destination {dst} already exists") from None
            except OSError as e:
                raise _os_error(e, f"create {dst}") from e
            try:
                dst_fd = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd
                )
                try:
                    copier = _TreeCopier(reflink, dst_fd)
                    copier.run(src_fd)
                finally:
                    os.close(dst_fd)
            except BaseException as e:
                log.warning("copy_tree %s -> %s failed, removing the partial copy: %s", src, dst, e)
                shutil.rmtree(name, dir_fd=parent_fd, ignore_errors=True)
                if isinstance(e, OSError):
                    raise _os_error(e, f"copy {src} to {dst}") from e
                raise
        finally:
            os.close(parent_fd)
    finally:
        os.close(src_fd)
    stats = copier.stats()
    log.debug("copy_tree %s -> %s: %s", src, dst, stats)
    return stats
