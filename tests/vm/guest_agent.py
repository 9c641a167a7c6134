"""Stage 2 of the csi_kit test guest: PID 1 after ``switch_root``.

It runs with the host's own Python on the guest's view of the host root (a
read-only virtiofs share under a tmpfs overlay, see ``init``), so it may only
use the standard library.  It prepares what a test needs from a "real"
machine -- fresh tmpfs for /tmp and /run, the guest kernel's module tree,
device-mapper and loop loaded, an ``lvm.conf`` that works without udev --
then runs the job the host passed through fw_cfg and reports the exit code
on the console with a per-run nonce, so nothing a test prints can forge it.

Whatever happens, it ends by powering the guest off: if PID 1 exits instead,
the kernel panics and the host only sees a missing result.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any

JOB_PATH = "/sys/firmware/qemu_fw_cfg/by_name/opt/csi-kit/job/raw"

# Loaded up front: devtmpfs only creates /dev/mapper/control and
# /dev/loop-control once their drivers are present, and nothing in the guest
# (no udev, no kmod-static-nodes) would create them on demand.  The thin and
# snapshot targets are cheap and nearly every guest run needs them.  Other
# modules (xfs, btrfs, quota_v2, ...) load on demand through the kernel's
# modprobe helper, which finds them in the module tree bound below.
EAGER_MODULES = ("dm_mod", "dm_thin_pool", "dm_snapshot", "loop")

# The guest has no udev: LVM must create its own device nodes and must not
# wait for udev events that never come.  No dmeventd, no lvmpolld either.
LVM_CONF = """\
# Written by the csi_kit VM harness (tests/vm/guest_agent.py): no udev here.
devices {
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
    use_devicesfile = 0
}
activation {
    udev_sync = 0
    udev_rules = 0
    verify_udev_operations = 0
    monitoring = 0
}
global {
    use_lvmpolld = 0
}
"""

RB_POWER_OFF = 0x4321FEDC
MS_BIND = 4096
MS_REC = 16384
#: Paths the guest mounts a fresh tmpfs (or devpts) on.
FRESH_TMPFS = ("/tmp", "/var/tmp", "/run", "/dev/shm")


def log(msg: str) -> None:
    print(f"csi-kit-vm: {msg}", flush=True)


def mount(source: str, target: str, fstype: str, options: str = "", flags: int = 0) -> None:
    """mount(2) directly: under TCG every exec of mount(8) costs a noticeable fraction of a second."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), flags, options.encode() or None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount -t {fstype} {source} {target}: {os.strerror(errno)}")


def sh(*argv: str) -> None:
    """Run a setup command; a failure here is a harness failure, say which."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def prepare(job: dict[str, Any]) -> None:
    # The kernel starts PID 1 with no PATH at all.
    os.environ["PATH"] = job["env"]["PATH"]
    # The guest gets fresh tmpfs on /tmp, /run...; a checkout that lives under
    # one of them (CI may clone into /tmp) would vanish: hold it aside first
    # and bind it back at its own path afterwards.
    held = []
    for path in {job["cwd"]}:
        if any(path == t or path.startswith(t + "/") for t in FRESH_TMPFS):
            hold = f"/mnt/csi-kit-held-{len(held)}"
            os.makedirs(hold, exist_ok=True)
            mount(path, hold, "", flags=MS_BIND | MS_REC)
            held.append((hold, path))
    for target, fstype, opts in (
        ("/tmp", "tmpfs", "mode=1777"),
        ("/var/tmp", "tmpfs", "mode=1777"),
        ("/run", "tmpfs", "mode=0755"),
        ("/dev/shm", "tmpfs", "mode=1777"),
        ("/dev/pts", "devpts", "mode=0620,ptmxmode=0666"),
    ):
        os.makedirs(target, exist_ok=True)
        mount(fstype, target, fstype, opts)
    for hold, path in held:
        os.makedirs(path, exist_ok=True)
        mount(hold, path, "", flags=MS_BIND | MS_REC)
    for d in ("/run/lock/lvm", "/run/lvm", "/etc/lvm"):
        os.makedirs(d, exist_ok=True)

    # The guest kernel's modules live in the harness cache on the host, which
    # the share shows at the same path; give them their standard place.
    modules = f"/lib/modules/{job['kver']}"
    os.makedirs(modules, exist_ok=True)
    mount(job["modules_dir"], modules, "", flags=MS_BIND)
    sh("modprobe", "-a", *EAGER_MODULES)
    if not os.path.exists("/dev/mapper/control"):
        raise RuntimeError("dm_mod loaded but /dev/mapper/control is missing")

    with open("/etc/lvm/lvm.conf", "w") as f:
        f.write(LVM_CONF)
    # Stale LVM state from the host's own /etc would only confuse the guest.
    for stale in ("/etc/lvm/devices/system.devices", "/etc/lvm/lvmlocal.conf"):
        if os.path.exists(stale):
            os.unlink(stale)


def find_disk(serial: str) -> str:
    for name in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{name}/serial") as f:
                if f.read().strip() == serial:
                    return f"/dev/{name}"
        except OSError:
            continue
    raise RuntimeError(f"no virtio disk with serial {serial!r}")


def run_job(job: dict[str, Any]) -> int:
    env = dict(job["env"])
    env["CSI_KIT_VM_DISK"] = find_disk(job["disk_serial"])
    nonce = job["nonce"]
    log(f"{nonce} cmd-start disk={env['CSI_KIT_VM_DISK']} cwd={job['cwd']}")
    t0 = time.monotonic()
    proc = subprocess.run(job["argv"], cwd=job["cwd"], env=env, stdin=subprocess.DEVNULL)
    log(f"command finished in {time.monotonic() - t0:.1f}s (guest clock)")
    return proc.returncode


def power_off() -> None:
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(RB_POWER_OFF)
    # Only reached if reboot(2) failed; exiting PID 1 panics, which the host
    # turns into a qemu exit (panic=-1, -no-reboot) and a missing result.
    log(f"reboot(POWER_OFF) failed: errno {ctypes.get_errno()}")


def main() -> None:
    rc = 125
    nonce = "unknown"
    try:
        with open(JOB_PATH) as f:
            job = json.load(f)
        nonce = job["nonce"]
        log(f"{nonce} agent-start")
        with open("/proc/uptime") as f:
            log(f"agent start uptime={f.read().split()[0]}s")
        prepare(job)
        rc = run_job(job)
        # A signal-killed command reports -N; the shell convention is 128+N.
        if rc < 0:
            rc = 128 - rc
    except BaseException:
        traceback.print_exc()
        log("harness failure inside the guest (see the traceback above)")
        rc = 125
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        log(f"{nonce} rc={rc}")
        power_off()


if __name__ == "__main__":
    main()
