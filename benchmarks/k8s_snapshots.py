"""API cost and throughput of the snapshot loops, on the fake API, against the real hostPath driver.

1. Requests per dynamic snapshot: one snapshot at a time, from creation to
   readyToUse and through deletion, counted by verb and kind at the fake API
   (the user's own create/delete are not counted; informer list/watch are
   start-up costs, shown separately).
2. N VolumeSnapshots (default 1,000) to readyToUse with the QPS limit lifted:
   wall time, CPU of this process (loops + the in-memory API) and of the driver
   process, and how long the default 5 QPS / burst 10 budget would take.

    .venv/bin/python benchmarks/k8s_snapshots.py [--snapshots 1000] [--volumes 50]

A script that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))

from _bench import Client, header, process_cpu_seconds

from csi_kit.k8s.objects.resources import (
    PV,
    PVC,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CLASS,
    VOLUME_SNAPSHOT_CONTENT,
)
from csi_kit.k8s.runtime.csi import CSIClient
from csi_kit.k8s.runtime.ratelimit import ThrottledAPI, TokenBucket
from csi_kit.k8s.snapshot.controller import SnapshotController
from csi_kit.k8s.snapshot.snapshotter import Snapshotter
from csi_kit.testing.driver import driver_process
from csi_kit.testing.fake_k8s import FakeKubeAPI

DRIVER = "hostpath.csi-kit.io"
WRITES = ("create", "update", "update_status", "patch", "patch_status", "delete")


async def wait(pred, limit: float = 3600.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        await asyncio.sleep(0.05)


def ready_count(api: FakeKubeAPI) -> int:
    return sum(1 for s in api.view(VOLUME_SNAPSHOT) if (s.get("status") or {}).get("readyToUse") is True)


async def setup(api: FakeKubeAPI, client: Client, volumes: int) -> None:
    for i in range(volumes):
        vid = client.create_volume(f"bench-{i}", capacity=1 << 20)
        await api.create(
            PV, {"metadata": {"name": f"pv-{i}"}, "spec": {"csi": {"driver": DRIVER, "volumeHandle": vid}}}
        )
        pvc = await api.create(
            PVC, {"metadata": {"name": f"data-{i}", "namespace": "bench"}, "spec": {"volumeName": f"pv-{i}"}}
        )
        pvc["status"] = {"phase": "Bound"}
        await api.update_status(PVC, pvc)
    await api.create(
        VOLUME_SNAPSHOT_CLASS,
        {
            "metadata": {
                "name": "hp",
                "annotations": {"snapshot.storage.kubernetes.io/is-default-class": "true"},
            },
            "driver": DRIVER,
            "deletionPolicy": "Delete",
        },
    )


def snapshot_obj(name: str, pvc: str) -> dict[str, object]:
    return {
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"source": {"persistentVolumeClaimName": pvc}},
    }


async def run(args: argparse.Namespace) -> None:
    header(f"k8s snapshot loops: {args.snapshots} VolumeSnapshots, {args.volumes} volumes, hostPath driver")
    with (
        tempfile.TemporaryDirectory(prefix="csi-kit-bench-k8s-") as state,
        driver_process(state, driver_name=DRIVER) as drv,
        Client(drv.endpoint) as sync_client,
    ):
        fake = FakeKubeAPI(history=1_000_000)
        await setup(fake, sync_client, args.volumes)
        setup_requests = sum(fake.requests.values())
        api = ThrottledAPI(fake, TokenBucket(0, 1))  # QPS lifted
        csi = CSIClient(drv.endpoint)
        ctrl = SnapshotController(api, workers=args.workers)
        snapper = Snapshotter(api, csi, DRIVER, workers=args.workers)
        tasks = [asyncio.create_task(ctrl.run()), asyncio.create_task(snapper.run())]
        await ctrl.started.wait()
        await snapper.started.wait()
        startup = sum(fake.requests.values()) - setup_requests

        # 1. Requests per snapshot, one at a time.
        per_create: Counter[str] = Counter()
        per_delete: Counter[str] = Counter()
        rounds = args.count_rounds
        for i in range(rounds):
            before = Counter(fake.requests)
            await fake.create(VOLUME_SNAPSHOT, snapshot_obj(f"count-{i}", "data-0"))
            await wait(lambda: ready_count(fake) == 1)
            await asyncio.sleep(0.05)  # let trailing writes (PVC finalizer release) land
            mid = Counter(fake.requests)
            await fake.delete(VOLUME_SNAPSHOT, f"count-{i}", "bench")
            await wait(
                lambda: not any(fake.view(VOLUME_SNAPSHOT)) and not any(fake.view(VOLUME_SNAPSHOT_CONTENT))
            )
            await asyncio.sleep(0.05)
            after = Counter(fake.requests)
            for (verb, plural), n in (mid - before).items():
                per_create[f"{verb} {plural}"] += n
            for (verb, plural), n in (after - mid).items():
                per_delete[f"{verb} {plural}"] += n
        per_create["create volumesnapshots"] -= rounds  # the user's own request
        per_delete["delete volumesnapshots"] -= rounds
        print(f"-- API requests per dynamic snapshot (mean of {rounds}); start-up list+watch: {startup}")
        for title, c in (("create → readyToUse", per_create), ("deletion", per_delete)):
            total = sum(c.values()) / rounds
            print(f"   {title}: {total:.1f}")
            for k, n in sorted(c.items()):
                if n:
                    print(f"      {n / rounds:4.1f}  {k}")
        total_per = (sum(per_create.values()) + sum(per_delete.values())) / rounds
        print(
            f"   total per snapshot lifecycle: {total_per:.1f} requests "
            f"({total_per / 5:.1f} s of a 5 QPS budget)"
        )

        # 2. N snapshots to readyToUse, QPS lifted.
        n = args.snapshots
        before_req = sum(fake.requests.values())
        cpu0, drv0, t0 = time.process_time(), process_cpu_seconds(drv.proc.pid), time.perf_counter()
        for i in range(n):
            await fake.create(VOLUME_SNAPSHOT, snapshot_obj(f"s-{i}", f"data-{i % args.volumes}"))
        await wait(lambda: ready_count(fake) == n)
        t_ready = time.perf_counter() - t0
        cpu_ready, drv_ready = time.process_time() - cpu0, process_cpu_seconds(drv.proc.pid) - drv0
        req_ready = sum(fake.requests.values()) - before_req - n
        print(f"-- {n} VolumeSnapshots to readyToUse (QPS lifted, {args.workers} workers per queue)")
        print(f"   wall {t_ready:.2f} s  ({n / t_ready:.0f} snapshots/s)")
        print(f"   CPU: loops + in-memory API {cpu_ready:.2f} s, driver process {drv_ready:.2f} s")
        print(
            f"   API requests {req_ready} ({req_ready / n:.1f} per snapshot); at 5 QPS that is "
            f"{req_ready / 5 / 60:.0f} min"
        )

        t1 = time.perf_counter()
        for i in range(n):
            await fake.delete(VOLUME_SNAPSHOT, f"s-{i}", "bench")
        await wait(
            lambda: not any(fake.view(VOLUME_SNAPSHOT)) and not any(fake.view(VOLUME_SNAPSHOT_CONTENT))
        )
        print(f"   deletion of all {n}: wall {time.perf_counter() - t1:.2f} s")
        left = await csi.list_snapshots()
        print(f"   backend snapshots left: {len(left)}")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        # 3. The same loops under the default client-side budget (QPS 5, burst 10).
        m = args.default_qps_snapshots
        if m:
            limited = ThrottledAPI(fake, TokenBucket(5, 10))
            ctrl = SnapshotController(limited, workers=args.workers)
            snapper = Snapshotter(limited, csi, DRIVER, workers=args.workers)
            t2 = time.perf_counter()
            tasks = [asyncio.create_task(ctrl.run()), asyncio.create_task(snapper.run())]
            await ctrl.started.wait()
            await snapper.started.wait()
            for i in range(m):
                await fake.create(VOLUME_SNAPSHOT, snapshot_obj(f"q-{i}", f"data-{i}"))
            await wait(lambda: ready_count(fake) == m)
            spent = time.perf_counter() - t2
            print(f"-- {m} VolumeSnapshots (one per PVC) at the default QPS 5 / burst 10, start-up included")
            print(f"   wall {spent:.1f} s for {sum(limited.requests.values())} requests")
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await csi.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshots", type=int, default=1000)
    p.add_argument("--volumes", type=int, default=50)
    p.add_argument("--workers", type=int, default=10)
    p.add_argument("--count-rounds", type=int, default=10)
    p.add_argument("--default-qps-snapshots", type=int, default=20)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
