"""Loopfile snapshot + restore against a full ``cp``, and stage/unstage times.

Issue #4's figures:

* Snapshot + restore of a 1 GiB volume holding 512 MiB of written data, the
  root on XFS with reflink: at least 100x faster than a full
  ``cp --sparse=always`` of the image in the same run, and independent of
  the data size (256 MiB vs 1 GiB of data are reported too; the volume is
  made big enough to hold the data: 1 GiB, or 1.5 GiB for 1 GiB of data).
* Attach + format + mount (NodeStage) and unmount + detach (NodeUnstage).

The run: a fresh loop-mounted XFS (reflink=1) image as the driver's root; a
loopfile driver serving it over gRPC (a ``csi-kit serve`` child by default,
as a sidecar sees it; ``--driver thread`` serves from this process).  Per
data size an ext4 volume is created, staged and published, filled with
random data (fsynced) through the published mount; once its device is idle:

1. FIFREEZE+FITHAW of the mounted volume alone, 0.2 s apart: the kernel's
   share of a staged snapshot (a freeze waits for an RCU grace period
   unless another freeze happened a moment before);
2. ``--rounds`` pairs CreateSnapshot + CreateVolume(from the snapshot) of
   the staged, published volume, back to back (each snapshot freezes and
   thaws it); the first restored volume is staged and its data checked by
   sha256;
3. the volume unpublished and unstaged (its pod is gone, the data stays):
   the same number of pairs, which need no freeze;
4. the unstaged pair on the backend object alone (no gRPC, no store);
5. ``--rounds`` ``cp --sparse=always --reflink=never`` of the image plus
   ``sync -f`` (the driver's copy is durable when acknowledged; coreutils'
   cp would reflink by default, hence ``--reflink=never``: the issue's
   figure is a *full* copy).  Page caches are hot for both sides.

Needs root.  Run::

    sudo .venv/bin/python benchmarks/loopfile_snapshot.py [--data 256 512 1024] [--rounds 3] \
        [--driver process|thread] [--state-parent DIR]

Exits non-zero only on an error (including a checksum mismatch), never on a
missed target.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

import grpc
from _bench import MiB, header, load_average, serve_loopfile

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pb_grpc
from csi_kit.backend import BackendContext
from csi_kit.linux import fs, loop
from csi_kit.linux.run import run
from csi_kit.testing.fsimage import loop_mounted_fs
from csi_kit.types import CapacityRange, MountAccess, Snapshot, Volume, VolumeCapability, VolumeRequest
from csi_kit_backends.loopfile.backend import LoopfileBackend, LoopfileConfig

TARGET = 100.0
GiB = 1024 * MiB
Mode = pb.VolumeCapability.AccessMode


def capability(fs_type: str = "ext4") -> Any:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)
    )


class Node:
    """Controller and node calls against one driver; paths under `work`."""

    def __init__(self, endpoint: str, work: str) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.controller = pb_grpc.ControllerStub(self.channel)  # type: ignore[no-untyped-call]
        self.node = pb_grpc.NodeStub(self.channel)  # type: ignore[no-untyped-call]
        self.work = work

    def create(self, size: int, snapshot_id: str = "", fs_type: str = "ext4") -> str:
        req = pb.CreateVolumeRequest(
            name=f"bench-{uuid.uuid4().hex[:12]}",
            capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[capability(fs_type)],
        )
        if snapshot_id:
            req.volume_content_source.snapshot.snapshot_id = snapshot_id
        return str(self.controller.CreateVolume(req, timeout=600).volume.volume_id)

    def delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=600)

    def snapshot(self, volume_id: str) -> str:
        req = pb.CreateSnapshotRequest(name=f"bench-{uuid.uuid4().hex[:12]}", source_volume_id=volume_id)
        return str(self.controller.CreateSnapshot(req, timeout=600).snapshot.snapshot_id)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=600)

    def paths(self, volume_id: str) -> tuple[str, str]:
        staging = os.path.join(self.work, f"s-{volume_id}")
        os.makedirs(staging, exist_ok=True)
        return staging, os.path.join(self.work, f"t-{volume_id}")

    def stage(self, volume_id: str, fs_type: str = "ext4") -> str:
        staging, _ = self.paths(volume_id)
        self.node.NodeStageVolume(
            pb.NodeStageVolumeRequest(
                volume_id=volume_id, staging_target_path=staging, volume_capability=capability(fs_type)
            ),
            timeout=600,
        )
        return staging

    def publish(self, volume_id: str) -> str:
        staging, target = self.paths(volume_id)
        self.node.NodePublishVolume(
            pb.NodePublishVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                target_path=target,
                volume_capability=capability(),
            ),
            timeout=600,
        )
        return target

    def unpublish(self, volume_id: str) -> None:
        _, target = self.paths(volume_id)
        self.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), timeout=600
        )

    def unstage(self, volume_id: str) -> None:
        staging, _ = self.paths(volume_id)
        self.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging), timeout=600
        )


def write_data(path: str, total: int) -> str:
    """Write `total` random bytes to one file, fsynced; return their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = total
        while left:
            chunk = os.urandom(min(left, 16 * MiB))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def timed_pairs(
    n: Node, vol: str, size: int, rounds: int, made: list[tuple[str, str]]
) -> tuple[list[float], list[float]]:
    """`rounds` CreateSnapshot + CreateVolume(from it) pairs, back to back; their times."""
    snaps, restores = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        snap = n.snapshot(vol)
        t1 = time.perf_counter()
        restored = n.create(size, snapshot_id=snap)
        t2 = time.perf_counter()
        snaps.append(t1 - t0)
        restores.append(t2 - t1)
        made.append((snap, restored))
    return snaps, restores


