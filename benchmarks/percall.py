"""Per-call cost of a hostPath driver: Probe, CreateVolume+DeleteVolume pairs, ControllerExpandVolume.

One blocking Python client (the generated stubs, one channel) talks to a
``csi-kit serve`` child process over its unix socket, as a sidecar does.
Every figure is printed with the load average at the time and the driver's
resident memory, because the machine may be shared.

* **Probe**: the driver against a bare ``grpc.aio`` server (a child process
  whose only method answers the same ProbeResponse), in alternating blocks in
  the same run; the difference of the medians is what csi_kit adds.
* **Pairs**: CreateVolume then DeleteVolume, one pair at a time, with the
  state directory on tmpfs (``/dev/shm``: what the engine costs without the
  disk) and on a real disk (``--disk-dir``, default ``/var/tmp``), at each
  ``--durability`` asked for.  On the disk, the benchmark first measures
  the latency of ``fdatasync`` after a 4 KiB write on the same filesystem,
  and prints the issue's floor for the pair beside it: 2 x that + 1 ms.
* **Expand**: ControllerExpandVolume of one volume, 1 MiB more each call.

Targets (issue 12) are printed beside the figures; a missed one is reported,
never failed.  No root needed.  Run::

    .venv/bin/python benchmarks/percall.py [--probes 5000] [--pairs 2000] [--disk-pairs 500]
        [--expands 2000] [--durability power process] [--disk-dir /var/tmp] [--pin CPU]

``--pin CPU`` keeps every thread of the servers (the driver, the bare
server) on one CPU, as an exclusive CPU does in production: a call hands
work from the gRPC poller to the event loop to a worker thread and back,
and on a VM each wake-up across CPUs costs 0.1-0.3 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from _bench import Client, header, load_average, percentile, pin_process, rss_mib

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pb_grpc
from csi_kit.testing.driver import driver_process, wait_for_socket

MiB = 1 << 20


# -- a bare grpc.aio server, the reference for Probe -------------------------------------------


class _BareIdentity(pb_grpc.IdentityServicer):
    async def Probe(self, request: pb.ProbeRequest, context: object) -> pb.ProbeResponse:
        resp = pb.ProbeResponse()
        resp.ready.value = True
        return resp


async def _serve_bare(sock: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_IdentityServicer_to_server(_BareIdentity(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    await server.wait_for_termination()


@contextmanager
def bare_server(workdir: str) -> Iterator[tuple[str, int]]:
    """A child process serving only Probe with grpc.aio; yields (endpoint, pid)."""
    sock = os.path.join(workdir, "bare.sock")
    proc = subprocess.Popen([sys.executable, __file__, "--bare-server", sock])
    try:
        wait_for_socket(sock, alive=lambda: proc.poll() is None)
        pin_process(proc.pid, PIN)
        yield f"unix://{sock}", proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


# -- measurements --------------------------------------------------------------------------------


def probe_latencies(client: Client, count: int) -> list[float]:
    request = pb.ProbeRequest()
    out = []
    for _ in range(count):
        start = time.perf_counter()
        client.identity.Probe(request, timeout=30)
        out.append(time.perf_counter() - start)
    return out


def pair_latencies(client: Client, count: int, tag: str) -> list[float]:
    out = []
    for i in range(count):
        start = time.perf_counter()
        client.delete_volume(client.create_volume(f"pair-{tag}-{i}"))
        out.append(time.perf_counter() - start)
    return out


def expand_latencies(client: Client, count: int, tag: str) -> list[float]:
    volume_id = client.create_volume(f"expand-{tag}", capacity=MiB)
    out = []
    for i in range(count):
        req = pb.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=(i + 2) * MiB)
        )
        start = time.perf_counter()
        client.controller.ControllerExpandVolume(req, timeout=30)
        out.append(time.perf_counter() - start)
    client.delete_volume(volume_id)
    return out


def fdatasync_ms(directory: str, count: int = 300) -> float:
    """Median latency of a 4 KiB write + fdatasync into an allocated file on ``directory``'s filesystem
    (what a WAL commit costs the disk: SQLite overwrites its WAL in place)."""
    path = os.path.join(directory, "fdatasync-probe")
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        block = os.urandom(4096)
        for i in range(256):
            os.pwrite(fd, block, i * 4096)
        os.fsync(fd)
        times = []
        for i in range(count):
            start = time.perf_counter()
            os.pwrite(fd, block, (i % 256) * 4096)
            os.fdatasync(fd)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000
    finally:
        os.close(fd)
        os.unlink(path)


def summary(lat: list[float]) -> str:
    s = sorted(lat)
    return (
        f"p50 {statistics.median(s) * 1000:.3f} ms  p90 {percentile(s, 0.9) * 1000:.3f} ms  "
        f"p99 {percentile(s, 0.99) * 1000:.3f} ms"
    )


def context(pid: int) -> str:
    return f"[load {load_average()}; driver RSS {rss_mib(pid):.1f} MiB]"


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


#: ``--pin``: the CPU every server's threads are kept on (None: the scheduler's choice).
PIN: int | None = None


@contextmanager
def driver(state_dir: str, durability: str) -> Iterator[tuple[Client, int]]:
    with driver_process(state_dir, extra_args=["--durability", durability]) as proc:
        assert proc.proc is not None
        pin_process(proc.proc.pid, PIN)
        with Client(proc.endpoint) as client:
            yield client, proc.proc.pid


# -- sections ------------------------------------------------------------------------------------


def probe_section(workdir: str, probes: int, blocks: int) -> None:
    print("-- Probe: csi_kit hostPath (state on tmpfs) vs a bare grpc.aio server, alternating blocks")
    per_block = max(1, probes // blocks)
    state = tempfile.mkdtemp(dir="/dev/shm", prefix="csi-kit-bench-probe-")
    try:
        with (
            driver(state, "power") as (ours, pid),
            bare_server(workdir) as (bare_ep, bare_pid),
            Client(bare_ep) as bare,
        ):
            probe_latencies(ours, 300)
            probe_latencies(bare, 300)
            lat: dict[str, list[float]] = {"csi_kit": [], "bare": []}
            diffs = []
            for _ in range(blocks):
                a = probe_latencies(bare, per_block)
                b = probe_latencies(ours, per_block)
                lat["bare"] += a
                lat["csi_kit"] += b
                diffs.append(statistics.median(b) - statistics.median(a))
            p50 = {k: statistics.median(v) * 1000 for k, v in lat.items()}
            over = p50["csi_kit"] - p50["bare"]
            print(f"   bare grpc.aio   {summary(lat['bare'])}  [server RSS {rss_mib(bare_pid):.1f} MiB]")
            print(f"   csi_kit         {summary(lat['csi_kit'])}  {context(pid)}")
            print(
                f"   RESULT Probe p50 {p50['csi_kit']:.3f} ms "
                f"(target <= 0.30: {verdict(p50['csi_kit'] <= 0.3)}); "
                f"overhead over bare grpc.aio {over:.3f} ms (median of {blocks} block differences "
                f"{statistics.median(diffs) * 1000:.3f} ms; target <= 0.05: {verdict(over <= 0.05)})"
            )
    finally:
        shutil.rmtree(state, ignore_errors=True)
    sys.stdout.flush()


def pairs_section(where: str, base: str, durability: str, pairs: int, floor_ms: float | None) -> None:
    state = tempfile.mkdtemp(dir=base, prefix="csi-kit-bench-pairs-")
    try:
        with driver(state, durability) as (client, pid):
            pair_latencies(client, min(100, pairs), "warmup")
            start = time.perf_counter()
            lat = pair_latencies(client, pairs, "m")
            rate = pairs / (time.perf_counter() - start)
            p50 = statistics.median(lat) * 1000
            print(
                f"   {where}, --durability {durability}: {rate:.0f} pairs/s  {summary(lat)}  {context(pid)}"
            )
            if where == "tmpfs" and durability == "power":
                print(
                    f"   RESULT tmpfs pairs {rate:.0f}/s (target >= 600: {verdict(rate >= 600)}), "
                    f"p50 {p50:.2f} ms (target <= 1.6: {verdict(p50 <= 1.6)})"
                )
            if floor_ms is not None and durability == "power":
                print(
                    f"   RESULT disk pair p50 {p50:.2f} ms against 2 x fdatasync + 1 ms = {floor_ms:.2f} ms "
                    f"({verdict(p50 <= floor_ms)})"
                )
    finally:
        shutil.rmtree(state, ignore_errors=True)
    sys.stdout.flush()


def expand_section(where: str, base: str, durability: str, expands: int) -> None:
    state = tempfile.mkdtemp(dir=base, prefix="csi-kit-bench-expand-")
    try:
        with driver(state, durability) as (client, pid):
            expand_latencies(client, min(100, expands), "warmup")
            lat = expand_latencies(client, expands, "m")
            p50 = statistics.median(lat) * 1000
            print(
                f"   ControllerExpandVolume, {where}, --durability {durability}: "
                f"{summary(lat)}  {context(pid)}"
            )
            if where == "tmpfs" and durability == "power":
                print(f"   RESULT expand p50 {p50:.3f} ms (target <= 0.6: {verdict(p50 <= 0.6)})")
    finally:
        shutil.rmtree(state, ignore_errors=True)
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", type=int, default=5000, help="Probe calls per server")
    parser.add_argument("--probe-blocks", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=2000, help="pairs per tmpfs run")
    parser.add_argument("--disk-pairs", type=int, default=500, help="pairs per disk run")
    parser.add_argument("--expands", type=int, default=2000)
    parser.add_argument("--durability", nargs="+", default=["power", "process"], choices=["power", "process"])
    parser.add_argument("--disk-dir", default="/var/tmp", help="a directory on a real disk")
    parser.add_argument(
        "--only", nargs="+", default=["probe", "pairs", "expand"], choices=["probe", "pairs", "expand"]
    )
    parser.add_argument(
        "--pin", type=int, default=None, metavar="CPU", help="keep every server thread on this CPU"
    )
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        asyncio.run(_serve_bare(args.bare_server))
        return 0
    global PIN
    PIN = args.pin
    header("per-call cost: Probe, CreateVolume+DeleteVolume, ControllerExpandVolume")
    if PIN is not None:
        print(
            f"   every server thread kept on CPU {PIN} (--pin; the client runs where the scheduler puts it)"
        )
    workdir = tempfile.mkdtemp(prefix="csi-kit-bench-percall-")
    try:
        if "probe" in args.only:
            probe_section(workdir, args.probes, args.probe_blocks)
        if "pairs" in args.only:
            print("-- CreateVolume+DeleteVolume pairs, one client, one pair at a time")
            for durability in args.durability:
                pairs_section("tmpfs", "/dev/shm", durability, args.pairs, None)
            disk = tempfile.mkdtemp(dir=args.disk_dir, prefix="csi-kit-bench-disk-")
            try:
                sync_ms = fdatasync_ms(disk)
                floor = 2 * sync_ms + 1
                print(
                    f"   {args.disk_dir} ({_fs_type(disk)}): 4 KiB write + fdatasync median {sync_ms:.3f} ms "
                    f"-> floor for a pair 2 x {sync_ms:.3f} + 1 = {floor:.2f} ms  [load {load_average()}]"
                )
                for durability in args.durability:
                    pairs_section("disk", disk, durability, args.disk_pairs, floor)
            finally:
                shutil.rmtree(disk, ignore_errors=True)
        if "expand" in args.only:
            print("-- ControllerExpandVolume loop, one client")
            for durability in args.durability:
                expand_section("tmpfs", "/dev/shm", durability, args.expands)
            disk = tempfile.mkdtemp(dir=args.disk_dir, prefix="csi-kit-bench-disk-")
            try:
                for durability in args.durability:
                    expand_section("disk", disk, durability, max(100, args.expands // 4))
            finally:
                shutil.rmtree(disk, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"   load average now {load_average()}")
    return 0


def _fs_type(path: str) -> str:
    """The filesystem type holding ``path`` (longest mount point prefix in /proc/self/mounts)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


if __name__ == "__main__":
    sys.exit(main())
