"""32 concurrent clients on distinct names: CreateVolume, CreateSnapshot, DeleteSnapshot, DeleteVolume.

Each client (a thread with its own channel, the threads spread over a few
client processes so that the clients' own Python does not serialise them)
repeats the four calls on names no other client uses, for ``--seconds``.
The driver is a ``csi-kit serve`` child process (hostPath) with its state
directory on ``--dir`` (default ``/var/tmp``, a real disk) at the
``--durability`` asked for (default ``power``, the driver's default): every
one of those calls commits to the store, and concurrent commits share one
flush (the store's group commit).  Printed: operations per second over all
clients, latency percentiles per call, the driver's CPU and RSS, and the
load average.

No root needed.  Run::

    .venv/bin/python benchmarks/concurrent_mix.py [--clients 32] [--processes 4] [--seconds 10]
        [--dir /var/tmp] [--durability power|process]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from _bench import Client, header, load_average, percentile, process_cpu_seconds, rss_mib

from csi_kit.testing.driver import driver_process

OPS = ("CreateVolume", "CreateSnapshot", "DeleteSnapshot", "DeleteVolume")


def _client_loop(endpoint: str, prefix: str, start: float, end: float, out: dict[str, list[float]]) -> None:
    with Client(endpoint) as client:
        while time.time() < start:
            time.sleep(0.001)
        i = 0
        while time.time() < end:
            i += 1
            t0 = time.perf_counter()
            vid = client.create_volume(f"{prefix}-v{i}", capacity=1 << 20)
            t1 = time.perf_counter()
            sid = client.create_snapshot(f"{prefix}-s{i}", vid)
            t2 = time.perf_counter()
            client.delete_snapshot(sid)
            t3 = time.perf_counter()
            client.delete_volume(vid)
            t4 = time.perf_counter()
            for op, took in zip(OPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                out[op].append(took)


def worker(endpoint: str, prefix: str, threads: int, start: float, end: float) -> None:
    """One client process: ``threads`` clients; prints their latencies as JSON."""
    results: list[dict[str, list[float]]] = [{op: [] for op in OPS} for _ in range(threads)]
    pool = [
        threading.Thread(target=_client_loop, args=(endpoint, f"{prefix}t{t}", start, end, results[t]))
        for t in range(threads)
    ]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    merged = {op: [x for r in results for x in r[op]] for op in OPS}
    json.dump(merged, sys.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--processes", type=int, default=4, help="client processes the clients share")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--dir", default="/var/tmp", help="where the driver's state directory goes")
    parser.add_argument("--durability", default="power", choices=["power", "process"])
    parser.add_argument("--workers", type=int, default=16, help="the driver's --workers (its thread pool)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        endpoint, prefix, threads, start, end = args.worker
        worker(endpoint, prefix, int(threads), float(start), float(end))
        return 0
    header(f"{args.clients} concurrent clients: create / snapshot / delete on distinct names")
    state = tempfile.mkdtemp(dir=args.dir, prefix="csi-kit-bench-mix-")
    try:
        extra = ["--durability", args.durability, "--workers", str(args.workers)]
        with driver_process(state, extra_args=extra) as proc:
            assert proc.proc is not None
            pid = proc.proc.pid
            with Client(proc.endpoint) as warm:
                for i in range(20):
                    vid = warm.create_volume(f"warmup-{i}", capacity=1 << 20)
                    warm.delete_snapshot(warm.create_snapshot(f"warmup-s{i}", vid))
                    warm.delete_volume(vid)
            start = time.time() + 2.0  # every client connected before the clock starts
            end = start + args.seconds
            per = [
                args.clients // args.processes + (p < args.clients % args.processes)
                for p in range(args.processes)
            ]
            workers = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        proc.endpoint,
                        f"p{p}",
                        str(n),
                        str(start),
                        str(end),
                    ],
                    stdout=subprocess.PIPE,
                )
                for p, n in enumerate(per)
                if n
            ]
            while time.time() < start:
                time.sleep(0.01)
            cpu0 = process_cpu_seconds(pid)
            load_at_start = load_average()
            outputs = [w.communicate()[0] for w in workers]
            cpu = process_cpu_seconds(pid) - cpu0
            rss = rss_mib(pid)
            if any(w.returncode for w in workers):
                print("a client process failed", file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(state, ignore_errors=True)
    lat: dict[str, list[float]] = {op: [] for op in OPS}
    for out in outputs:
        for op, values in json.loads(out).items():
            lat[op] += values
    every = sorted(x for values in lat.values() for x in values)
    rate = len(every) / args.seconds
    print(
        f"   state on {args.dir}, --durability {args.durability}, --workers {args.workers}, "
        f"{args.clients} clients in "
        f"{len(workers)} processes, {args.seconds:g} s  [load {load_at_start} at start]"
    )
    for op in OPS:
        s = sorted(lat[op])
        print(
            f"   {op:15s} {len(s):7d} calls  p50 {statistics.median(s) * 1000:6.2f} ms  "
            f"p90 {percentile(s, 0.9) * 1000:6.2f} ms  p99 {percentile(s, 0.99) * 1000:6.2f} ms"
        )
    p99 = percentile(every, 0.99) * 1000
    print(
        f"   RESULT {rate:.0f} operations/s (target >= 2000: {'meets' if rate >= 2000 else 'MISSES'}), "
        f"p99 {p99:.1f} ms over all calls (target <= 50: {'meets' if p99 <= 50 else 'MISSES'}); "
        f"driver CPU {cpu / args.seconds:.2f} s/s, {cpu / len(every) * 1e6:.0f} us/call; "
        f"driver RSS {rss:.1f} MiB  [load {load_average()}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
