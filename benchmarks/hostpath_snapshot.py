"""Snapshot + restore of a 256 MiB volume over gRPC, against ``tar czf`` + ``tar xzf`` of the same tree.

Issue #2's figure: the hostPath driver's CreateSnapshot followed by
CreateVolume-from-that-snapshot must beat the tar pair by at least 50x on XFS
(reflink=1: the copies share extents) and by at least 5x on ext4 (no reflink:
an in-kernel copy_file_range of every data extent).

For each filesystem the run is: a fresh loop-mounted image; a ``csi-kit
serve`` child process with ``--backend-option root=<the mount>``; a volume
created over gRPC and filled with random data through its directory; then
``--rounds`` times CreateSnapshot + CreateVolume(from the snapshot), each
restore checked by checksum against the source; then the tar pair on the
same tree, into the same filesystem, also checked.  Both sides read a hot
page cache (the data was just written).  The driver's copies end with a
syncfs (a snapshot is durable when acknowledged); tar's do not, so a third
line shows tar followed by ``sync -f`` for a like-for-like durability
comparison, and a plain ``tar cf`` + ``tar xf`` (no gzip) line shows how much
of tar's time is compression.

Needs root (loop devices, mount).  Run::

    sudo .venv/bin/python benchmarks/hostpath_snapshot.py [--fs xfs ext4] [--mib 256] [--rounds 3]

Exits non-zero only on an error (including a checksum mismatch), never on a
missed target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from _bench import (
    Client,
    MiB,
    children_cpu_seconds,
    header,
    load_average,
    process_cpu_seconds,
    timed,
    tree_digest,
    write_random_tree,
)

from csi_kit._pb import csi_pb2 as pb
from csi_kit.linux.run import run
from csi_kit.testing.driver import driver_process
from csi_kit.testing.fsimage import loop_mounted_fs

TARGETS = {"xfs": 50.0, "ext4": 5.0}


def used_bytes(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _driver_log_line(log_path: str, needle: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                if needle in line:
                    return line.strip()
    except OSError:
        pass
    return "(not found in the driver log)"


def bench_fs(fs_type: str, mib: int, rounds: int, workdir: str) -> dict[str, float]:
    print(f"\n-- {fs_type}: {mib} MiB of random data in 4 files, {rounds} round(s)")
    sys.stdout.flush()
    image_mb = max(1024, mib * 8)
    with loop_mounted_fs(workdir, fs_type, size_mb=image_mb, reflink=True) as mnt:
        state_dir = tempfile.mkdtemp(prefix=f"state-{fs_type}-", dir=workdir)
        driver = driver_process(state_dir, backend_options={"root": mnt})
        with driver as proc, Client(proc.endpoint) as client:
            info = client.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=30)
            manifest = ", ".join(f"{k}={v}" for k, v in sorted(info.manifest.items()))
            print(f"   driver manifest: {manifest}")
            print(f"   driver log: {_driver_log_line(proc.log_path, 'copies by')}")
            volume_id = client.create_volume("bench-source", capacity=2 * mib * MiB)
            source_dir = os.path.join(mnt, "volumes", volume_id)
            t0 = time.perf_counter()
            write_random_tree(source_dir, mib * MiB)
            print(f"   wrote {mib} MiB into {source_dir} in {time.perf_counter() - t0:.2f} s")
            source_digest = tree_digest(source_dir)

            snap_times: list[float] = []
            restore_times: list[float] = []
            pair_times: list[float] = []
            driver_cpu: list[float] = []
            assert proc.proc is not None
            pid = proc.proc.pid
            for i in range(rounds):
                t: dict[str, float] = {}
                before = used_bytes(mnt)
                cpu0 = process_cpu_seconds(pid)
                with timed(t, "snapshot"):
                    snapshot_id = client.create_snapshot(f"bench-snap-{i}", volume_id)
                with timed(t, "restore"):
                    restored_id = client.create_volume(
                        f"bench-restored-{i}", capacity=2 * mib * MiB, snapshot_id=snapshot_id
                    )
                cpu = process_cpu_seconds(pid) - cpu0
                driver_cpu.append(cpu)
                grown = used_bytes(mnt) - before
                restored_digest = tree_digest(os.path.join(mnt, "volumes", restored_id))
                if restored_digest != source_digest:
                    raise RuntimeError(f"round {i}: restored volume {restored_id} differs from its source")
                snap_times.append(t["snapshot"])
                restore_times.append(t["restore"])
                pair_times.append(t["snapshot"] + t["restore"])
                print(
                    f"   round {i}: CreateSnapshot {t['snapshot'] * 1000:8.1f} ms  "
                    f"CreateVolume(from snapshot) {t['restore'] * 1000:8.1f} ms  "
                    f"driver CPU {cpu:.2f} s  filesystem used +{grown / MiB:.1f} MiB  checksum ok"
                )
                # Leave the filesystem as it was for the next round and for tar.
                client.delete_volume(restored_id)
                client.delete_snapshot(snapshot_id)

            tar_dir = os.path.join(mnt, "bench-tar")
            os.mkdir(tar_dir)
            archive = os.path.join(tar_dir, "volume.tgz")
            out_dir = os.path.join(tar_dir, "restored")
            os.mkdir(out_dir)
            t = {}
            cpu0 = children_cpu_seconds()
            with timed(t, "czf"):
                run(["tar", "czf", archive, "-C", source_dir, "."], timeout=900)
            with timed(t, "xzf"):
                run(["tar", "xzf", archive, "-C", out_dir], timeout=900)
            tar_cpu = children_cpu_seconds() - cpu0
            with timed(t, "sync"):
                run(["sync", "-f", out_dir], timeout=900)
            if tree_digest(out_dir) != source_digest:
                raise RuntimeError("tar's restored tree differs from its source")
            shutil.rmtree(tar_dir)
            os.mkdir(tar_dir)
            plain = os.path.join(tar_dir, "volume.tar")
            out_plain = os.path.join(tar_dir, "restored")
            os.mkdir(out_plain)
            with timed(t, "cf"):
                run(["tar", "cf", plain, "-C", source_dir, "."], timeout=900)
            with timed(t, "xf"):
                run(["tar", "xf", plain, "-C", out_plain], timeout=900)
            shutil.rmtree(tar_dir)
            client.delete_volume(volume_id)

    tar_pair = t["czf"] + t["xzf"]
    best = min(pair_times)
    median = statistics.median(pair_times)
    print(
        f"   tar czf {t['czf']:.2f} s + tar xzf {t['xzf']:.2f} s = {tar_pair:.2f} s  "
        f"(+ sync -f {t['sync']:.2f} s = {tar_pair + t['sync']:.2f} s)  checksum ok"
    )
    print(f"   tar czf+xzf CPU (tar and gzip, user+sys): {tar_cpu:.2f} s")
    plain_pair = t["cf"] + t["xf"]
    print(f"   tar cf {t['cf']:.2f} s + tar xf {t['xf']:.2f} s = {plain_pair:.2f} s (no gzip, context only)")
    print(
        f"   CSI snapshot+restore: best {best * 1000:.1f} ms, median {median * 1000:.1f} ms "
        f"(snapshot median {statistics.median(snap_times) * 1000:.1f} ms, "
        f"restore median {statistics.median(restore_times) * 1000:.1f} ms); "
        f"driver CPU median {statistics.median(driver_cpu):.2f} s"
    )
    ratio = tar_pair / median
    target = TARGETS.get(fs_type, 0.0)
    verdict = "meets" if ratio >= target else "MISSES"
    print(
        f"   RESULT {fs_type}: tar czf+xzf / (CreateSnapshot+CreateVolume) = {ratio:.1f}x on the median "
        f"({tar_pair / best:.1f}x on the best); target >= {target:g}x: {verdict}"
    )
    print(f"   load average now {load_average()}")
    return {"ratio": ratio, "tar": tar_pair, "csi": median}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fs", nargs="+", default=["xfs", "ext4"], choices=["xfs", "ext4", "btrfs"])
    parser.add_argument("--mib", type=int, default=256, help="MiB of random data in the volume")
    parser.add_argument("--rounds", type=int, default=3, help="snapshot+restore repetitions per filesystem")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("hostpath_snapshot: needs root (loop devices and mounts)", file=sys.stderr)
        return 2
    header("hostPath snapshot+restore vs tar")
    workdir = tempfile.mkdtemp(prefix="csi-kit-bench-snap-")
    try:
        results = {fs: bench_fs(fs, args.mib, args.rounds, workdir) for fs in args.fs}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\nsummary:")
    for fs, r in results.items():
        print(
            f"   {fs:5s} tar pair {r['tar']:7.2f} s   CSI pair {r['csi'] * 1000:8.1f} ms   "
            f"ratio {r['ratio']:7.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
