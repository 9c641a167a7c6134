"""Shared pieces of the benchmarks: a plain synchronous CSI client and tree checksums.

The benchmarks talk to a real driver over its unix socket with the generated
stubs, exactly as a sidecar would; nothing here reaches into the driver.
They are scripts that print figures, never tests: a missed target is
reported, not failed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pb_grpc

__all__ = [
    "Client",
    "children_cpu_seconds",
    "header",
    "load_average",
    "serve_loopfile",
    "mount_capability",
    "percentile",
    "pin_process",
    "process_cpu_seconds",
    "rss_mib",
    "timed",
    "tree_digest",
    "write_random_tree",
]

MiB = 1024 * 1024


def mount_capability() -> pb.VolumeCapability:
    """A filesystem volume, single-node writer: what a hostPath PVC asks for."""
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
    )


class Client:
    """A blocking CSI controller client on one channel (one HTTP/2 connection)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.channel = grpc.insecure_channel(endpoint)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.controller = pb_grpc.ControllerStub(self.channel)  # type: ignore[no-untyped-call]
        self.identity = pb_grpc.IdentityStub(self.channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_volume(self, name: str, capacity: int = 1 << 30, snapshot_id: str = "") -> str:
        req = pb.CreateVolumeRequest(
            name=name,
            capacity_range=pb.CapacityRange(required_bytes=capacity),
            volume_capabilities=[mount_capability()],
        )
        if snapshot_id:
            req.volume_content_source.snapshot.snapshot_id = snapshot_id
        return str(self.controller.CreateVolume(req, timeout=300).volume.volume_id)

    def delete_volume(self, volume_id: str) -> None:
        self.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=300)

    def create_snapshot(self, name: str, source_volume_id: str) -> str:
        req = pb.CreateSnapshotRequest(name=name, source_volume_id=source_volume_id)
        snap = self.controller.CreateSnapshot(req, timeout=300).snapshot
        if not snap.ready_to_use:
            raise RuntimeError(f"snapshot {snap.snapshot_id} is not ready_to_use")
        return str(snap.snapshot_id)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=300)


@contextmanager
def timed(into: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall time of the block in ``into[key]`` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        into[key] = time.perf_counter() - start


def write_random_tree(directory: str, total_bytes: int, files: int = 4) -> None:
    """Fill `directory` with `files` files of random data (half of them in a subdirectory), fsynced."""
    sub = os.path.join(directory, "data")
    os.makedirs(sub, exist_ok=True)
    per_file = total_bytes // files
    for i in range(files):
        path = os.path.join(sub if i % 2 else directory, f"file-{i}.bin")
        with open(path, "wb") as f:
            left = per_file
            while left:
                n = min(left, 16 * MiB)
                f.write(os.urandom(n))
                left -= n
            f.flush()
            os.fsync(f.fileno())


def tree_digest(directory: str) -> str:
    """sha256 over every relative path, file type, mode and file content, in a fixed order."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, directory)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            h.update(f"{os.path.join(rel_dir, name)}\0{st.st_mode:o}\0{st.st_size}\0".encode())
            with open(path, "rb") as f:
                while chunk := f.read(4 * MiB):
                    h.update(chunk)
    return h.hexdigest()


def process_cpu_seconds(pid: int) -> float:
    """user+system CPU time of a process, all its threads (``/proc/PID/stat`` utime + stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """user+system CPU time of every finished (waited-for) descendant of this process."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def rss_mib(pid: int) -> float:
    """VmRSS of a process in MiB (``/proc/PID/status``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pin_process(pid: int, cpu: int | None) -> None:
    """Keep every thread of ``pid`` on one CPU (threads it makes later inherit it); None: leave it.

    What an exclusive CPU (``taskset -c``, or Kubernetes' static CPU manager
    for a Guaranteed pod with a whole CPU) gives a driver: its threads hand
    work to each other on one CPU instead of waking one another across CPUs.
    """
    if cpu is None:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of an already sorted list, nearest rank."""
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def header(title: str) -> None:
    """Print what ran where: figures are only comparable with their machine."""
    print(f"== {title}")
    print(
        f"   {platform.node()}  {platform.platform()}  python {platform.python_version()}  "
        f"cpus {os.cpu_count()}  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
    )
    print(f"   load average {load_average()} (the machine may be shared: figures are wall-clock)")
    sys.stdout.flush()


@contextmanager
def serve_loopfile(mode: str, state: str, root: str) -> Iterator[str]:
    """A loopfile driver on `root`: in a child process ("process", as a sidecar sees it) or in
    this one ("inline"); yields its endpoint."""
    from csi_kit.testing.driver import driver_process, running_driver

    kw: dict[str, Any] = {
        "backend": "loopfile",
        "backend_options": {"root": root},
        "driver_name": "loopfile.csi-kit.io",
    }
    if mode == "process":
        with driver_process(state, **kw) as proc:
            yield proc.endpoint
    else:
        with running_driver(state, socket_path=os.path.join(state, "csi.sock"), **kw) as endpoint:
            yield endpoint
