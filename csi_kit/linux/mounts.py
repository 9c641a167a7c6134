"""Mount state and (un)mounting.

Mount state always comes from ``/proc/self/mountinfo``: `os.path.ismount`
compares st_dev of a path and its parent, so it misses a bind mount of a
directory of the same filesystem, which is exactly what a CSI node publish
usually is.  mountinfo also tells the read-only flag, the filesystem type and
the source, and lists stacked mounts (the last entry for a mount point is the
visible one).

Bind mounts and unmounts use mount(2)/umount2(2) directly: there is nothing to
parse, errors come back as errno, and no helper program has to be installed.
`mount()` of a real filesystem goes through the ``mount`` tool instead,
because it knows how to turn an option string into flags plus data, set up
loop devices and call mount helpers (mount.nfs, mount.fuse...).

Targets are caller paths (a CSI target or staging path): `bind_mount`,
`mount`, `remount_readonly` and `unmount` reach them with no symlink followed
in any component (`csi_kit.linux.paths`) and act through the descriptor or
the verified parent directory, never by re-resolving the string, so a link
swapped in after the check cannot redirect the mount or the unmount.  An
unmount acts on exactly one path, never on what lies below it by prefix.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import select
import threading
from collections.abc import Sequence

import attrs

from csi_kit.errors import CSIError, FailedPrecondition, Internal, InvalidArgument, NotFound
from csi_kit.linux import paths
from csi_kit.linux._libc import check_call, errno_name, libc
from csi_kit.linux.run import run

__all__ = [
    "MountInfo",
    "bind_mount",
    "is_mounted",
    "mount",
    "mounts_at",
    "mounts_under",
    "parse_mountinfo",
    "read_mountinfo",
    "remount_readonly",
    "unmount",
    "unmount_all",
    "unmount_stack",
]

log = logging.getLogger("csi_kit.linux")

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# statvfs f_flag bits that a bind remount would otherwise silently clear.
_KEEP_ON_REMOUNT = MS_NOSUID | MS_NODEV | MS_NOEXEC

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")
_CLONE_FS = 0x200


@attrs.frozen
class MountInfo:
    """One line of /proc/self/mountinfo (see proc(5)), with paths unescaped.

    `options` are the per-mount options (ro, nosuid, relatime...),
    `super_options` the filesystem's (e.g. prjquota, inode64), and
    `optional_fields` the propagation tags (shared:1, master:2...).
    """

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: tuple[str, ...]
    fs_type: str
    source: str
    super_options: tuple[str, ...]
    optional_fields: tuple[str, ...] = ()

    @property
    def readonly(self) -> bool:
        """True if this mount, or the whole filesystem, is read-only."""
        return "ro" in self.options or "ro" in self.super_options


def _unescape(field: bytes) -> str:
    """Undo the kernel's octal escapes (space \\040, tab \\011, newline \\012, backslash \\134)."""
    raw = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field)
    return os.fsdecode(raw)


def _parse_line(line: bytes) -> MountInfo:
    fields = line.split(b" ")
    try:
        sep = fields.index(b"-", 6)
        major, minor = fields[2].split(b":")
        return MountInfo(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            major=int(major),
            minor=int(minor),
            root=_unescape(fields[3]),
            mount_point=_unescape(fields[4]),
            options=tuple(os.fsdecode(fields[5]).split(",")),
            optional_fields=tuple(os.fsdecode(f) for f in fields[6:sep]),
            fs_type=_unescape(fields[sep + 1]),
            source=_unescape(fields[sep + 2]),
            super_options=tuple(o for o in os.fsdecode(fields[sep + 3]).split(",") if o),
        )
    except (ValueError, IndexError) as e:
        raise Internal(f"cannot parse mountinfo line {line!r}: {e}") from None


def parse_mountinfo(data: bytes) -> list[MountInfo]:
    """Parse the bytes of a mountinfo file; one entry per non-empty line, in order."""
    return [_parse_line(line) for line in data.split(b"\n") if line.strip()]


