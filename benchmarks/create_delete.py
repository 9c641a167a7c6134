"""CreateVolume+DeleteVolume pairs per second, from one client, with 0 and with 10,000 existing volumes.

Issue #2's figure: the rate with 10,000 volumes already there must stay within
20% of the rate with none (no full scans, no global lock, no per-call cost
that grows with the store).

Two ``csi-kit serve`` child processes run side by side with their default
settings (``--durability power``: every create and delete is on the disk
before it is acknowledged), each on its own unix socket and state
directory: "empty" and "full".  The 10,000 volumes of "full" are made
first, 16 at a time, by an in-process engine on its state directory whose
store commits without flushing (``durability="process"``; ``--fill direct``, the default:
about 4x faster than with fsyncs, which keeps the run under three minutes;
the measured driver then starts on that state directory with its defaults),
or with ``--fill grpc`` by 16 threads over the measured driver's own socket.
Then one client (one blocking gRPC channel per driver, one pair at a time)
sends the measured pairs in short alternating blocks, empty, full, empty, full..., so that the changing load
of a shared machine falls on both figures alike instead of on whichever ran
second.  Printed: the rate over all blocks, and the median of the per-block
ratios (each full block against the empty block just before it), which is
the steadier figure when the machine's load swings.

By default each state directory (store and hostPath root) lives on its own
fresh loop-mounted XFS, so the driver's fsync/syncfs calls flush only its
own filesystem and not the rest of a shared machine's dirty data; ``--fs
none`` uses plain temporary directories instead (no root needed).  Run::

    sudo .venv/bin/python benchmarks/create_delete.py [--pairs 300] [--existing 10000] [--fs xfs|ext4|none]

Exits non-zero only on an error, never on a missed target.
"""

from __future__ import annotations

import argparse
import asyncio
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

from csi_kit.driver import Driver, DriverConfig
from csi_kit.testing.driver import driver_process
from csi_kit.testing.fsimage import loop_mounted_fs
from csi_kit.types import AccessMode, CapacityRange, MountAccess, VolumeCapability, VolumeRequest


@contextlib.contextmanager
def state_filesystem(fs_type: str, workdir: str) -> Iterator[str]:
    """A directory for one driver's state: on its own loop-mounted filesystem unless fs_type is "none"."""
    os.makedirs(workdir, exist_ok=True)
    if fs_type == "none":
        yield workdir
        return
    with loop_mounted_fs(workdir, fs_type, size_mb=2048) as mnt:
        yield mnt


def measure_pairs(client: Client, pairs: int, tag: str, pid: int) -> dict[str, float]:
    """Send `pairs` CreateVolume+DeleteVolume pairs one after the other.

    Returns the elapsed seconds, the driver's CPU seconds and the pair count
    ("elapsed", "cpu", "pairs") and each pair's latency under "lat<i>".
    """
    out: dict[str, float] = {"pairs": pairs}
    cpu0 = process_cpu_seconds(pid)
    start = time.perf_counter()
    for i in range(pairs):
        t0 = time.perf_counter()
        volume_id = client.create_volume(f"pair-{tag}-{i}")
        client.delete_volume(volume_id)
        out[f"lat{i}"] = time.perf_counter() - t0
    out["elapsed"] = time.perf_counter() - start
    out["cpu"] = process_cpu_seconds(pid) - cpu0
    out["rate"] = pairs / out["elapsed"]
    return out


