"""Filesystems on block devices: probe, format, check, size, grow.

The rule that matters most: a device is formatted only when `probe` found
*no signature at all* on it.  ``blkid -p`` reads the device itself (never
the blkid cache), so a filesystem made a second ago, a partition table or an
LVM label all count, and a device holding something we do not recognise is
refused rather than overwritten.

Formatting options are chosen for volumes carved out of sparse or thin
storage: no discard at mkfs time (``-E nodiscard`` / ``-K``: the blocks are
fresh and a discard of a large sparse file only costs time), lazy inode table
init on ext4 (the kernel zeroes them in the background after mount) and no
root-reserved blocks (``-m 0``: a volume is all data, nobody logs in as root
to repair it).  Block and sector size are 4 KiB whatever the device reports
today: a filesystem made with 1 KiB blocks (mkfs.ext4's choice below 512 MiB)
or 512-byte XFS sectors cannot be mounted once the device's logical block
size grows to 4 KiB — which a loop device with direct I/O over a reflinked
image does, or an LVM volume moved to a 4Kn disk.

Sizes come from the superblock (`filesystem_size`), read from the device
before it is mounted, so the node side can tell "the device grew, the
filesystem must follow" (a restore into a larger volume, an expansion
interrupted by a restart) without asking a tool.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct

import attrs

from csi_kit.errors import CommandFailed, FailedPrecondition, Internal, InvalidArgument, NotFound
from csi_kit.linux._libc import errno_name
from csi_kit.linux.run import run

__all__ = [
    "FILESYSTEMS",
    "GROW_SLACK",
    "Signature",
    "check_filesystem",
    "device_size",
    "filesystem_size",
    "fills_device",
    "grow_filesystem",
    "grow_unmounted",
    "make_filesystem",
    "min_size",
    "probe",
]

log = logging.getLogger("csi_kit.linux")

#: Filesystems csi_kit can make, check and grow.
FILESYSTEMS = frozenset({"ext4", "xfs"})

#: A filesystem within this many bytes of its device's end fills it: growing it
#: again would gain nothing (resize2fs leaves a partial last block group) and,
#: mounted, would need a capability the process may lack.
GROW_SLACK = 1 << 20

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)

_MKFS: dict[str, tuple[str, ...]] = {
    "ext4": (
        "mkfs.ext4",
        "-q",
        "-F",
        "-b",
        "4096",
        "-m",
        "0",
        "-E",
        "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
    ),
    "xfs": ("mkfs.xfs", "-q", "-f", "-K", "-s", "size=4096"),
}

_MKFS_EXT4_PREZEROED = (
    *_MKFS["ext4"][:-1],
    "nodiscard,assume_storage_prezeroed=1",
)

#: Smallest device each mkfs accepts (mkfs.xfs refuses below 300 MiB since xfsprogs 5.19).
_MIN_SIZE = {"ext4": 1 << 20, "xfs": 300 << 20}

# blkid exit status: 2 means "nothing found".
_BLKID_NOTHING = 2


@attrs.frozen
class Signature:
    """What `probe` found on a device: ``type`` e.g. "ext4", "xfs", "LVM2_member", "gpt";
    ``usage`` e.g. "filesystem", "raid", "crypto", "partition table"."""

    type: str
    usage: str

    @property
    def is_filesystem(self) -> bool:
        return self.usage == "filesystem"


def _check_fs_type(fs_type: str) -> None:
    if fs_type not in FILESYSTEMS:
        accepted = ", ".join(sorted(FILESYSTEMS))
        raise InvalidArgument(f"unsupported filesystem {fs_type!r}; use one of {accepted}")


def min_size(fs_type: str) -> int:
    """The smallest device `make_filesystem` can format with `fs_type`."""
    _check_fs_type(fs_type)
    return _MIN_SIZE[fs_type]


def probe(device: str) -> Signature | None:
    """The signature on `device` (filesystem, partition table, RAID/LVM label...), or None if blank."""
    result = run(["blkid", "-p", "-o", "export", "--", device], check=False)
    if result.returncode == _BLKID_NOTHING:
        return None
    if result.returncode != 0:
        raise Internal(
            f"blkid -p {device} exited with status {result.returncode}: "
            f"{result.stderr.strip() or 'ambivalent or unreadable signatures'}"
        )
    tags: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            tags[key.strip()] = value.strip()
    if "TYPE" in tags:
        return Signature(tags["TYPE"], tags.get("USAGE", "filesystem"))
    if "PTTYPE" in tags:
        return Signature(tags["PTTYPE"], "partition table")
    return Signature("unknown", tags.get("USAGE", "unknown"))


def make_filesystem(device: str, fs_type: str, *, prezeroed: bool = False) -> None:
    """Format `device` with `fs_type`.  Callers must have checked with `probe` that it is blank.

    `prezeroed` says every block of the device reads as zeros (a fresh
    sparse or fallocated image, a thin LV): ext4 then marks its inode tables
    zeroed (``-E assume_storage_prezeroed=1``, e2fsprogs 1.47+) instead of
    leaving the kernel's ext4lazyinit thread to zero them after mount — I/O
    that keeps a new volume busy for minutes, allocates the tables in a
    sparse image and makes every freeze for a snapshot wait for it.  Older
    mke2fs without the option falls back to the lazy default.
    """
    _check_fs_type(fs_type)
    size = device_size(device)
    if size < _MIN_SIZE[fs_type]:
        raise FailedPrecondition(
            f"{device} holds {size} bytes; {fs_type} needs at least {_MIN_SIZE[fs_type]} bytes"
        )
    argv = [*_MKFS[fs_type], device]
    if prezeroed and fs_type == "ext4":
        result = run([*_MKFS_EXT4_PREZEROED, device], timeout=600.0, check=False)
        if result.returncode == 0:
            log.info("made %s on %s (storage pre-zeroed)", fs_type, device)
            return
        if "assume_storage_prezeroed" not in result.stderr:
            raise CommandFailed(result.argv, result.returncode, result.stderr)
        log.info("mke2fs lacks assume_storage_prezeroed (e2fsprogs < 1.47); inode tables are zeroed lazily")
    run(argv, timeout=600.0)
    log.info("made %s on %s", fs_type, device)


def check_filesystem(device: str, fs_type: str) -> None:
    """Repair what can be repaired safely before mounting (``e2fsck -p`` for ext*).

    XFS needs nothing: it replays its log at mount, and xfs_repair is not a
    tool to run unattended.  A filesystem e2fsck cannot fix without a human
    raises FailedPrecondition with e2fsck's words.
    """
    if not fs_type.startswith("ext"):
        return
    result = run(["e2fsck", "-p", "--", device], check=False, timeout=600.0)
    # 0: clean; 1: errors corrected; 2: corrected, reboot advised (only matters for /).
    if result.returncode in (0, 1, 2):
        if result.returncode:
            log.warning("e2fsck repaired %s: %s", device, result.stdout.strip()[-500:])
        return
    detail = (result.stdout + result.stderr).strip().splitlines()[-3:]
    raise FailedPrecondition(
        f"{device} has filesystem errors e2fsck -p cannot fix (status {result.returncode}): "
        f"{'; '.join(detail) or 'no output'}"
    )


def device_size(path: str) -> int:
    """Size in bytes of the block device at `path` (BLKGETSIZE64); a regular file's size for a file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    except OSError as e:
        raise Internal(f"open {path}: {errno_name(e.errno)} ({e.strerror})") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if not stat.S_ISBLK(st.st_mode):
            raise InvalidArgument(f"{path} is neither a block device nor a file")
        buf = bytearray(8)
        fcntl.ioctl(fd, BLKGETSIZE64, buf, True)
        return int(struct.unpack("=Q", buf)[0])
    except OSError as e:
        raise Internal(f"BLKGETSIZE64 {path}: {errno_name(e.errno)} ({e.strerror})") from e
    finally:
        os.close(fd)


