"""A block device for LVM tests, and teardown that leaves the machine clean.

Inside the VM harness the device is the guest's scratch disk
(``$CSI_KIT_VM_DISK``).  On a machine whose kernel has device-mapper the same
tests run natively: the device is then a loop device over a sparse file in
the test's tmp dir, detached afterwards.  Either way the caller gets a device
with no LVM label on it, and every VG a test made is removed at the end, even
when the test failed half-way.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

LVM_ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}


def cmd(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a tool, and say what failed and why when it does."""
    proc = subprocess.run(argv, capture_output=True, text=True, env=LVM_ENV, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def unique_vg_name() -> str:
    """VG names unique per test, so a native run cannot meet another run's VG."""
    return f"csikit{secrets.token_hex(4)}"


def _wipe_labels(device: str) -> None:
    # pvremove is the clean way; zeroing the head also drops any filesystem
    # or stale PV label a crashed earlier run left behind.
    cmd("pvremove", "-ff", "-y", device, check=False)
    with open(device, "r+b") as f:
        f.write(b"\0" * (1 << 20))
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def block_device(tmp_path: Path, size_gb: int = 4) -> Iterator[str]:
    """A block device free for LVM; see the module docstring."""
    disk = os.environ.get("CSI_KIT_VM_DISK")
    if disk:
        _wipe_labels(disk)
        try:
            yield disk
        finally:
            _wipe_labels(disk)
        return
    image = tmp_path / "pv.img"
    with open(image, "wb") as f:
        f.truncate(size_gb << 30)
    loop = cmd("losetup", "--find", "--show", str(image)).stdout.strip()
    try:
        yield loop
    finally:
        cmd("losetup", "-d", loop, check=False)


def mounts_under(prefix: str) -> list[str]:
    """Mount points whose source device path starts with ``prefix``, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            source = fields[fields.index("-") + 2]
            if source.startswith(prefix):
                found.append(fields[4])
    return sorted(found, key=len, reverse=True)


def remove_vg(vg: str) -> None:
    """Unmount what came from ``vg``, deactivate it, remove it; tolerate half-made states."""
    for prefix in (f"/dev/mapper/{vg}-", f"/dev/{vg}/"):
        for target in mounts_under(prefix):
            cmd("umount", "-l", target, check=False)
    cmd("vgchange", "-an", vg, check=False)
    cmd("vgremove", "-ff", "-y", vg, check=False)