def freeze_cost(mount_point: str, rounds: int, pause: float = 0.2) -> list[float]:
    """FIFREEZE + FITHAW of the idle mounted volume, `pause` s apart: the kernel's share of a
    staged snapshot (freezing waits for an RCU grace period unless a freeze happened just before)."""
    times = []
    for _ in range(rounds):
        time.sleep(pause)
        t0 = time.perf_counter()
        with fs.frozen(mount_point):
            pass
        times.append(time.perf_counter() - t0)
    return times


def report_pairs(label: str, snaps: list[float], restores: list[float], cp_s: float) -> dict[str, float]:
    med = statistics.median
    pair = med(snaps) + med(restores)
    best = min(a + b for a, b in zip(snaps, restores, strict=True))
    each = ", ".join(f"{(a + b) * 1000:.1f}" for a, b in zip(snaps, restores, strict=True))
    print(
        f"   {label}: snapshot {med(snaps) * 1000:.1f} ms + restore {med(restores) * 1000:.1f} ms "
        f"= {pair * 1000:.1f} ms (median) -> {cp_s / pair:.0f}x cp (target {TARGET:.0f}x); "
        f"best {best * 1000:.1f} ms"
    )
    print(f"      all rounds: {each} ms")
    return {"pair": pair, "best": best}


