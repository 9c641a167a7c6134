"""GetMetadataDelta throughput on a 1 GiB loopfile volume with 10% changed blocks,
beside the time of a full read of the volume (issue #14's figure).

The run, per root filesystem (``--roots xfs ext4`` by default):

1. a fresh loop-mounted filesystem as the driver's root -- XFS with
   reflink=1 (snapshots share extents: the delta compares FIEMAP mappings
   and reads no data) or ext4 (snapshots are copies: the delta compares the
   two images block by block);
2. a loopfile driver serving it over gRPC (a ``csi-kit serve`` child by
   default, as a backup tool's sidecar sees it);
3. a 1 GiB raw block volume, staged and published; every byte written with
   random data through the published device; snapshot A;
4. 10% of its 4 KiB blocks (26 214, chosen at random, seed fixed)
   rewritten with new random data; snapshot B;
5. ``--rounds`` GetMetadataDelta(A, B) streams read to the end, each
   checked to name every rewritten block, the images' page caches dropped
   first as for the read below; the ranges, messages and time;
6. ``--rounds`` full reads of snapshot B's image, 1 MiB at a time, its page
   cache and that of the root's own image file dropped first
   (POSIX_FADV_DONTNEED): what a backup without changed-block tracking
   would read.

Needs root.  Run::

    sudo .venv/bin/python benchmarks/snapshot_metadata.py [--roots xfs ext4] [--rounds 3] \
        [--driver process|thread]

Exits non-zero only on an error (a delta that misses a changed block is
one), never on a slow figure.
"""

from __future__ import annotations

import argparse
import os
import random
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
from csi_kit.testing.fsimage import loop_mounted_fs

GiB = 1024 * MiB
BLOCK = 4096
Mode = pb.VolumeCapability.AccessMode


def block_capability() -> Any:
    return pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)
    )


class Driver:
    """The calls the benchmark makes, on one channel; node paths under `work`."""

    def __init__(self, endpoint: str, work: str) -> None:
        self.channel = grpc.insecure_channel(
            endpoint, options=[("grpc.max_receive_message_length", 64 * MiB)]
        )
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.controller = pb_grpc.ControllerStub(self.channel)  # type: ignore[no-untyped-call]
        self.node = pb_grpc.NodeStub(self.channel)  # type: ignore[no-untyped-call]
        self.meta = pb_grpc.SnapshotMetadataStub(self.channel)  # type: ignore[no-untyped-call]
        self.work = work

    def create(self, size: int) -> str:
        req = pb.CreateVolumeRequest(
            name=f"bench-{uuid.uuid4().hex[:12]}",
            capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[block_capability()],
        )
        return str(self.controller.CreateVolume(req, timeout=600).volume.volume_id)

    def snapshot(self, volume_id: str) -> str:
        req = pb.CreateSnapshotRequest(name=f"bench-{uuid.uuid4().hex[:12]}", source_volume_id=volume_id)
        return str(self.controller.CreateSnapshot(req, timeout=600).snapshot.snapshot_id)

    def publish(self, volume_id: str) -> tuple[str, str]:
        staging = tempfile.mkdtemp(prefix="s-", dir=self.work)
        target = os.path.join(self.work, f"t-{volume_id}")
        cap = block_capability()
        self.node.NodeStageVolume(
            pb.NodeStageVolumeRequest(
                volume_id=volume_id, staging_target_path=staging, volume_capability=cap
            ),
            timeout=600,
        )
        self.node.NodePublishVolume(
            pb.NodePublishVolumeRequest(
                volume_id=volume_id, staging_target_path=staging, target_path=target, volume_capability=cap
            ),
            timeout=600,
        )
        return staging, target

    def unpublish(self, volume_id: str, staging: str, target: str) -> None:
        self.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), timeout=600
        )
        self.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging), timeout=600
        )

    def delete(self, volume_id: str, snapshots: list[str]) -> None:
        for snap in snapshots:
            self.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap), timeout=600)
        self.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=600)

    def delta(self, base: str, target: str) -> tuple[list[tuple[int, int]], int]:
        """Every range of GetMetadataDelta(base, target), and the number of messages."""
        req = pb.GetMetadataDeltaRequest(base_snapshot_id=base, target_snapshot_id=target)
        ranges: list[tuple[int, int]] = []
        messages = 0
        for resp in self.meta.GetMetadataDelta(req, timeout=600):
            messages += 1
            ranges.extend((b.byte_offset, b.size_bytes) for b in resp.block_metadata)
        return ranges, messages


