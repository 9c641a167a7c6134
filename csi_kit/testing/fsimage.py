"""A real filesystem for tests and benchmarks: a sparse image file in a
temporary directory, formatted and loop-mounted, and gone again afterwards.

Needs root (mount, loop devices) and the mkfs tool of the type.  Cleanup is
guaranteed even when the body raises: the mount is undone (lazily, if it
stays busy), and ``mount -o loop`` sets the loop device to autoclear, so
unmounting frees it; a device still bound to our image is detached too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence

from csi_kit.errors import CSIError, InvalidArgument
from csi_kit.linux.mounts import is_mounted, mount, mounts_at, unmount
from csi_kit.linux.run import run

__all__ = ["loop_mounted_fs"]

log = logging.getLogger("csi_kit.testing")

_MKFS: dict[str, tuple[str, ...]] = {
    "xfs": ("mkfs.xfs", "-q", "-f"),
    "ext4": ("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"),
    "btrfs": ("mkfs.btrfs", "-q", "-f"),
}


def _mkfs_argv(fs_type: str, image: str, reflink: bool) -> list[str]:
    argv = list(_MKFS[fs_type])
    if fs_type == "xfs":
        argv += ["-m", f"reflink={int(reflink)}"]
    return [*argv, image]


def _loop_devices_of(image: str) -> list[str]:
    """Loop devices still bound to `image` (``losetup -j``)."""
    result = run(["losetup", "--noheadings", "--output", "NAME", "-j", image], check=False)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def _cleanup(mount_point: str, image: str) -> None:
    for attempt in range(10):
        if not is_mounted(mount_point):
            break
        try:
            unmount(mount_point, lazy=attempt == 9)
        except CSIError as e:
            log.warning("unmount %s: %s; retrying", mount_point, e)
            time.sleep(0.1)
    with contextlib.suppress(CSIError):
        for device in _loop_devices_of(image):
            run(["losetup", "-d", device], check=False)
    with contextlib.suppress(OSError):
        os.rmdir(mount_point)
    with contextlib.suppress(OSError):
        os.unlink(image)


@contextlib.contextmanager
def loop_mounted_fs(
    tmpdir: str, fs_type: str, size_mb: int = 512, *, reflink: bool = True, options: Sequence[str] = ()
) -> Iterator[str]:
    """Yield the mount point of a fresh `fs_type` filesystem of `size_mb` MiB kept in `tmpdir`.

    fs_type is "xfs", "ext4" or "btrfs".  `reflink` applies to XFS (made
    with ``-m reflink=0/1``); btrfs always reflinks and ext4 never does.
    XFS needs at least 300 MiB.  The image is sparse, so size costs little.
    `options` are extra mount options (e.g. ``["prjquota"]``).
    """
    if fs_type not in _MKFS:
        raise InvalidArgument(f"unsupported test filesystem {fs_type!r}; use one of {sorted(_MKFS)}")
    fd, image = tempfile.mkstemp(prefix=f"csi-kit-{fs_type}-", suffix=".img", dir=tmpdir)
    mount_point = image[: -len(".img")] + ".mnt"
    try:
        os.ftruncate(fd, size_mb * 1024 * 1024)
        os.close(fd)
        fd = -1
        run(_mkfs_argv(fs_type, image, reflink))
        os.mkdir(mount_point)
        mount(image, mount_point, fs_type, ["loop", *options])
        source = mounts_at(mount_point)[-1].source
        log.debug("mounted %s image %s (%s) at %s", fs_type, image, source, mount_point)
        yield mount_point
    finally:
        if fd >= 0:
            os.close(fd)
        _cleanup(mount_point, image)