def bench_data_size(n: Node, root: str, data_mib: int, rounds: int) -> dict[str, float]:
    size = GiB if data_mib <= 768 else GiB + GiB // 2
    print(f"\n-- {data_mib} MiB of random data in a {size // MiB} MiB ext4 volume, {rounds} round(s)")
    vol = n.create(size)
    image = os.path.join(root, "volumes", f"{vol}.img")
    staging = n.stage(vol)
    target = n.publish(vol)
    t0 = time.perf_counter()
    digest = write_data(os.path.join(target, "data.bin"), data_mib * MiB)
    print(f"   wrote {data_mib} MiB through the published mount in {time.perf_counter() - t0:.2f} s")
    st = os.stat(image)
    print(f"   image: {st.st_size // MiB} MiB apparent, {st.st_blocks * 512 // MiB} MiB allocated")
    waited = wait_idle(image)
    print(f"   volume idle after {waited:.1f} s more (ext4 zeroes inode tables in the background after mkfs)")
    made: list[tuple[str, str]] = []
    published = True
    try:
        freezes = freeze_cost(staging, rounds)
        # Staged and published, as in production: every snapshot freezes and thaws the filesystem.
        staged = timed_pairs(n, vol, size, rounds, made)
        # The restored data is exactly what was written (checked once: reading is not what is timed).
        check = made[0][1]
        n.stage(check)
        got = file_digest(os.path.join(n.paths(check)[0], "data.bin"))
        n.unstage(check)
        if got != digest:
            raise RuntimeError(f"restored volume {check}: sha256 {got} != written {digest}")
        print("   restored data verified (sha256)")
        # Not attached (the pod is gone, the data stays): no freeze.
        n.unpublish(vol)
        n.unstage(vol)
        published = False
        unstaged = timed_pairs(n, vol, size, rounds, made)
        direct = [backend_only(root, vol, size, i) for i in range(rounds)]
        cps: list[float] = []
        for i in range(rounds):
            dest = os.path.join(root, f"cp-{i}.img")
            t0 = time.perf_counter()
            run(["cp", "--sparse=always", "--reflink=never", image, dest], timeout=1200)
            run(["sync", "-f", dest])
            cps.append(time.perf_counter() - t0)
            os.unlink(dest)
    finally:
        for snap, restored in made:
            n.delete(restored)
            n.delete_snapshot(snap)
        if published:
            n.unpublish(vol)
            n.unstage(vol)
        n.delete(vol)
    cp_s = statistics.median(cps)
    print(
        f"   cp --sparse=always --reflink=never + sync -f: {cp_s:.2f} s (median); "
        f"all: {', '.join(f'{c:.2f}' for c in cps)} s"
    )
    print(
        "   FIFREEZE+FITHAW of the idle staged volume, 0.2 s apart: "
        f"{statistics.median(freezes) * 1000:.1f} ms "
        f"(median); all: {', '.join(f'{f * 1000:.1f}' for f in freezes)} ms"
    )
    s = report_pairs("staged (frozen) volume", *staged, cp_s)
    u = report_pairs("unstaged volume", *unstaged, cp_s)
    print(
        f"   the unstaged pair on the backend object alone (no gRPC, no store): "
        f"{statistics.median(direct) * 1000:.1f} ms (median), best {min(direct) * 1000:.1f} ms"
    )
    return {
        "data": float(data_mib),
        "cp": cp_s,
        "staged": s["pair"],
        "unstaged": u["pair"],
        "freeze": statistics.median(freezes),
    }


def backend_only(root: str, volume_id: str, size: int, index: int) -> float:
    """One snapshot+restore pair of the volume through a second backend object on the same
    root: the backend's own cost, without gRPC and the store's commits."""
    context = BackendContext("loopfile.csi-kit.io", "node-1", root)
    backend = LoopfileBackend(LoopfileConfig(root=root), context)
    backend.reflink = True  # what start() probed in the driver; start() itself is not run twice
    backend.ordered_log = True  # likewise: the root is XFS
    volume = Volume(volume_id, "bench", size)
    cap = VolumeCapability("mount", 1, MountAccess("ext4"))
    snap_id, vol_id = f"direct-snap-{index}", f"direct-vol-{index}"
    t0 = time.perf_counter()
    made = backend.create_snapshot(snap_id, volume, {})
    backend.restore_snapshot(
        vol_id,
        VolumeRequest("direct", size, CapacityRange(size), (cap,)),
        Snapshot(snap_id, "direct", volume_id, made.size_bytes, 0),
    )
    elapsed = time.perf_counter() - t0
    backend.delete_volume(vol_id)
    backend.delete_snapshot(snap_id)
    return elapsed


def wait_idle(image: str, quiet: float = 2.0, timeout: float = 180.0) -> float:
    """Wait until the loop device serving `image` has written nothing for `quiet` seconds.

    A freshly made ext4 is zeroing its inode tables (ext4lazyinit) for a
    while after the first mount; every freeze then waits for that I/O, which
    is mkfs's cost, not the snapshot's.  Timing starts on an idle volume.
    """
    device = loop.device_for(image)
    if device is None:
        raise RuntimeError(f"{image} is not attached")
    stat = f"/sys/block/{device.name}/stat"

    def written() -> int:
        with open(stat, encoding="ascii") as f:
            return int(f.read().split()[6])  # sectors written

    start = time.monotonic()
    last, since = written(), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{device.path} kept writing for {timeout:.0f} s")
        time.sleep(0.1)
        now = written()
        if now != last:
            last, since = now, time.monotonic()
    return time.monotonic() - start - quiet


def fsync_latency(directory: str, samples: int = 9) -> float:
    """Median time of a 4 KiB write + fsync in `directory`: what each durable commit costs here."""
    path = os.path.join(directory, ".fsync-probe")
    times = []
    with open(path, "wb") as f:
        for _ in range(samples):
            t0 = time.perf_counter()
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t0)
    os.unlink(path)
    return statistics.median(times)