def combine(blocks: list[dict[str, float]]) -> dict[str, float]:
    """Rate over all blocks (pairs / time spent in them), latency percentiles, CPU per pair."""
    pairs = sum(b["pairs"] for b in blocks)
    elapsed = sum(b["elapsed"] for b in blocks)
    lat = sorted(v for b in blocks for k, v in b.items() if k.startswith("lat"))
    return {
        "rate": pairs / elapsed,
        "elapsed": elapsed,
        "p50": statistics.median(lat),
        "p90": lat[int(0.9 * (len(lat) - 1))],
        "p99": lat[int(0.99 * (len(lat) - 1))],
        "cpu_per_pair": sum(b["cpu"] for b in blocks) / pairs,
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


async def _fill_direct(state_dir: str, count: int, concurrency: int) -> None:
    driver = Driver(
        DriverConfig(state_dir=state_dir, durability="process", endpoints=(f"unix://{state_dir}/fill.sock",))
    )
    capability = VolumeCapability("mount", int(AccessMode.SINGLE_NODE_WRITER), MountAccess())
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        request = VolumeRequest(f"existing-{i:06d}", 0, CapacityRange(1 << 30, 0), (capability,))
        async with gate:
            await driver.engine.create_volume(request)

    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await driver.stop()


def fill_direct(state_dir: str, count: int, concurrency: int) -> float:
    """Create `count` volumes through an in-process engine whose store commits without fsync.

    Only the fill runs this way (``durability="process"``): the measured
    driver is then started on the same state directory with its defaults,
    and its start-up reconciliation sees the 10,000 volumes as any restart
    would.  Returns the seconds taken.
    """
    start = time.perf_counter()
    asyncio.run(_fill_direct(state_dir, count, concurrency))
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=300, help="pairs measured at each volume count")
    parser.add_argument("--blocks", type=int, default=15, help="alternating blocks the pairs are split into")
    parser.add_argument("--existing", type=int, default=10_000, help="volumes present for the second run")
    parser.add_argument("--fill-threads", type=int, default=16)
    parser.add_argument(
        "--fill",
        choices=["grpc", "direct"],
        default="direct",
        help="grpc: over the measured driver's socket (store fsyncs every commit); "
        "direct: in-process engine with durability=process, before the measured driver starts",
    )
    parser.add_argument(
        "--fs", choices=["xfs", "ext4", "none"], default="xfs", help="filesystem of the state dirs"
    )
    args = parser.parse_args()
    if args.fs != "none" and os.geteuid() != 0:
        print("create_delete: --fs xfs/ext4 needs root (use --fs none otherwise)", file=sys.stderr)
        return 2
    header("CreateVolume+DeleteVolume pairs per second")
    per_block = max(1, args.pairs // args.blocks)
    workdir = tempfile.mkdtemp(prefix="csi-kit-bench-cd-")
    try:
        with contextlib.ExitStack() as stack:
            drivers: dict[str, tuple[Client, int]] = {}
            state_dirs: dict[str, str] = {}
            for label in ("empty", "full"):
                base = stack.enter_context(state_filesystem(args.fs, os.path.join(workdir, label)))
                state_dir = state_dirs[label] = os.path.join(base, "state")
                if label == "full" and args.fill == "direct":
                    took = fill_direct(state_dir, args.existing, args.fill_threads)
                    print(
                        f"   created {args.existing} volumes for 'full' in {took:.1f} s "
                        f"({args.existing / took:.0f}/s; in-process engine, "
                        "durability=process for the fill only)"
                    )
                proc = stack.enter_context(driver_process(state_dir))
                assert proc.proc is not None
                drivers[label] = (stack.enter_context(Client(proc.endpoint)), proc.proc.pid)
                print(f"   {label}: driver pid {proc.proc.pid}, state dir {state_dir} ({args.fs})")
            print("   both drivers run with their defaults (--durability power)")
            full_client = drivers["full"][0]
            if args.fill == "grpc":
                took = fill(full_client.endpoint, args.existing, args.fill_threads)
                print(
                    f"   created {args.existing} volumes in the 'full' driver in {took:.1f} s "
                    f"({args.existing / took:.0f}/s from {args.fill_threads} threads over gRPC)"
                )
            sys.stdout.flush()
            for label, (client, pid) in drivers.items():
                measure_pairs(client, 20, f"warmup-{label}", pid)
            # Alternate blocks between the two drivers so that a change in the
            # load of a shared machine falls on both figures alike.
            blocks: dict[str, list[dict[str, float]]] = {"empty": [], "full": []}
            for b in range(args.blocks):
                for label, (client, pid) in drivers.items():
                    blocks[label].append(measure_pairs(client, per_block, f"{label}-{b}", pid))
            results = {label: combine(rs) for label, rs in blocks.items()}
            report("with 0 existing volumes", results["empty"], per_block * args.blocks)
            report(f"with {args.existing} existing volumes", results["full"], per_block * args.blocks)
            for label in blocks:
                rates = " ".join(f"{r['rate']:.0f}" for r in blocks[label])
                print(f"   per-block rates ({label}): {rates}")
            # Each full block ran right after its empty block: their ratio is
            # measured under (nearly) the same load.
            pairs_of_blocks = zip(blocks["empty"], blocks["full"], strict=True)
            paired = sorted(f["rate"] / e["rate"] for e, f in pairs_of_blocks)
            quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
            for label, state_dir in state_dirs.items():
                count = len(os.listdir(os.path.join(state_dir, "hostpath", "volumes")))
                print(f"   volume directories now in '{label}': {count}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    empty, full = results["empty"], results["full"]
    ratio = full["rate"] / empty["rate"]
    verdict = "meets" if ratio >= 0.8 else "MISSES"
    print(
        f"   RESULT: {empty['rate']:.1f} pairs/s with 0, {full['rate']:.1f} pairs/s with {args.existing}: "
        f"ratio {ratio:.2f} (target >= 0.80: {verdict}); median of the {len(paired)} paired block ratios "
        f"{statistics.median(paired):.2f} (quartiles {quartiles[0]:.2f}..{quartiles[2]:.2f}); "
        f"driver CPU per pair {empty['cpu_per_pair'] * 1000:.1f} vs {full['cpu_per_pair'] * 1000:.1f} ms"
    )
    print(f"   load average now {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
