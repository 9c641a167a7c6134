"""Loop devices through ioctls, without ``losetup``.

Attaching is one `LOOP_CONFIGURE` (Linux 5.8+): the backing file, the flags
and the direct-I/O choice land atomically, so no other process ever sees a
half-set-up device.  The free device comes from ``LOOP_CTL_GET_FREE`` on
/dev/loop-control; between that answer and our LOOP_CONFIGURE another
process (or another thread) may take the same device, which the kernel
reports as EBUSY: we simply ask for another one.

State is never kept in memory: which image a device serves comes from
``/sys/block/loopN/loop/backing_file`` (the kernel's current path of the open
file: it follows renames and ends in `` (deleted)`` once the file is
unlinked), so a restarted driver finds its devices again.

Autoclear (``LO_FLAGS_AUTOCLEAR``) makes the kernel detach a device when its
last opener closes it.  A device attached for a filesystem is attached that
way and the `LoopAttachment` keeps it open until the filesystem is mounted;
from then on the mount holds it, and unmounting it frees the device even if
the driver is not there to do so.  A raw block volume has no opener between
NodeStage and the workload's open, so it is attached without autoclear and
detached explicitly.

Direct I/O (``LO_FLAGS_DIRECT_IO``) avoids caching every block twice (once
for the loop device, once for the image file); it is asked for and the
kernel's verdict read back from sysfs, because backing filesystems without
O_DIRECT (tmpfs, some FUSE) either refuse it (EINVAL: we retry without) or
silently drop it.

Loop devices are a machine-wide resource: every function here touches only
the devices it is told about, and `detach` re-checks that a device still
serves the expected file after opening it, so a device reused by someone
else in between is left alone.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import time

import attrs

from csi_kit.errors import FailedPrecondition, Internal, NotFound, ResourceExhausted
from csi_kit.linux._libc import errno_name

__all__ = [
    "LoopAttachment",
    "LoopDevice",
    "attach",
    "detach",
    "device_for",
    "devices_of",
    "ensure_node",
    "list_devices",
    "loop_device",
    "set_autoclear",
    "set_capacity",
]

log = logging.getLogger("csi_kit.linux")

LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

LOOP_MAJOR = 7

#: struct loop_info64 (linux/loop.h): device, inode, rdevice, offset,
#: sizelimit (u64); number, encrypt_type, encrypt_key_size, flags (u32);
#: file_name[64], crypt_name[64], encrypt_key[32]; init[2] (u64).
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
#: struct loop_config: fd, block_size (u32); struct loop_info64; __reserved[8] (u64).
LOOP_CONFIG = struct.Struct(f"=II{LOOP_INFO64.size}s64x")
_INFO_FLAGS_INDEX = 8

SYS_BLOCK = "/sys/block"
DEV_DIR = "/dev"
LOOP_CONTROL = "/dev/loop-control"

_DELETED = " (deleted)"
_GET_FREE_ATTEMPTS = 64


@attrs.frozen
class LoopDevice:
    """A bound loop device as sysfs describes it.

    `backing_file` is the kernel's current path of the image (renames
    included); `deleted` is True once that file has been unlinked.
    """

    number: int
    backing_file: str
    deleted: bool = False
    autoclear: bool = False
    direct_io: bool = False
    read_only: bool = False

    @property
    def name(self) -> str:
        return f"loop{self.number}"

    @property
    def path(self) -> str:
        return os.path.join(DEV_DIR, self.name)


def _read_sys(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read().rstrip("\n")
    except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
        return None
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENODEV):  # device going away while we read
            return None
        raise


def _number_of(name: str) -> int | None:
    if not name.startswith("loop") or not name[4:].isdigit():
        return None
    return int(name[4:])


def loop_device(number: int) -> LoopDevice | None:
    """The device loopN if it is bound to a file, else None."""
    base = os.path.join(SYS_BLOCK, f"loop{number}")
    backing = _read_sys(os.path.join(base, "loop", "backing_file"))
    if not backing:
        return None
    deleted = backing.endswith(_DELETED)
    if deleted:
        backing = backing[: -len(_DELETED)]
    return LoopDevice(
        number=number,
        backing_file=backing,
        deleted=deleted,
        autoclear=_read_sys(os.path.join(base, "loop", "autoclear")) == "1",
        direct_io=_read_sys(os.path.join(base, "loop", "dio")) == "1",
        read_only=_read_sys(os.path.join(base, "ro")) == "1",
    )


def _numbers() -> list[int]:
    """The numbers of the loop devices the kernel has made, in order."""
    try:
        names = os.listdir(SYS_BLOCK)
    except FileNotFoundError:
        raise FailedPrecondition(f"{SYS_BLOCK} does not exist (is sysfs mounted?)") from None
    return sorted(n for n in map(_number_of, names) if n is not None)


def list_devices() -> list[LoopDevice]:
    """Every bound loop device on the machine, by number."""
    found = []
    for number in _numbers():
        device = loop_device(number)
        if device is not None:
            found.append(device)
    return found


def devices_of(image: str, *, include_deleted: bool = False) -> list[LoopDevice]:
    """Loop devices bound to the file at `image` (normally zero or one).

    Matched by the kernel's path for the open file, compared with the
    image's real path: symlinks in `image` do not hide a device.  With
    `include_deleted`, devices still serving a file that was unlinked from
    that path count too (only safe when paths are never reused).
    """
    wanted = os.path.realpath(image)
    found = []
    # Only the backing file of each device is read here, the full record of a
    # match only: this runs on every snapshot, clone and delete.
    for number in _numbers():
        backing = _read_sys(os.path.join(SYS_BLOCK, f"loop{number}", "loop", "backing_file"))
        if backing not in (wanted, wanted + _DELETED):
            continue
        device = loop_device(number)
        if device is not None and device.backing_file == wanted and (include_deleted or not device.deleted):
            found.append(device)
    return found


def device_for(image: str, *, include_deleted: bool = False) -> LoopDevice | None:
    """The loop device serving `image`, or None (the lowest number if several)."""
    found = devices_of(image, include_deleted=include_deleted)
    return found[0] if found else None


def _dev_number(number: int) -> int:
    """The device number of loopN: from sysfs (max_part changes the minors), else 7:N."""
    text = _read_sys(os.path.join(SYS_BLOCK, f"loop{number}", "dev"))
    if text and ":" in text:
        major, minor = text.split(":", 1)
        return os.makedev(int(major), int(minor))
    return os.makedev(LOOP_MAJOR, number)


def ensure_node(number: int) -> str:
    """Return /dev/loopN, creating the block device node if it is missing.

    Containers with a static /dev (no udev, no devtmpfs) lack the nodes of
    loop devices the kernel made after the container started.
    """
    path = os.path.join(DEV_DIR, f"loop{number}")
    rdev = _dev_number(number)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        try:
            os.mknod(path, 0o660 | stat.S_IFBLK, rdev)
            log.info("created missing device node %s", path)
        except FileExistsError:
            pass  # made by udev (or another thread) meanwhile
        except OSError as e:
            raise FailedPrecondition(
                f"{path} is missing and cannot be created: {errno_name(e.errno)} ({e.strerror})"
            ) from e
        return path
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != rdev:
        raise FailedPrecondition(
            f"{path} is not the block device {os.major(rdev)}:{os.minor(rdev)}; refusing to use it"
        )
    return path


def _get_free() -> int:
    try:
        fd = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FailedPrecondition(
            f"{LOOP_CONTROL} does not exist: the loop module is not loaded (modprobe loop) "
            "or /dev is not the host's"
        ) from None
    except PermissionError:
        raise FailedPrecondition(f"opening {LOOP_CONTROL} needs root (CAP_SYS_ADMIN)") from None
    try:
        return fcntl.ioctl(fd, LOOP_CTL_GET_FREE)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ResourceExhausted("no free loop device (max_loop reached)") from e
        raise Internal(f"LOOP_CTL_GET_FREE: {errno_name(e.errno)} ({e.strerror})") from e
    finally:
        os.close(fd)


class LoopAttachment:
    """A device `attach` bound, with our open handle on it.

    While the handle is open an autoclear device cannot go away; `close()`
    lets it (an autoclear device nobody else holds is detached at once).
    Use as a context manager around whatever must find the device in place,
    e.g. mkfs and mount.
    """

    def __init__(self, device: LoopDevice, fd: int) -> None:
        self.device = device
        self._fd = fd

    @property
    def path(self) -> str:
        return self.device.path

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> LoopAttachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - a forgotten handle still gets closed
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)


def _configure(device_fd: int, backing_fd: int, flags: int, block_size: int) -> None:
    info = LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, b"", b"", b"", 0, 0)
    fcntl.ioctl(device_fd, LOOP_CONFIGURE, LOOP_CONFIG.pack(backing_fd, block_size, info))


def attach(
    image: str,
    *,
    autoclear: bool = False,
    direct_io: bool = True,
    read_only: bool = False,
    block_size: int = 0,
) -> LoopAttachment:
    """Bind a free loop device to `image`; return it, still held open by us.

    Does not look for an existing device first: call `device_for` when the
    image may already be attached (two devices on one image mounted twice
    would corrupt it).  Close the returned handle when done with it; with
    `autoclear` that is what lets the kernel detach the device later.

    `block_size` sets the device's logical block size (512..4096); 0 lets
    the kernel choose, and with direct I/O it chooses the backing file's
    direct-I/O alignment, which can change from one attach to the next (on
    XFS a reflinked file needs whole-block alignment): a filesystem made
    with 1 KiB blocks then no longer mounts.  Give a fixed size for a stable
    device geometry.
    """
    mode = os.O_RDONLY if read_only else os.O_RDWR
    try:
        backing_fd = os.open(image, mode | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFound(f"image {image} does not exist") from None
    except IsADirectoryError:
        raise FailedPrecondition(f"{image} is not a regular file") from None
    except OSError as e:
        raise Internal(f"open {image}: {errno_name(e.errno)} ({e.strerror})") from e
    try:
        if not stat.S_ISREG(os.fstat(backing_fd).st_mode):
            raise FailedPrecondition(f"{image} is not a regular file")
        flags = (LO_FLAGS_AUTOCLEAR if autoclear else 0) | (LO_FLAGS_READ_ONLY if read_only else 0)
        want_dio = direct_io
        for _ in range(_GET_FREE_ATTEMPTS):
            number = _get_free()
            path = ensure_node(number)
            try:
                fd = os.open(path, mode | os.O_CLOEXEC)
            except OSError as e:
                if e.errno in (errno.ENXIO, errno.ENODEV, errno.ENOENT):
                    continue  # removed (LOOP_CTL_REMOVE) by someone between the two calls
                raise Internal(f"open {path}: {errno_name(e.errno)} ({e.strerror})") from e
            try:
                try:
                    _configure(fd, backing_fd, flags | (LO_FLAGS_DIRECT_IO if want_dio else 0), block_size)
                except OSError as e:
                    if e.errno == errno.EINVAL and want_dio:
                        # The backing filesystem cannot do O_DIRECT (or not at this alignment).
                        want_dio = False
                        _configure(fd, backing_fd, flags, block_size)
                    else:
                        raise
            except OSError as e:
                os.close(fd)
                if e.errno == errno.EBUSY:
                    log.debug("loop%d was taken by someone else; asking for another", number)
                    continue
                raise Internal(
                    f"LOOP_CONFIGURE {path} with {image}: {errno_name(e.errno)} ({e.strerror})"
                ) from e
            device = loop_device(number) or LoopDevice(number, os.path.realpath(image))
            log.debug(
                "attached %s to %s (autoclear=%s, direct_io=%s)", image, path, autoclear, device.direct_io
            )
            return LoopAttachment(device, fd)
        raise ResourceExhausted(
            f"no loop device could be bound to {image}: {_GET_FREE_ATTEMPTS} free devices were "
            "taken by others first"
        )
    finally:
        os.close(backing_fd)


def _open_device(path: str, flags: int) -> int | None:
    """Open a loop device node; None if it no longer exists."""
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return None
        raise Internal(f"open {path}: {errno_name(e.errno)} ({e.strerror})") from e


def _still_serves(number: int, backing_file: str | None) -> bool:
    if backing_file is None:
        return True
    current = loop_device(number)
    return current is not None and current.backing_file == backing_file


def detach(device: LoopDevice, *, wait: float = 5.0) -> bool:
    """Detach `device` if it still serves the same file; True if it is gone now.

    A device in use (a mounted filesystem, a process holding it open) cannot
    be cleared at once: the kernel marks it autoclear instead, and it goes
    when its last user closes it; that case returns False.
    """
    number = device.number
    fd = _open_device(ensure_node(number), os.O_RDONLY)
    if fd is None:
        return True
    try:
        if not _still_serves(number, device.backing_file):
            log.debug("loop%d no longer serves %s; leaving it alone", number, device.backing_file)
            return True
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD, 0)
        except OSError as e:
            if e.errno == errno.ENXIO:  # not bound (any more)
                return True
            if e.errno == errno.EBUSY:  # kernels before 5.x refuse while in use
                set_autoclear(device)
                return False
            raise Internal(f"LOOP_CLR_FD loop{number}: {errno_name(e.errno)} ({e.strerror})") from e
    finally:
        os.close(fd)
    # The kernel finishes the clear when our handle (the last one) is closed.
    deadline = time.monotonic() + wait
    while True:
        current = loop_device(number)
        if current is None or current.backing_file != device.backing_file:
            log.debug("detached loop%d from %s", number, device.backing_file)
            return True
        if time.monotonic() >= deadline:
            log.info("loop%d is in use; it will be detached when its last user closes it", number)
            return False
        time.sleep(0.01)


def set_autoclear(device: LoopDevice) -> None:
    """Mark `device` autoclear: the kernel detaches it after its last close."""
    fd = _open_device(ensure_node(device.number), os.O_RDONLY)
    if fd is None:
        return
    try:
        if not _still_serves(device.number, device.backing_file):
            return
        buf = bytearray(LOOP_INFO64.size)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
        fields = list(LOOP_INFO64.unpack(buf))
        fields[_INFO_FLAGS_INDEX] |= LO_FLAGS_AUTOCLEAR
        fcntl.ioctl(fd, LOOP_SET_STATUS64, LOOP_INFO64.pack(*fields))
    except OSError as e:
        if e.errno == errno.ENXIO:
            return
        raise Internal(f"set autoclear on loop{device.number}: {errno_name(e.errno)} ({e.strerror})") from e
    finally:
        os.close(fd)


def set_capacity(device: LoopDevice) -> None:
    """Make the device's size follow its image's current size (LOOP_SET_CAPACITY)."""
    fd = _open_device(ensure_node(device.number), os.O_RDONLY)
    if fd is None:
        raise NotFound(f"loop{device.number} does not exist")
    try:
        if not _still_serves(device.number, device.backing_file):
            raise NotFound(f"loop{device.number} no longer serves {device.backing_file}")
        fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise NotFound(f"loop{device.number} is not bound to a file") from e
        raise Internal(f"LOOP_SET_CAPACITY loop{device.number}: {errno_name(e.errno)} ({e.strerror})") from e
    finally:
        os.close(fd)