def bench_stage(n: Node, rounds: int) -> None:
    print(
        "\n-- stage (attach + format + mount) and unstage (unmount + detach), "
        f"1 GiB volumes, {rounds} round(s)"
    )
    for fs_type in ("ext4", "xfs"):
        first, again, unstage = [], [], []
        for _ in range(rounds):
            vol = n.create(GiB, fs_type=fs_type)
            try:
                t0 = time.perf_counter()
                n.stage(vol, fs_type)  # blank: attach + blkid + mkfs + mount
                t1 = time.perf_counter()
                n.unstage(vol)
                t2 = time.perf_counter()
                n.stage(vol, fs_type)  # formatted: attach + blkid + fsck + mount
                t3 = time.perf_counter()
                n.unstage(vol)
                first.append(t1 - t0)
                unstage.append(t2 - t1)
                again.append(t3 - t2)
            finally:
                n.delete(vol)
        med = statistics.median
        print(
            f"   {fs_type}: first stage (with mkfs) {med(first) * 1000:.0f} ms, "
            f"stage of a formatted volume {med(again) * 1000:.0f} ms, unstage {med(unstage) * 1000:.0f} ms "
            f"(medians of {rounds})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=int, nargs="+", default=[256, 512, 1024], help="MiB of data per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--driver", choices=("thread", "process"), default="process")
    parser.add_argument(
        "--state-parent",
        default=None,
        help="directory for the driver's state (its SQLite store) and the staging paths; "
        "e.g. /dev/shm to take the store's fsyncs out of the figures",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("loopfile_snapshot: needs root (loop devices and mounts)", file=sys.stderr)
        return 2
    for tool in ("mkfs.xfs", "mkfs.ext4", "cp", "sync"):
        if shutil.which(tool) is None:
            print(f"loopfile_snapshot: {tool} is not installed", file=sys.stderr)
            return 2
    header("loopfile snapshot+restore vs cp --sparse=always, and stage/unstage")
    results = []
    with tempfile.TemporaryDirectory(prefix="csi-kit-bench-lf-") as tmp:
        need = 4 * max(args.data) + 4096
        with loop_mounted_fs(tmp, "xfs", need, reflink=True) as mnt:
            root = os.path.join(mnt, "root")
            work = tempfile.mkdtemp(prefix="csi-kit-bench-lf-state-", dir=args.state_parent or tmp)
            print(f"   root: XFS (reflink=1) on a {need} MiB loop-mounted image; driver in a {args.driver}")
            state_ms, root_ms = fsync_latency(work) * 1000, fsync_latency(mnt) * 1000
            print(
                f"   fsync latency (4 KiB write + fsync, median of 9): state dir {state_ms:.1f} ms, "
                f"root {root_ms:.1f} ms"
            )
            # The driver refuses node paths inside its own state directory: keep them apart.
            state, node_paths = os.path.join(work, "state"), os.path.join(work, "node")
            os.makedirs(state)
            os.makedirs(node_paths)
            with serve_loopfile(args.driver, state, root) as endpoint:
                n = Node(endpoint, node_paths)
                for mib in args.data:
                    results.append(bench_data_size(n, root, mib, args.rounds))
                bench_stage(n, args.rounds)
            shutil.rmtree(work, ignore_errors=True)
    print("\nsummary (medians; a pair is CreateSnapshot + CreateVolume from that snapshot, over gRPC):")
    for r in results:
        print(
            f"   {r['data']:.0f} MiB of data: cp {r['cp']:.2f} s; "
            f"unstaged pair {r['unstaged'] * 1000:.1f} ms "
            f"= {r['cp'] / r['unstaged']:.0f}x; staged pair {r['staged'] * 1000:.1f} ms = "
            f"{r['cp'] / r['staged']:.0f}x, of which freeze+thaw ~{r['freeze'] * 1000:.0f} ms"
        )
    if len(results) > 1:
        for key in ("unstaged", "staged"):
            pairs = [r[key] for r in results]
            print(f"   {key} pair across data sizes: {min(pairs) * 1000:.1f}-{max(pairs) * 1000:.1f} ms")
    print(f"   load average now {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
