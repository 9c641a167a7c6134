"""Undoing a cluster: every process, mount, loop device and cgroup it made.

Each step returns (or prints, through `Cluster.stop`) what it could not
undo instead of raising, so one stuck mount never hides the others.
Processes are found by what they belong to, not by what the harness
remembers starting: anything in the holder's network namespace or under the
run's cgroup root (pods' containers included) is the cluster's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from csi_kit.linux.run import Result, run
from csi_kit.testing.cluster.netns import cgroup_mounts

__all__ = ["kill_namespace_and_cgroups", "unmount_all", "detach_loops", "remove_cgroups"]


def _namespace_pids(holder_pid: int, netns: str, cgroup_root: str) -> set[int]:
    """Every process in the network namespace at `netns` or in our cgroups, but the holder."""
    pids: set[int] = set()
    try:
        ns = os.readlink(netns)
    except OSError:
        ns = None
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != holder_pid:
            with contextlib.suppress(OSError):
                if ns and os.readlink(f"/proc/{entry}/ns/net") == ns:
                    pids.add(int(entry))
    for hierarchy in cgroup_mounts():
        for dirpath, _, files in os.walk(hierarchy + cgroup_root):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as f:
                    pids.update(int(x) for x in f.read().split())
    return pids


def kill_namespace_and_cgroups(holder_pid: int, netns: str, cgroup_root: str) -> None:
    """SIGKILL, for up to 5 s, every process of the namespace and the cgroups (not the holder)."""
    for _ in range(50):
        pids = _namespace_pids(holder_pid, netns, cgroup_root)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def unmount_all(holder_pid: int, work: Path, run_inside: Callable[..., Result]) -> list[str]:
    """Unmount, deepest first, what the holder's namespace mounted under `work` or beyond ours."""
    mine = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    targets = []
    for line in Path(f"/proc/{holder_pid}/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(str(work)) or point not in mine:
            targets.append(point)
    problems = []
    for point in reversed(targets):
        r = run_inside(["umount", "-l", point], check=False)
        if r.returncode and "not mounted" not in r.stderr:
            problems.append(f"umount {point}: {r.stderr.strip()}")
    return problems


def detach_loops(work: Path) -> list[str]:
    """Detach every loop device whose backing file is under `work`."""
    problems = []
    for dev in os.listdir("/sys/block"):
        try:
            backing = Path(f"/sys/block/{dev}/loop/backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(str(work)):
            r = run(["losetup", "-d", f"/dev/{dev}"], check=False)
            if r.returncode:
                problems.append(f"losetup -d /dev/{dev} ({backing}): {r.stderr.strip()}")
    return problems


def remove_cgroups(cgroup_root: str) -> list[str]:
    """Remove the run's cgroups in every hierarchy, deepest first."""
    problems = []
    for hierarchy in cgroup_mounts():
        top = hierarchy + cgroup_root
        for dirpath, _, _ in sorted(os.walk(top), key=lambda t: -t[0].count("/")):
            for _ in range(20):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # a process still exiting
                    time.sleep(0.1)
            else:
                problems.append(f"cgroup {dirpath} could not be removed")
    return problems
