"""LVM thin snapshot, restore and clone of a 1 GiB volume against a ``dd`` copy of the LV.

Issue #5's figure: snapshot and clone of a 1 GiB thin volume holding 512 MiB
of data take a time independent of the data size (64 MiB vs 512 MiB are
reported) and at least 100x less than a ``dd`` copy of the LV measured in
the same run.

The run: a fresh VG on a scratch block device (the VM harness's scratch
disk, or natively a loop device over a sparse file — see
tests/vm/scratch.py) with a thin pool, and the lvm backend object on it
(no gRPC, no store: the figures are LVM's).  Per data size a 1 GiB raw block
volume is created, staged, filled with that much random data (fsynced) and
left staged, so each snapshot and clone goes through the backend's flush and
lvcreate's suspend of a volume in use.  Then ``--rounds`` times:
CreateSnapshot, CreateVolume from it (restore), CreateVolume from the volume
(clone), each deleted again after the round; the clone's data is checked
against the source by sha256 once.  Then ``dd`` of the whole LV onto a new
1 GiB thin LV (``bs=4M iflag=direct oflag=direct conv=fsync``: a full copy,
not a sparse one).

Needs root and device-mapper.  Run in the VM::

    python tests/vm/harness.py --disk-gb 8 -- .venv/bin/python benchmarks/lvm_snapshot.py [--rounds 3]

Exits non-zero only on an error (including a checksum mismatch), never on a
missed target.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "vm"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "lvm"))

from lvm_backend_helpers import make_backend, request, staged, volume
from scratch import block_device, cmd, remove_vg, unique_vg_name

from csi_kit.linux import lvm
from csi_kit.linux.run import run
from csi_kit.types import Snapshot

MiB = 1 << 20
GiB = 1 << 30


def fill(device: str, data_mib: int) -> str:
    """Write `data_mib` MiB of random data at the start of `device`; return its sha256."""
    digest = hashlib.sha256()
    chunk = os.urandom(4 * MiB)
    with open(device, "r+b", buffering=0) as f:
        for i in range(data_mib // 4):
            block = chunk[i % 7 :] + chunk[: i % 7]  # every 4 MiB differs; cheaper than urandom each
            f.write(block)
            digest.update(block)
        os.fsync(f.fileno())
    return digest.hexdigest()


def digest_of(device: str, data_mib: int) -> str:
    digest = hashlib.sha256()
    with open(device, "rb", buffering=0) as f:
        for _ in range(data_mib // 4):
            digest.update(f.read(4 * MiB))
    return digest.hexdigest()


@contextlib.contextmanager
def timed(into: list[float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    into.append(time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=int, nargs="+", default=[64, 512], help="MiB of data per run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    where = "VM guest (tests/vm/harness.py)" if os.environ.get("CSI_KIT_IN_VM") else "natively"
    print(f"# lvm_snapshot: {where}; kernel {platform.release()}; {os.cpu_count()} CPUs")
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "")
    print(f"# virtualisation: {'hypervisor flag set' if 'hypervisor' in flags else 'bare metal'}")
    print(f"# lvm: {run(['lvm', 'version']).stdout.splitlines()[0].strip()}")
    print(f"# load average at start: {os.getloadavg()}")
    floor: list[float] = []
    for _ in range(3):
        with timed(floor):
            run(["lvm", "vgs", "--reportformat", "json"])
    print(f"# one lvm command (vgs) here: {statistics.median(floor):.3f} s: the floor under every figure")

    results: dict[int, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, block_device(Path(tmp), size_gb=8) as device:
        vg = unique_vg_name()
        cmd("pvcreate", "-q", device)
        try:
            cmd("vgcreate", "-q", vg, device)
            lvm.create_thin_pool(vg, "pool", 5 * GiB)
            backend = make_backend(vg, tmp, overprovision_ratio=4.0)
            for data in args.data:
                times: dict[str, list[float]] = {
                    "snapshot": [],
                    "restore": [],
                    "clone": [],
                    "lvcreate": [],
                    "dd": [],
                }
                results[data] = times
                src_id = f"src-{data}"
                backend.create_volume(src_id, request(src_id, GiB, "block"))
                src = volume(src_id, GiB, "block")
                with staged(backend, src_id, "block", tmp) as src_dev:
                    t = time.perf_counter()
                    expected = fill(src_dev, data)
                    print(f"data {data} MiB: written in {time.perf_counter() - t:.1f} s")
                    for r in range(args.rounds):
                        snap_id, restore_id, clone_id = f"s-{data}-{r}", f"r-{data}-{r}", f"c-{data}-{r}"
                        with timed(times["snapshot"]):
                            backend.create_snapshot(snap_id, src, {})
                        snapshot = Snapshot(snap_id, snap_id, src_id, GiB, 0)
                        with timed(times["restore"]):
                            backend.restore_snapshot(restore_id, request(restore_id, GiB, "block"), snapshot)
                        with timed(times["clone"]):
                            backend.clone_volume(clone_id, request(clone_id, GiB, "block"), src)
                        if r == 0:
                            clone_dev = backend.device_of(clone_id)
                            assert clone_dev is not None
                            if digest_of(clone_dev, data) != expected:
                                print("ERROR: the clone's data differ from the source's", file=sys.stderr)
                                return 1
                        backend.delete_volume(clone_id)
                        backend.delete_volume(restore_id)
                        backend.delete_snapshot(snap_id)
                    # LVM's own cost: one bare lvcreate --snapshot (no backend look-ups around it).
                    origin = backend.volume_lv(src_id)
                    for r in range(args.rounds):
                        with timed(times["lvcreate"]):
                            run(["lvm", "lvcreate", "-q", "--snapshot", "-n", f"bare{r}", f"{vg}/{origin}"])
                        lvm.remove_lv(vg, f"bare{r}")
                    copy_id = f"dd-{data}"
                    backend.create_volume(copy_id, request(copy_id, GiB, "block"))
                    copy_dev = backend.device_of(copy_id)
                    assert copy_dev is not None
                    argv = ["dd", f"if={src_dev}", f"of={copy_dev}", "bs=4M", "iflag=direct", "oflag=direct"]
                    with timed(times["dd"]):
                        run([*argv, "conv=fsync", "status=none"], timeout=3600.0)
                    if digest_of(copy_dev, data) != expected:
                        print("ERROR: the dd copy differs from the source", file=sys.stderr)
                        return 1
                    backend.delete_volume(copy_id)
                backend.delete_volume(src_id)
        finally:
            remove_vg(vg)

    print()
    columns = ("snapshot s", "restore s", "clone s", "lvcreate s", "dd s", "dd/snap", "dd/clone")
    print(f"{'data':>8} " + " ".join(f"{c:>10}" for c in columns))
    for data, times in results.items():
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{data:>5}MiB {med['snapshot']:>10.3f} {med['restore']:>10.3f} {med['clone']:>10.3f} "
            f"{med['lvcreate']:>10.3f} {med['dd']:>10.2f} "
            f"{med['dd'] / med['snapshot']:>9.0f}x {med['dd'] / med['clone']:>9.0f}x"
        )
    print("(medians over rounds; every figure in seconds; all rounds:)")
    for data, times in results.items():
        print(
            f"  {data} MiB: " + "; ".join(f"{k} {', '.join(f'{x:.3f}' for x in v)}" for k, v in times.items())
        )
    print(f"# load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
