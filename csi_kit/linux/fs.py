"""Filesystem facts and durability: space/inode usage, the mount holding a
path, freeze/thaw around a snapshot, and syncing a copied tree to disk."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

import attrs

from csi_kit.errors import FailedPrecondition, Internal, InvalidArgument, NotFound
from csi_kit.linux._libc import errno_name, syncfs
from csi_kit.linux.mounts import MountInfo, read_mountinfo

__all__ = ["Usage", "filesystem_of", "frozen", "fsync_dir", "statvfs_usage", "sync_path", "tree_usage"]

log = logging.getLogger("csi_kit.linux")

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)


@attrs.frozen
class Usage:
    """Space and inodes of a filesystem, in bytes and counts.

    `available_bytes` is what an unprivileged writer may still use (f_bavail),
    so on ext4 it excludes the root reserve; `used_bytes` is total minus free.
    """

    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    free_inodes: int
    used_inodes: int


def statvfs_usage(path: str) -> Usage:
    """Usage of the filesystem holding `path` (for NodeGetVolumeStats)."""
    try:
        st = os.statvfs(path)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    except OSError as e:
        raise Internal(f"statvfs {path}: {errno_name(e.errno)} ({e.strerror})") from e
    return Usage(
        total_bytes=st.f_blocks * st.f_frsize,
        available_bytes=st.f_bavail * st.f_frsize,
        used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
        total_inodes=st.f_files,
        free_inodes=st.f_ffree,
        used_inodes=max(st.f_files - st.f_ffree, 0),
    )


def tree_usage(path: str) -> tuple[int, int]:
    """Allocated bytes (st_blocks * 512) and inode count of the tree at `path`.

    Like ``du -x``: symlinks are not followed, hard links count once, other
    filesystems mounted inside the tree are not entered, and entries that
    vanish during the walk are ignored (the tree may be in use).
    """
    try:
        root = os.lstat(path)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    seen = {(root.st_dev, root.st_ino)}
    total = root.st_blocks * 512
    if not stat.S_ISDIR(root.st_mode):
        return total, 1
    pending = [path]
    while pending:
        directory = pending.pop()
        try:
            it = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError:
            log.warning("tree_usage: cannot read %s; its contents are not counted", directory)
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_dev != root.st_dev:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    pending.append(entry.path)
    return total, len(seen)


def _is_below(path: str, mount_point: str) -> bool:
    return mount_point == "/" or path == mount_point or path.startswith(mount_point + "/")


def filesystem_of(path: str) -> MountInfo:
    """The mount that holds `path` (symlinks resolved).

    The longest mount point containing the path wins, preferring mounts whose
    device matches the path's st_dev: that skips a mount hidden under a later
    mount on a parent directory.  (btrfs subvolumes report another st_dev than
    mountinfo, hence only a preference.)  The last entry wins among mounts
    stacked on the same point, as it is the visible one.
    """
    real = os.path.realpath(path)
    try:
        dev = os.stat(real).st_dev
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    best: MountInfo | None = None
    best_match: MountInfo | None = None
    for m in read_mountinfo():
        if not _is_below(real, m.mount_point):
            continue
        if best is None or len(m.mount_point) >= len(best.mount_point):
            best = m
        if os.makedev(m.major, m.minor) == dev and (
            best_match is None or len(m.mount_point) >= len(best_match.mount_point)
        ):
            best_match = m
    chosen = best_match or best
    if chosen is None:
        raise NotFound(f"no mount holds {path}")
    return chosen


@contextmanager
def frozen(mount_path: str) -> Iterator[None]:
    """Freeze the filesystem mounted at `mount_path` for the duration of the block.

    FIFREEZE flushes and blocks all writers, so a snapshot taken inside is
    consistent; the filesystem is thawed on exit whatever happens.  Do not
    write to the frozen filesystem from inside the block: the write would
    wait for the thaw forever.  Filesystems that cannot freeze (EOPNOTSUPP)
    are left alone and the block runs anyway.
    """
    try:
        fd = os.open(mount_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{mount_path} does not exist") from None
    except NotADirectoryError:
        raise InvalidArgument(f"{mount_path} is not a mounted directory") from None
    try:
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                log.info(
                    "%s cannot be frozen (%s); continuing without freeze", mount_path, errno_name(e.errno)
                )
                yield
                return
            if e.errno == errno.EBUSY:
                raise FailedPrecondition(f"{mount_path} is already frozen") from e
            if e.errno == errno.EPERM:
                raise FailedPrecondition(f"freezing {mount_path} needs CAP_SYS_ADMIN") from e
            raise Internal(f"freeze {mount_path}: {errno_name(e.errno)} ({e.strerror})") from e
        log.debug("froze %s", mount_path)
        try:
            yield
        finally:
            try:
                fcntl.ioctl(fd, FITHAW, 0)
            except OSError as e:
                log.error("cannot thaw %s: %s; writers to it stay blocked", mount_path, e)
                raise Internal(f"thaw {mount_path}: {errno_name(e.errno)} ({e.strerror})") from e
            log.debug("thawed %s", mount_path)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    """Make a directory's entries durable (after a rename or unlink inside it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_parent(path: str) -> None:
    fsync_dir(os.path.dirname(os.path.abspath(path)) or "/")


def _fsync_tree(root_fd: int) -> None:
    """fsync every file and directory below an open directory, without following symlinks."""
    pending = [os.dup(root_fd)]
    while pending:
        dfd = pending.pop()
        try:
            for name in os.listdir(dfd):
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                        continue
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    pending.append(fd)
                else:
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            os.fsync(dfd)
        finally:
            os.close(dfd)


def sync_path(path: str) -> None:
    """Make `path` durable: a file is fsynced, a directory tree synced, and its entry in the parent too.

    A tree is flushed with one syncfs(2) of its filesystem, far cheaper than
    an fsync per file on a large snapshot (it also writes out other dirty data
    of that filesystem); without syncfs every entry is fsynced.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            try:
                syncfs(fd)
            except (AttributeError, OSError) as e:
                if isinstance(e, OSError) and e.errno != errno.ENOSYS:
                    raise Internal(f"syncfs {path}: {errno_name(e.errno)} ({e.strerror})") from e
                _fsync_tree(fd)
        else:
            os.fsync(fd)
        _fsync_parent(path)
    except OSError as e:
        raise Internal(f"sync {path}: {errno_name(e.errno)} ({e.strerror})") from e
    finally:
        os.close(fd)
