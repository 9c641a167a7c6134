"""Idle resident memory of a hostPath driver process.

Starts ``csi-kit serve`` (the hostPath backend, default settings, a temporary
state directory), makes one Probe and one GetPluginInfo call so the gRPC
server has built its first channel and servicers, waits, and prints VmRSS
(and VmHWM, the peak) from ``/proc/PID/status`` — what a DaemonSet pod
costs on every node while nothing happens.  Then ``--pairs``
CreateVolume+DeleteVolume pairs (100 by default; 100,000 shows whether work
leaves memory behind), with VmRSS printed at ten checkpoints along the way,
and the same figures once idle again.

No root needed.  Run::

    .venv/bin/python benchmarks/idle_rss.py [--wait 5] [--pairs 100000] [--state-parent /dev/shm]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

from _bench import Client, header, load_average

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.driver import driver_process


def status_kib(pid: int) -> dict[str, int]:
    """The memory lines of ``/proc/PID/status`` (VmRSS, VmHWM, RssAnon, RssFile...) in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith(("Vm", "Rss")) and value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
    return out


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def show(label: str, pid: int) -> None:
    m = status_kib(pid)
    print(
        f"   {label}: VmRSS {m['VmRSS'] / 1024:.1f} MiB  (RssAnon {m.get('RssAnon', 0) / 1024:.1f} MiB, "
        f"RssFile {m.get('RssFile', 0) / 1024:.1f} MiB)  VmHWM {m['VmHWM'] / 1024:.1f} MiB  "
        f"threads {threads_of(pid)}"
    )
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wait", type=float, default=5.0, help="seconds to let the driver settle")
    parser.add_argument("--pairs", type=int, default=100, help="create/delete pairs between the two readings")
    parser.add_argument("--state-parent", default=None, help="where the state directory goes (default: /tmp)")
    args = parser.parse_args()
    header("idle driver RSS")
    workdir = tempfile.mkdtemp(prefix="csi-kit-bench-rss-", dir=args.state_parent)
    try:
        with driver_process(workdir) as proc, Client(proc.endpoint) as client:
            assert proc.proc is not None
            pid = proc.proc.pid
            client.identity.Probe(pb.ProbeRequest(), timeout=30)
            client.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=30)
            time.sleep(args.wait)
            show(f"idle, {args.wait:g} s after start", pid)
            step = max(1, args.pairs // 10)
            start = time.perf_counter()
            for i in range(args.pairs):
                client.delete_volume(client.create_volume(f"rss-{i}"))
                if (i + 1) % step == 0 and args.pairs >= 1000:
                    rate = (i + 1) / (time.perf_counter() - start)
                    show(f"after {i + 1} pairs ({rate:.0f} pairs/s) [load {load_average()}]", pid)
            time.sleep(args.wait)
            show(f"idle again after {args.pairs} create/delete pairs", pid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
