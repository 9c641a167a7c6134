"""The cluster's own network and mount namespaces, and how the harness reaches into them.

A holder process (`start_holder`: ``unshare --mount --net`` running
``sleep``) keeps both namespaces open; every component is started in them
with ``nsenter -m -n`` (`nsenter`).

- network: a veth pair with both ends inside the namespace carries the node
  address (the kernel may lack ``dummy``; the kubelet refuses loopback).  No
  route leaves the namespace, no name is ever resolved (empty resolv.conf,
  ``--hostname-override``/``--node-ip``), pods use ``hostNetwork``.  The
  harness itself reaches the API server through sockets opened from a thread
  that entered the namespace (`netns_socket`);
- mounts: tmpfs over ``/run`` and ``/var/log`` (containerd's shim sockets and
  the kubelet's log links have fixed paths), the kubelet root bind-mounted
  rshared, and three files bound over ``/proc/sys`` entries so the kubelet's
  ``protectKernelDefaults`` check passes without changing the machine's values;
- cgroups (v1, cgroupfs driver): a ``cgroupRoot`` of the run's own, made in
  every hierarchy `cgroup_mounts` lists.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from csi_kit.linux._libc import check_call, libc
from csi_kit.linux.run import Result
from csi_kit.testing.cluster.node import NODE_IP, PEER_IP

__all__ = ["start_holder", "wait_holder", "nsenter", "setup_namespaces", "netns_socket", "cgroup_mounts"]

# Values the kubelet's protectKernelDefaults demands, bound over /proc/sys inside
# the mount namespace only: the machine's own settings never change.
_SYSCTLS = {"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}
_CLONE_NEWNET = 0x40000000


def start_holder() -> subprocess.Popen[bytes]:
    """The process whose namespaces the cluster lives in (a session of its own)."""
    return subprocess.Popen(
        ["unshare", "--mount", "--net", "--propagation", "private", "--", "sleep", "2147483647"],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_holder(netns: str) -> None:
    """Wait until the holder's network namespace (path `netns`) is no longer ours."""
    mine = os.readlink("/proc/self/ns/net")
    for _ in range(200):
        with contextlib.suppress(OSError):
            if os.readlink(netns) != mine:
                return
        time.sleep(0.01)
    raise RuntimeError("the namespace holder did not enter its namespaces")


def nsenter(holder_pid: int, argv: Iterable[str]) -> list[str]:
    """`argv` run inside the holder's mount and network namespaces."""
    return ["nsenter", f"--target={holder_pid}", "--mount", "--net", "--", *argv]


def setup_namespaces(run: Callable[..., Result], work: Path, kubelet_root: Path, cgroup_root: str) -> None:
    """The node's network, mounts and cgroups; `run` runs a command inside the namespaces."""
    sysctl_dir = work / "sysctl"
    sysctl_dir.mkdir()
    steps = [
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "add", "e2e0", "type", "veth", "peer", "name", "e2e1"],
        ["ip", "addr", "add", f"{NODE_IP}/24", "dev", "e2e0"],
        ["ip", "addr", "add", f"{PEER_IP}/24", "dev", "e2e1"],
        ["ip", "link", "set", "e2e0", "up"],
        ["ip", "link", "set", "e2e1", "up"],
        ["mount", "-t", "tmpfs", "-o", "mode=755", "csi-kit-e2e-run", "/run"],
        ["mount", "-t", "tmpfs", "-o", "mode=755", "csi-kit-e2e-log", "/var/log"],
        ["mount", "--bind", str(kubelet_root), str(kubelet_root)],
        ["mount", "--make-rshared", str(kubelet_root)],
    ]
    for key, value in _SYSCTLS.items():
        f = sysctl_dir / key.replace("/", ".")
        f.write_text(value + "\n")
        steps.append(["mount", "--bind", "-o", "ro", str(f), f"/proc/sys/{key}"])
    for argv in steps:
        run(argv)
    for hierarchy in cgroup_mounts():
        os.makedirs(hierarchy + cgroup_root, exist_ok=True)
    (work / "resolv.conf").write_text("")
    (work / "cni/net.d").mkdir(parents=True)
    (work / "cni/bin").mkdir()
    (work / "cni/net.d/10-lo.conf").write_text('{"cniVersion": "0.4.0", "name": "lo", "type": "loopback"}\n')


def netns_socket(netns: str, address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection opened inside the network namespace at path `netns`.

    The namespace is per thread: a short-lived thread enters it and connects;
    the socket stays in the namespace it was made in, the caller's thread never moves.
    """
    out: list[socket.socket | BaseException] = []

    def connect() -> None:
        try:
            with open(netns) as f:
                setns = libc().setns
                setns.argtypes = [ctypes.c_int, ctypes.c_int]
                check_call(setns(f.fileno(), _CLONE_NEWNET), "setns", netns)
            out.append(socket.create_connection(address, timeout=timeout))
        except BaseException as e:  # handed to the caller's thread
            out.append(e)

    t = threading.Thread(target=connect, name="netns-connect")
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def cgroup_mounts() -> list[str]:
    """The mount points of the machine's cgroup hierarchies (v1 and v2)."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if parts[2] in ("cgroup", "cgroup2"):
            out.append(parts[1])
    return out