def fill(device: str, size: int) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        for offset in range(0, size, 16 * MiB):
            os.pwrite(fd, os.urandom(16 * MiB), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite(device: str, blocks: list[int]) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        for block in blocks:
            os.pwrite(fd, os.urandom(BLOCK), block * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)


def covers_all(ranges: list[tuple[int, int]], blocks: list[int]) -> bool:
    """Whether every changed block lies inside one of the (ascending) ranges."""
    i = 0
    for block in sorted(blocks):
        lo = block * BLOCK
        while i < len(ranges) and ranges[i][0] + ranges[i][1] <= lo:
            i += 1
        if i == len(ranges) or ranges[i][0] > lo or ranges[i][0] + ranges[i][1] < lo + BLOCK:
            return False
    return True


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_read(path: str, below: list[str]) -> float:
    """Seconds to read the whole file, 1 MiB at a time, with its page cache and
    that of the files ``below`` it (the root filesystem's own image) dropped first."""
    for p in [path, *below]:
        drop_cache(p)
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        offset = 0
        while chunk := os.pread(fd, MiB, offset):
            offset += len(chunk)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def bench_root(fs_type: str, mode: str, rounds: int, share: float) -> dict[str, float]:
    size = GiB
    rng = random.Random(14)
    changed = rng.sample(range(size // BLOCK), int(size // BLOCK * share))
    with (
        tempfile.TemporaryDirectory(prefix="csi-kit-bench-sm-") as tmp,
        loop_mounted_fs(tmp, fs_type, 4096, reflink=True) as mnt,
    ):
        root = os.path.join(mnt, "root")
        state = tempfile.mkdtemp(prefix="state-", dir=tmp)
        work = tempfile.mkdtemp(prefix="w-", dir=tmp)  # staging and target paths: outside the state
        with serve_loopfile(mode, state, root) as endpoint:
            d = Driver(endpoint, work)
            vol = d.create(size)
            snaps: list[str] = []
            staging, target = d.publish(vol)
            try:
                t0 = time.perf_counter()
                fill(target, size)
                t1 = time.perf_counter()
                snaps.append(d.snapshot(vol))
                rewrite(target, changed)
                t2 = time.perf_counter()
                snaps.append(d.snapshot(vol))
                print(
                    f"   filled {size // MiB} MiB in {t1 - t0:.1f} s; rewrote {len(changed)} random "
                    f"4 KiB blocks ({share:.0%}) in {t2 - t1:.1f} s"
                )
                # The root is a loop-mounted image: its cache holds the data too.
                below = [os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".img")]
                images = [os.path.join(root, "snapshots", f"{s}.img") for s in snaps]
                deltas, messages = [], 0
                ranges: list[tuple[int, int]] = []
                for _ in range(rounds):
                    for p in [*images, *below]:
                        drop_cache(p)  # cold, like the read below: a content compare reads both images
                    t0 = time.perf_counter()
                    ranges, messages = d.delta(snaps[0], snaps[1])
                    deltas.append(time.perf_counter() - t0)
                    if not covers_all(ranges, changed):
                        raise RuntimeError("GetMetadataDelta missed a changed block")
                reads = [cold_read(images[1], below) for _ in range(rounds)]
            finally:
                d.unpublish(vol, staging, target)
                d.delete(vol, snaps)
        shutil.rmtree(work, ignore_errors=True)
    named = sum(n for _, n in ranges)
    med_delta, med_read = statistics.median(deltas), statistics.median(reads)
    print(
        f"   GetMetadataDelta: {len(ranges)} ranges ({named // MiB} MiB named, {messages} messages) in "
        f"{med_delta * 1000:.0f} ms (median; all {', '.join(f'{t * 1000:.0f}' for t in deltas)} ms) = "
        f"{size / MiB / med_delta:.0f} MiB of volume/s, {len(changed) / med_delta:.0f} changed blocks/s"
    )
    print(
        f"   full read of the snapshot (cold cache, 1 MiB reads): {med_read:.2f} s (median; all "
        f"{', '.join(f'{t:.2f}' for t in reads)} s) = {size / MiB / med_read:.0f} MiB/s"
    )
    print(f"   -> the delta takes {med_delta / med_read:.1%} of a full read's time")
    return {"delta": med_delta, "read": med_read}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roots", nargs="+", choices=("xfs", "ext4"), default=["xfs", "ext4"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--share", type=float, default=0.10, help="share of blocks rewritten")
    parser.add_argument("--driver", choices=("thread", "process"), default="process")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("snapshot_metadata: needs root (loop devices and mounts)", file=sys.stderr)
        return 2
    for tool in (f"mkfs.{r}" for r in args.roots):
        if shutil.which(tool) is None:
            print(f"snapshot_metadata: {tool} is not installed", file=sys.stderr)
            return 2
    header("GetMetadataDelta on a 1 GiB loopfile volume with changed blocks, vs a full read")
    results = {}
    for fs_type in args.roots:
        how = "FIEMAP extents, no data read" if fs_type == "xfs" else "block-by-block content compare"
        print(f"\n-- root {fs_type} ({how}); driver in a {args.driver}")
        results[fs_type] = bench_root(fs_type, args.driver, args.rounds, args.share)
    print("\nsummary (medians):")
    for fs_type, r in results.items():
        print(
            f"   {fs_type} root: GetMetadataDelta {r['delta'] * 1000:.0f} ms, full read {r['read']:.2f} s "
            f"({r['read'] / r['delta']:.1f}x the delta)"
        )
    print(f"   load average now {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
