"""API cost and throughput of the provisioner and resizer, on the fake API, against the real hostPath driver.

1. Requests per provisioned PVC (claim created → bound) and per deletion
   (claim deleted → PV and volume gone), one claim at a time, counted by verb
   and kind at the fake API.  Only our loops are counted: the user's own
   writes and the PV controller's part (played by the tests' `ClusterSim`,
   which binds) are subtracted; informer list/watch are start-up costs.
   Shown with Events on (the default, as upstream) and off.
2. Requests per expansion (request raised → status.capacity updated).
3. N claims (default 1,000) created at once and bound with the QPS limit
   lifted: wall time, CPU of this process (loops + in-memory API + binder)
   and of the driver process, and what the default 5 QPS / burst 10 budget
   would cost at the measured requests per claim.

    .venv/bin/python benchmarks/k8s_provisioning.py [--claims 1000]

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "k8s"))

from _bench import header, process_cpu_seconds
from volume_peer import ClusterSim

from csi_kit.k8s.objects.resources import PV, PVC, STORAGE_CLASS
from csi_kit.k8s.runtime.csi import CSIClient
from csi_kit.k8s.volume.provisioner import Provisioner
from csi_kit.k8s.volume.resizer import Resizer
from csi_kit.testing.driver import driver_process
from csi_kit.testing.fake_k8s import FakeKubeAPI

DRIVER = "hostpath.csi-kit.io"
NODE = "node-1"
WRITES = ("create", "update", "update_status", "patch", "patch_status", "delete")


async def wait(pred, limit: float = 3600.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        await asyncio.sleep(0.02)


async def quiet(api: FakeKubeAPI) -> None:
    last, still = -1, 0
    while still < 10:
        await asyncio.sleep(0.02)
        now = api.total_requests
        still = still + 1 if now == last else 0
        last = now


def bound(api: FakeKubeAPI, name: str) -> bool:
    c = api.peek(PVC, name, "default")
    return bool(c and (c.get("status") or {}).get("phase") == "Bound")


def bound_count(api: FakeKubeAPI) -> int:
    return sum(1 for c in api.view(PVC) if (c.get("status") or {}).get("phase") == "Bound")


def claim(name: str, size: str = "1Mi") -> dict[str, object]:
    return {
        "metadata": {
            "name": name,
            "namespace": "default",
            # As the scheduler leaves a WaitForFirstConsumer claim once it picked the node.
            "annotations": {"volume.kubernetes.io/selected-node": NODE},
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "hostpath",
            "resources": {"requests": {"storage": size}},
        },
    }


class Run:
    def __init__(self, api: FakeKubeAPI, sim: ClusterSim) -> None:
        self.api = api
        self.sim = sim

    async def measure(self, action, done) -> tuple[Counter[tuple[str, str]], int]:  # type: ignore[no-untyped-def]
        await quiet(self.api)
        before, sim_before = Counter(self.api.requests), self.sim.requests
        await action()
        await wait(done)
        await quiet(self.api)
        delta = Counter(self.api.requests)
        delta.subtract(before)
        return +delta, self.sim.requests - sim_before


def show(title: str, delta: Counter[tuple[str, str]], sim: int, user: int) -> int:
    writes = {k: v for k, v in delta.items() if k[0] in WRITES or k[0] == "get"}
    total = sum(writes.values()) - sim - user
    print(f"{title}: {total} requests by our loops")
    print(f"    all requests seen {sum(writes.values())}: user {user}, PV-controller stand-in {sim}")
    for (verb, kind), n in sorted(writes.items()):
        print(f"    {verb:13s} {kind:24s} {n}")
    return total


async def per_claim(endpoint: str, events: bool) -> int:
    api = FakeKubeAPI()
    client = CSIClient(endpoint, timeout=60)
    info = await client.driver_info()
    _, topo = await client.node_info()
    await api.create(
        STORAGE_CLASS,
        {
            "metadata": {"name": "hostpath"},
            "provisioner": DRIVER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "WaitForFirstConsumer",
            "allowVolumeExpansion": True,  # without it the API server refuses the expansion step
        },
    )
    sim = ClusterSim(api)
    prov = Provisioner(api, client, info, node_name=NODE, node_topology=topo, events=events)
    res = Resizer(api, client, info, events=events)
    tasks = [asyncio.create_task(x.run()) for x in (sim, prov, res)]
    for x in (sim, prov, res):
        await x.started.wait()
    run = Run(api, sim)
    label = "events on" if events else "events off"

    async def create() -> None:
        await api.create(PVC, claim("one"))

    d, s = await run.measure(create, lambda: bound(api, "one"))
    provisioned = show(f"provision one claim ({label})", d, s, user=1)

    async def grow() -> None:
        await api.patch(PVC, "one", {"spec": {"resources": {"requests": {"storage": "2Mi"}}}}, "default")

    def grown() -> bool:
        c = api.peek(PVC, "one", "default") or {}
        return ((c.get("status") or {}).get("capacity") or {}).get("storage") == "2Mi"

    d, s = await run.measure(grow, grown)
    show(f"expand one claim ({label})", d, s, user=1)

    async def delete() -> None:
        await api.delete(PVC, "one", "default")

    d, s = await run.measure(delete, lambda: not api.objects(PV))
    show(f"delete one claim ({label})", d, s, user=1)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    return provisioned


async def many(endpoint: str, pid: int, n: int, per_claim_requests: int) -> None:
    api = FakeKubeAPI()
    client = CSIClient(endpoint, timeout=120)
    info = await client.driver_info()
    _, topo = await client.node_info()
    await api.create(
        STORAGE_CLASS,
        {
            "metadata": {"name": "hostpath"},
            "provisioner": DRIVER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "WaitForFirstConsumer",
        },
    )
    sim = ClusterSim(api)
    prov = Provisioner(api, client, info, node_name=NODE, node_topology=topo)
    tasks = [asyncio.create_task(x.run()) for x in (sim, prov)]
    for x in (sim, prov):
        await x.started.wait()
    cpu0, dcpu0, t0 = time.process_time(), process_cpu_seconds(pid), time.monotonic()
    for i in range(n):
        await api.create(PVC, claim(f"c{i:05d}"))
    await wait(lambda: bound_count(api) == n)
    wall = time.monotonic() - t0
    cpu, dcpu = time.process_time() - cpu0, process_cpu_seconds(pid) - dcpu0
    print(f"{n} claims bound with QPS lifted: {wall:.1f} s wall ({n / wall:.0f} claims/s)")
    print(f"    CPU: this process (loops + fake API + binder) {cpu:.1f} s, driver process {dcpu:.1f} s")
    print(f"    volumes on the backend: {len(list(api.view(PV)))} PVs")
    budget = n * per_claim_requests / 5.0
    print(f"    at upstream's default 5 QPS, {per_claim_requests} requests/claim would take ≥ {budget:.0f} s")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=1000)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="csi-kit-bench-") as state,
        driver_process(state, backend="hostpath", node_id=NODE, driver_name=DRIVER) as proc,
    ):
        assert proc.proc is not None
        header("requests per operation (hostPath driver, fake API)")
        await per_claim(proc.endpoint, events=False)
        with_events = await per_claim(proc.endpoint, events=True)
        header(f"{args.claims} claims at once")
        await many(proc.endpoint, proc.proc.pid, args.claims, with_events)


if __name__ == "__main__":
    asyncio.run(main())