def _read_consistent(path: str) -> bytes:
    """Read the file until two reads agree (at most 3 reads).

    The kernel hands mountinfo out page by page; when the mount table changes
    between two pages a single read can miss or repeat entries (the same
    reason kubernetes' mount-utils does a "consistent read").
    """
    with open(path, "rb") as f:
        previous = f.read()
    for _ in range(2):
        with open(path, "rb") as f:
            current = f.read()
        if current == previous:
            return current
        previous = current
    return previous


_SELF = "/proc/self/mountinfo"


class _MountTable:
    """This process's mount table, read and parsed again only when it changed.

    Reading and parsing mountinfo costs ~0.2 ms even for a short table, and a
    delete or a node call asks for it more than once.  The kernel tells when
    to read again: a ``poll`` of an open mountinfo descriptor reports
    POLLPRI/POLLERR once the namespace's mount table changed since the last
    poll (libmount and systemd watch mounts this way).  The descriptor is
    opened before the first read, so a change racing with a read is reported
    by the next poll, never lost.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._poll: select.poll | None = None
        self._fd = -1
        self._table: list[MountInfo] | None = None

    def get(self) -> list[MountInfo]:
        with self._lock:
            if self._poll is None:
                self._fd = os.open(_SELF, os.O_RDONLY | os.O_CLOEXEC)
                self._poll = select.poll()
                self._poll.register(self._fd, select.POLLPRI | select.POLLERR)
            elif self._poll.poll(0):
                self._table = None
            if self._table is None:
                self._table = parse_mountinfo(_read_consistent(_SELF))
            return list(self._table)


_table = _MountTable()


def read_mountinfo(path: str = _SELF) -> list[MountInfo]:
    """All mounts visible to this process, parent mounts before their children.

    The process's own table is re-read only when the kernel reports a change
    (`_MountTable`); any other path is read every time.
    """
    try:
        if path == _SELF:
            return _table.get()
        data = _read_consistent(path)
    except FileNotFoundError:
        raise NotFound(f"mount table {path} does not exist (is /proc mounted?)") from None
    return parse_mountinfo(data)


def normalize(path: str) -> str:
    """Absolute, normalised path with symlinks resolved in its parent directories.

    The last component is not resolved, so looking up a mount point never
    stats it (a dead FUSE or NFS mount would hang or fail).
    """
    absolute = os.path.abspath(path)
    if absolute == "/":
        return absolute
    parent, name = os.path.split(absolute)
    return os.path.join(os.path.realpath(parent), name)


def mounts_at(path: str, *, table: Sequence[MountInfo] | None = None) -> list[MountInfo]:
    """Mounts whose mount point is `path`, in mount order (the last one is visible)."""
    target = normalize(path)
    entries = read_mountinfo() if table is None else table
    return [m for m in entries if m.mount_point == target]


def is_mounted(path: str) -> bool:
    """True if something is mounted exactly at `path` (bind mounts included)."""
    return bool(mounts_at(path))


def mounts_under(prefix: str, *, table: Sequence[MountInfo] | None = None) -> list[MountInfo]:
    """Mounts at `prefix` or below it, in mount order (unmount them in reverse)."""
    root = normalize(prefix)
    below = root.rstrip("/") + "/"
    entries = read_mountinfo() if table is None else table
    return [m for m in entries if m.mount_point == root or m.mount_point.startswith(below)]


def _mount_syscall(source: str | None, target: str, fs_type: str | None, flags: int) -> None:
    fn = libc().mount
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    check_call(
        fn(
            os.fsencode(source) if source is not None else None,
            os.fsencode(target),
            os.fsencode(fs_type) if fs_type is not None else None,
            flags,
            None,
        ),
        "mount",
        target,
    )


def _umount2(target: str, flags: int) -> None:
    fn = libc().umount2
    fn.argtypes = [ctypes.c_char_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    check_call(fn(os.fsencode(target), flags), "umount2", target)


def _mount_error(e: OSError, what: str) -> Exception:
    if e.errno == errno.ENOENT:
        return NotFound(f"{what}: a path does not exist")
    if e.errno in (errno.EPERM, errno.EACCES):
        return FailedPrecondition(
            f"{what}: not permitted ({errno_name(e.errno)}); the driver needs CAP_SYS_ADMIN"
        )
    if e.errno == errno.ENOTDIR:
        return InvalidArgument(f"{what}: a directory can only be bind mounted onto a directory")
    return Internal(f"{what}: {errno_name(e.errno)} ({e.strerror})")


def _remount_readonly(target: str) -> None:
    # A bind remount sets the per-mount flags to exactly what is passed, so
    # carry over nosuid/nodev/noexec (util-linux mount does the same).
    with paths.opened(target, field="mount point") as fd:
        keep = os.statvfs(paths.fd_path(fd)).f_flag & _KEEP_ON_REMOUNT
        _mount_syscall(None, paths.fd_path(fd), None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def _open_source(source: str, nofollow: bool) -> int:
    if nofollow:
        return paths.open_nofollow(source, field="bind source")
    try:
        return os.open(source, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise _mount_error(e, f"bind source {source}") from None


def bind_mount(
    source: str,
    target: str,
    *,
    readonly: bool = False,
    recursive: bool = False,
    source_nofollow: bool = False,
) -> None:
    """Bind `source` onto `target` (a directory onto a directory, or a file or device node onto a file).

    `target` is reached with no symlink followed in any component and mounted
    on through its descriptor.  `source` is the backend's own path (its
    symlinks are followed: /dev/mapper names are links) unless
    `source_nofollow`, for a source that is itself a caller path (a staging
    path).  For read-only the kernel ignores MS_RDONLY on the bind itself, so
    the mount is remounted read-only right after; if that fails the bind is
    undone rather than left writable.  With `recursive` only the top mount is
    made read-only.
    """
    what = f"bind mount {source} on {target}"
    log.debug("%s (readonly=%s, recursive=%s)", what, readonly, recursive)
    flags = MS_BIND | (MS_REC if recursive else 0)
    src = _open_source(source, source_nofollow)
    try:
        with paths.opened(target, field="target") as dst:
            try:
                _mount_syscall(paths.fd_path(src), paths.fd_path(dst), None, flags)
            except OSError as e:
                raise _mount_error(e, what) from e
    finally:
        os.close(src)
    if readonly:
        try:
            _remount_readonly(target)
        except (OSError, CSIError) as e:
            try:
                _unmount_exact(target, MNT_DETACH if recursive else 0)
            except (OSError, CSIError) as undo:
                log.error(
                    "%s: cannot undo the writable bind after a failed read-only remount: %s", what, undo
                )
            if isinstance(e, CSIError):
                raise
            raise _mount_error(e, f"{what} read-only") from e


def remount_readonly(target: str) -> None:
    """Make the mount at `target` read-only (per mount; other binds of the filesystem stay as they are)."""
    try:
        _remount_readonly(target)
    except OSError as e:
        raise _mount_error(e, f"remount {target} read-only") from e


def _check_option(option: str) -> None:
    if not isinstance(option, str) or not option:
        raise InvalidArgument(f"mount option must be a non-empty string, got {option!r}")
    if any(c in option for c in ",\n\0"):
        raise InvalidArgument(f"mount option {option!r} must not contain a comma, newline or NUL")


def mount(
    source: str, target: str, fs_type: str, options: Sequence[str] = (), *, readonly: bool = False
) -> None:
    """Mount a filesystem with the ``mount`` tool (``mount -t fs_type -o options -- source target``)."""
    if isinstance(options, str):
        raise InvalidArgument("mount options must be a sequence of single options, not a string")
    if not fs_type or any(c in fs_type for c in ", \t\n\0"):
        raise InvalidArgument(f"invalid filesystem type {fs_type!r}")
    opts = list(options)
    for option in opts:
        _check_option(option)
    if readonly and "ro" not in opts:
        opts.append("ro")
    with paths.opened(target, field="mount point") as fd:
        # --no-canonicalize: mount(8) hands /proc/self/fd/N (the verified
        # directory, inherited at the same number) to mount(2) as it is.
        argv = ["mount", "--no-canonicalize", "-t", fs_type]
        if opts:
            argv += ["-o", ",".join(opts)]
        argv += ["--", source, paths.fd_path(fd)]
        run(argv, pass_fds=(fd,))


class _ThreadFs(threading.local):
    private = False


_thread_fs = _ThreadFs()


def _private_cwd() -> None:
    """Give this thread a working directory of its own (unshare(CLONE_FS)), once.

    umount2(2) takes no directory descriptor, and a descriptor opened on the
    mount point would pin the mount (EBUSY).  So an unmount runs in the
    verified parent directory with a relative name, and the chdir must not
    move the cwd of the driver's other threads.
    """
    if _thread_fs.private:
        return
    fn = libc().unshare
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    check_call(fn(_CLONE_FS), "unshare(CLONE_FS)")
    _thread_fs.private = True


def _unmount_exact(target: str, flags: int) -> None:
    """umount2 of the mount at exactly `target`: its name, in its parent opened with no symlink followed."""
    parent, name = os.path.split(target)
    if not name:
        raise InvalidArgument(f"refusing to unmount {target!r}")
    with paths.opened(
        parent or "/", field="the parent of the mount point", flags=os.O_PATH | os.O_DIRECTORY
    ) as fd:
        _private_cwd()
        os.fchdir(fd)
        try:
            _umount2(name, flags | UMOUNT_NOFOLLOW)
        finally:
            os.chdir("/")


def unmount(target: str, *, lazy: bool = False) -> None:
    """Unmount the top mount at exactly `target`; success if nothing is mounted there or the path is gone.

    No symlink is followed in any component (UMOUNT_NOFOLLOW for the last,
    `csi_kit.linux.paths` for the parents): a link could otherwise point the
    unmount at a mount of someone else's choosing.
    """
    try:
        _unmount_exact(target, MNT_DETACH if lazy else 0)
    except NotFound:
        return
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT):
            return
        if e.errno == errno.EBUSY:
            raise FailedPrecondition(
                f"cannot unmount {target}: it is busy (a process uses it, or something is mounted below it)"
            ) from e
        raise _mount_error(e, f"unmount {target}") from e
    log.debug("unmounted %s%s", target, " (lazy)" if lazy else "")


def unmount_stack(target: str, *, lazy: bool = False) -> int:
    """Unmount the mounts stacked at exactly `target` showing what the top one shows; return how many.

    A publish retried after a crash can leave the same bind twice at one
    path; a single `unmount` would leave the lower one.  Only mounts at
    exactly `target` are touched, and only while they show what the top one
    showed (same device and root): anything else below is not ours.
    """
    count = 0
    first: tuple[int, int, str] | None = None
    for _ in range(64):
        here = mounts_at(target)
        if not here:
            return count
        top = here[-1]
        key = (top.major, top.minor, top.root)
        if first is None:
            first = key
        elif key != first:
            return count
        unmount(target, lazy=lazy)
        count += 1
    raise FailedPrecondition(f"mounts at {target} keep reappearing; gave up after {count} unmounts")


def unmount_all(target: str, *, lazy: bool = False) -> int:
    """Unmount every mount stacked at `target` and below it, deepest first; return how many.

    For the backend's own paths only (a scratch mount of its own): never on a
    caller path, where "below it" may be mounts that are not ours.
    """
    count = 0
    for _ in range(64):
        below = mounts_under(target)
        if not below:
            return count
        for m in reversed(below):
            unmount(m.mount_point, lazy=lazy)
            count += 1
    raise FailedPrecondition(f"mounts under {target} keep reappearing; gave up after {count} unmounts")
