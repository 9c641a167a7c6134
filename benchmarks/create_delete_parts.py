"""Where a CreateVolume+DeleteVolume pair spends its time, with 0 and with 10,000 existing volumes.

A companion to ``create_delete.py``: that one measures the whole pair over
gRPC; this one calls the same steps in-process, in the order the engine
calls them for a pair, and times each:

    store.begin_volume      (SQLite commit: row 'creating')
    backend.create_volume   (mkdir + chmod in .incoming, syncfs, rename)
    store.finish_volume     (SQLite commit: row 'ready')
    store.set_volume_state  (SQLite commit: row 'deleting')
    backend.delete_volume   (mountinfo check, rename, rmtree)
    store.remove_volume     (SQLite commit: row gone)

Two setups, each a Store (``synchronous=FULL``: ``--durability power``, the driver's default) and a
HostPathBackend on its own loop-mounted filesystem: "empty", and "full" with
10,000 volume rows and directories already there (filled directly, with the
store at ``synchronous=NORMAL`` for the fill only).  The pairs run in
alternating blocks, as in ``create_delete.py``.

Each setup also runs two variants that are not what the driver does, to put
numbers on possible changes (monkeypatched here, for this measurement only):

    fsync-dir   the new, empty volume directory is made durable with
                fsync(dir) + fsync(parent) instead of syncfs(2) of the
                whole filesystem;
    lazy-remove the final DELETE commit without a flush (the next durable
                commit carries it, and a row lost in a crash is still
                'deleting', which start-up finishes) -- what the store
                does by itself now, so this equals "as-is".

Needs root.  Run::

    sudo .venv/bin/python benchmarks/create_delete_parts.py [--pairs 300] [--existing 10000] [--fs xfs]
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
import types
import uuid
from collections.abc import Callable, Iterator

from _bench import header, load_average

from csi_kit._core.store import Store
from csi_kit.backend import BackendContext
from csi_kit.testing.fsimage import loop_mounted_fs
from csi_kit.types import CapacityRange, Volume, VolumeRequest
from csi_kit_backends.hostpath import backend as hostpath_backend
from csi_kit_backends.hostpath.backend import HostPathBackend, HostPathConfig

STEPS = (
    "store.begin_volume",
    "backend.create_volume",
    "store.finish_volume",
    "store.set_volume_state",
    "backend.delete_volume",
    "store.remove_volume",
)
GiB = 1 << 30
VARIANTS = ("as-is", "fsync-dir", "lazy-remove")


class _FsyncDirFs:
    """Stands in for the ``fs`` module inside the hostPath backend: sync_path fsyncs instead of syncfs."""

    def __init__(self, real: types.ModuleType) -> None:
        self._real = real

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    @staticmethod
    def sync_path(path: str) -> None:
        for target in (path, os.path.dirname(path)):
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    real_fs = hostpath_backend.fs
    try:
        if name == "fsync-dir":
            hostpath_backend.fs = _FsyncDirFs(real_fs)
        yield
    finally:
        hostpath_backend.fs = real_fs


class Setup:
    """One store + one hostPath backend on one filesystem."""

    def __init__(self, base: str, existing: int) -> None:
        self.db_path = os.path.join(base, "state", "state.db")
        if existing:
            filler = Store(self.db_path, synchronous="NORMAL")
            for i in range(existing):
                vid = str(uuid.uuid4())
                filler.begin_volume(Volume(vid, f"existing-{i:06d}", GiB, created_ns=time.time_ns()), {})
                filler.finish_volume(vid, GiB, {})
            filler.close()
        self.store = Store(self.db_path)  # --durability power, as the driver
        context = BackendContext("hostpath.csi-kit.io", "node-1", os.path.join(base, "state"))
        self.backend = HostPathBackend(HostPathConfig(root=os.path.join(base, "hostpath")), context)
        self.backend.start()
        for vid in self.store.volume_ids():
            os.mkdir(self.backend.volume_path(vid), 0o777)
        os.sync()
        self.times: dict[str, dict[str, list[float]]] = {v: {step: [] for step in STEPS} for v in VARIANTS}

    def _remove_lazily(self, volume_id: str) -> None:
        # The store's removals are lazy themselves now (committed without a flush), so this
        # variant measures what "as-is" does; it stays for comparison with earlier figures.
        self.store.remove_volume(volume_id)

    def pair(self, name: str, variant_name: str = "as-is") -> None:
        t = self.times[variant_name]
        remove = self._remove_lazily if variant_name == "lazy-remove" else self.store.remove_volume
        vid = str(uuid.uuid4())
        volume = Volume(vid, name, GiB, created_ns=time.time_ns())
        request = VolumeRequest(
            name=name, capacity_bytes=GiB, capacity=CapacityRange(GiB, 0), capabilities=()
        )
        steps: tuple[Callable[[], object], ...] = (
            lambda: self.store.begin_volume(volume, {}),
            lambda: self.backend.create_volume(vid, request),
            lambda: self.store.finish_volume(vid, GiB, {}),
            lambda: self.store.set_volume_state(vid, "deleting"),
            lambda: self.backend.delete_volume(vid),
            lambda: remove(vid),
        )
        for step, fn in zip(STEPS, steps, strict=True):
            t0 = time.perf_counter()
            fn()
            t[step].append(time.perf_counter() - t0)

    def close(self) -> None:
        self.backend.stop()
        self.store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--existing", type=int, default=10_000)
    parser.add_argument("--fs", choices=["xfs", "ext4"], default="xfs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("create_delete_parts: needs root (loop devices and mounts)", file=sys.stderr)
        return 2
    header("CreateVolume+DeleteVolume pair, step by step (in-process)")
    per_block = max(1, args.pairs // args.blocks)
    workdir = tempfile.mkdtemp(prefix="csi-kit-bench-parts-")
    try:
        with contextlib.ExitStack() as stack:
            setups: dict[str, Setup] = {}
            for label, existing in (("empty", 0), ("full", args.existing)):
                os.makedirs(os.path.join(workdir, label))
                base = stack.enter_context(
                    loop_mounted_fs(os.path.join(workdir, label), args.fs, size_mb=2048)
                )
                t0 = time.perf_counter()
                setups[label] = Setup(base, existing)
                stack.callback(setups[label].close)
                print(
                    f"   {label}: {existing} volumes on {args.fs}, set up in {time.perf_counter() - t0:.1f} s"
                )
                sys.stdout.flush()
            for label, s in setups.items():
                for i in range(10):
                    s.pair(f"warmup-{label}-{i}")
            for b in range(args.blocks):
                for v in VARIANTS:
                    for label, s in setups.items():
                        with variant(v):
                            for i in range(per_block):
                                s.pair(f"pair-{label}-{v}-{b}-{i}", v)
            for v in VARIANTS:
                print(f"\n   {v}: median ms per step over {per_block * args.blocks} pairs (mean in brackets)")
                print(f"   {'step':24s} {'empty':>16s} {'full':>16s}")
                medians = {label: 0.0 for label in setups}
                means = {label: 0.0 for label in setups}
                for step in STEPS:
                    cells = []
                    for label, s in setups.items():
                        values = s.times[v][step]
                        medians[label] += statistics.median(values)
                        means[label] += statistics.fmean(values)
                        median_ms, mean_ms = statistics.median(values) * 1000, statistics.fmean(values) * 1000
                        cells.append(f"{median_ms:7.2f} ({mean_ms:6.2f})")
                    print(f"   {step:24s} {cells[0]:>16s} {cells[1]:>16s}")
                print(
                    f"   {'sum':24s} {medians['empty'] * 1000:7.2f} ({means['empty'] * 1000:6.2f}) "
                    f"{medians['full'] * 1000:7.2f} ({means['full'] * 1000:6.2f})   full/empty by the means: "
                    f"{means['empty'] / means['full']:.2f}"
                )
            for label, s in setups.items():
                db = os.path.getsize(s.db_path)
                wal = os.path.getsize(s.db_path + "-wal") if os.path.exists(s.db_path + "-wal") else 0
                print(f"   {label}: state.db {db / 1024:.0f} KiB, WAL {wal / 1024:.0f} KiB")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"   load average now {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
