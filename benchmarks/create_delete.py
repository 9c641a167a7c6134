"""CreateVolume+DeleteVolume pairs per second, from one client, with 0 and with 10,000 existing volumes.

Issue #2's figure: the rate with 10,000 volumes already there must stay within
20% of the rate with none (no full scans, no global lock, no per-call cost
that grows with the store).

The driver is a ``csi-kit serve`` child process with its default settings
(SQLite store with ``synchronous=FULL``, every create and delete made durable
before it is acknowledged), on a real unix socket.  The client is one
blocking gRPC channel sending one pair at a time.  The 10,000 volumes are
created in between from a thread pool over the same socket (the driver
serialises per name, never globally, so they go in concurrently).

By default the state directory (store and hostPath root) lives on a fresh
loop-mounted XFS, so the driver's fsync/syncfs calls flush only its own
filesystem and not the rest of a shared machine's dirty data; ``--fs none``
uses a plain temporary directory instead (no root needed).  Run::

    sudo .venv/bin/python benchmarks/create_delete.py [--pairs 300] [--existing 10000] [--fs xfs|ext4|none]

Exits non-zero only on an error, never on a missed target.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from _bench import Client, header, load_average, process_cpu_seconds

from csi_kit.testing.driver import driver_process
from csi_kit.testing.fsimage import loop_mounted_fs


@contextlib.contextmanager
def state_filesystem(fs_type: str, workdir: str) -> Iterator[str]:
    if fs_type == "none":
        yield workdir
        return
    with loop_mounted_fs(workdir, fs_type, size_mb=2048) as mnt:
        yield mnt


def measure_pairs(client: Client, pairs: int, tag: str, pid: int) -> dict[str, float]:
    """Send `pairs` CreateVolume+DeleteVolume pairs one after the other; return rate and latencies."""
    latencies: list[float] = []
    cpu0 = process_cpu_seconds(pid)
    start = time.perf_counter()
    for i in range(pairs):
        t0 = time.perf_counter()
        volume_id = client.create_volume(f"pair-{tag}-{i}")
        client.delete_volume(volume_id)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    cpu = process_cpu_seconds(pid) - cpu0
    latencies.sort()
    return {
        "rate": pairs / elapsed,
        "elapsed": elapsed,
        "p50": statistics.median(latencies),
        "p90": latencies[int(0.9 * (len(latencies) - 1))],
        "p99": latencies[int(0.99 * (len(latencies) - 1))],
        "cpu_per_pair": cpu / pairs,
    }


def report(label: str, r: dict[str, float], pairs: int) -> None:
    print(
        f"   {label}: {pairs} pairs in {r['elapsed']:.2f} s = {r['rate']:.1f} pairs/s   "
        f"pair latency p50 {r['p50'] * 1000:.1f} ms  p90 {r['p90'] * 1000:.1f} ms  "
        f"p99 {r['p99'] * 1000:.1f} ms   driver CPU {r['cpu_per_pair'] * 1000:.1f} ms/pair"
    )
    sys.stdout.flush()


def fill(endpoint: str, count: int, threads: int) -> float:
    """Create `count` volumes concurrently (one channel per thread); return the seconds taken."""
    clients = [Client(endpoint) for _ in range(threads)]
    try:

        def make(i: int) -> str:
            return clients[i % threads].create_volume(f"existing-{i:06d}")

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(make, range(count), chunksize=64):
                pass
        return time.perf_counter() - start
    finally:
        for c in clients:
            c.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=300, help="pairs measured at each volume count")
    parser.add_argument("--existing", type=int, default=10_000, help="volumes present for the second run")
    parser.add_argument("--fill-threads", type=int, default=16)
    parser.add_argument(
        "--fs", choices=["xfs", "ext4", "none"], default="xfs", help="filesystem of the state dir"
    )
    args = parser.parse_args()
    if args.fs != "none" and os.geteuid() != 0:
        print("create_delete: --fs xfs/ext4 needs root (use --fs none otherwise)", file=sys.stderr)
        return 2
    header("CreateVolume+DeleteVolume pairs per second")
    workdir = tempfile.mkdtemp(prefix="csi-kit-bench-cd-")
    try:
        with state_filesystem(args.fs, workdir) as base:
            state_dir = os.path.join(base, "state")
            print(f"   state dir {state_dir} ({args.fs}); driver defaults (store synchronous=FULL)")
            with driver_process(state_dir) as proc, Client(proc.endpoint) as client:
                assert proc.proc is not None
                pid = proc.proc.pid
                measure_pairs(client, 20, "warmup", pid)
                empty = measure_pairs(client, args.pairs, "empty", pid)
                report("with 0 existing volumes", empty, args.pairs)

                took = fill(proc.endpoint, args.existing, args.fill_threads)
                print(
                    f"   created {args.existing} volumes in {took:.1f} s "
                    f"({args.existing / took:.0f}/s from {args.fill_threads} threads)"
                )
                sys.stdout.flush()
                measure_pairs(client, 20, "warmup-full", pid)
                full = measure_pairs(client, args.pairs, "full", pid)
                report(f"with {args.existing} existing volumes", full, args.pairs)
                volumes_dir = os.path.join(state_dir, "hostpath", "volumes")
                print(f"   volume directories present: {len(os.listdir(volumes_dir))}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = full["rate"] / empty["rate"]
    verdict = "meets" if ratio >= 0.8 else "MISSES"
    print(
        f"   RESULT: {empty['rate']:.1f} pairs/s with 0, {full['rate']:.1f} pairs/s with {args.existing}: "
        f"ratio {ratio:.2f} (target >= 0.80: {verdict})"
    )
    print(f"   load average now {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