_EXT_MAGIC = 0xEF53
_EXT4_INCOMPAT_64BIT = 0x80


def filesystem_size(device: str, fs_type: str) -> int | None:
    """Bytes the filesystem on `device` spans, from its on-disk superblock; None if not that type.

    Read it while the filesystem is not mounted: a mounted XFS keeps its
    superblock in its own buffers and writes it back later.
    """
    _check_fs_type(fs_type)
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{device} does not exist") from None
    try:
        if fs_type == "xfs":
            sb = os.pread(fd, 16, 0)
            if len(sb) < 16 or sb[:4] != b"XFSB":
                return None
            block_size, data_blocks = struct.unpack(">IQ", sb[4:16])
            return int(block_size * data_blocks)
        sb = os.pread(fd, 1024, 1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != _EXT_MAGIC:
            return None
        blocks_lo, log_block = struct.unpack_from("<I", sb, 4)[0], struct.unpack_from("<I", sb, 24)[0]
        incompat = struct.unpack_from("<I", sb, 96)[0]
        blocks_hi = struct.unpack_from("<I", sb, 0x150)[0] if incompat & _EXT4_INCOMPAT_64BIT else 0
        return int(((blocks_hi << 32) | blocks_lo) * (1024 << log_block))
    except OSError as e:
        raise Internal(f"read superblock of {device}: {errno_name(e.errno)} ({e.strerror})") from e
    finally:
        os.close(fd)


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return True  # cannot tell: let the tool say


_CAP_SYS_RESOURCE = 24


def fills_device(device: str, fs_type: str) -> bool:
    """Whether the `fs_type` filesystem on `device` already spans it (within `GROW_SLACK`).

    False when `device` holds no `fs_type` superblock: then nothing is known
    to be grown, and the caller's tool has the last word.
    """
    size = filesystem_size(device, fs_type)
    return size is not None and device_size(device) - size < GROW_SLACK


def grow_filesystem(device: str, mount_point: str, fs_type: str) -> None:
    """Grow a mounted filesystem to fill its device (online).

    ext4 takes the device (``resize2fs DEV``; it finds the mount itself),
    XFS the mount point (``xfs_growfs -d MNT``).  Both are no-ops when the
    filesystem already fills the device, so a retry is harmless.  Online
    ext4 resizing needs CAP_SYS_RESOURCE, which some container runtimes
    drop: that is reported as such (`grow_unmounted` needs no capability).
    An ext4 that already fills its device answers OK before that question:
    NodeStage grows it offline, and the kubelet's NodeExpandVolume that
    follows must then succeed, not be refused forever for want of a
    capability nothing needs.  ext4 keeps its on-disk superblock current
    while mounted, so reading it here is sound (XFS does not, and
    xfs_growfs needs no extra capability, so it is always asked).
    """
    _check_fs_type(fs_type)
    if fs_type == "xfs":
        run(["xfs_growfs", "-d", "--", mount_point], timeout=600.0)
    else:
        if fills_device(device, fs_type):
            log.debug("ext4 on %s already fills it; nothing to grow", device)
            return
        if not _has_capability(_CAP_SYS_RESOURCE):
            raise FailedPrecondition(
                f"growing the mounted ext4 on {device} needs CAP_SYS_RESOURCE, which this process lacks; "
                "it is grown when next staged"
            )
        run(["resize2fs", device], timeout=600.0)
    log.info("grew %s on %s (%s)", fs_type, device, mount_point)


def grow_unmounted(device: str, fs_type: str) -> bool:
    """Grow an unmounted filesystem to fill its device; False if it can only grow mounted (XFS).

    resize2fs wants a freshly checked filesystem, hence the forced
    ``e2fsck -f -p`` first.
    """
    _check_fs_type(fs_type)
    if fs_type == "xfs":
        return False
    result = run(["e2fsck", "-f", "-p", "--", device], check=False, timeout=600.0)
    if result.returncode not in (0, 1, 2):
        detail = (result.stdout + result.stderr).strip().splitlines()[-3:]
        raise FailedPrecondition(
            f"{device}: e2fsck -f before resizing failed (status {result.returncode}): "
            f"{'; '.join(detail) or 'no output'}"
        )
    run(["resize2fs", device], timeout=600.0)
    log.info("grew %s on %s (unmounted)", fs_type, device)
    return True
