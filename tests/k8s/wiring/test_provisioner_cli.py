"""The volume loops as `csi-kit serve/controllers --controllers ...` runs them."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import pytest
from k8s_helpers import cli_running, http_get, loop_context, parse, running
from volume_peer import (
    DRIVER,
    TOPO_KEY,
    ClusterSim,
    VolumeCSI,
    bound,
    eventually,
    make_claim,
    make_class,
    run_tasks,
    served,
    stop_tasks,
)

from csi_kit.k8s import registry
from csi_kit.k8s.cli import run_controllers, selected
from csi_kit.k8s.objects.resources import LEASE, PV, PVC
from csi_kit.k8s.runtime.api import ApiError
from csi_kit.k8s.runtime.csi import CSIClient
from csi_kit.k8s.volume import capacity
from csi_kit.k8s.volume.attacher import Attacher
from csi_kit.k8s.volume.capacity import CapacityTracker
from csi_kit.testing.fake_k8s import FakeKubeAPI

# The Lease each upstream sidecar takes for DRIVER (vol.csi-kit.io) (so ours and theirs never both lead).
LEASES = {
    "provisioner": "vol-csi-kit-io",
    "resizer": "external-resizer-vol-csi-kit-io",
    "attacher": "external-attacher-leader-vol-csi-kit-io",
    "capacity": "vol-csi-kit-io-capacity",  # upstream runs it inside the provisioner; ours elects alone
}

FAST = ("--kube-api-qps", "0", "--retry-interval-start", "0.01", "--retry-interval-max", "0.05")


def test_all_selects_every_loop_and_upstream_lease_names() -> None:
    assert selected(parse("--controllers", "all")) == {
        "snapshot-controller",
        "snapshotter",
        "provisioner",
        "resizer",
        "attacher",
        "capacity",
        "registration",
        "liveness",
    }


async def test_central_loops_under_leader_election(api: FakeKubeAPI, tmp_path: Any) -> None:
    peer = VolumeCSI()
    async with served(peer, str(tmp_path / "csi.sock")) as endpoint:
        args = parse(
            "--controllers", "provisioner,resizer,attacher,capacity,registration,liveness",
            "--leader-election", "--leader-election-namespace", "csi",
            "--leader-election-lease-duration", "2", "--leader-election-renew-deadline", "1.5",
            "--leader-election-retry-period", "0.1",
            "--plugin-registry-dir", str(tmp_path / "registry"),
            "--kubelet-registration-path", "/var/lib/kubelet/plugins/x/csi.sock",
            "--health-address", "127.0.0.1", "--health-port", "0", *FAST,
        )  # fmt: skip
        async with running(ClusterSim(api)), cli_running(args, endpoint, api, limit=30):
            await make_class(api)
            await make_claim(api)
            await eventually(lambda: bound(api), "claim bound")
            names = {o["metadata"]["name"] for o in api.objects(LEASE)}
            assert names == set(LEASES.values())
            assert os.path.exists(tmp_path / "registry" / f"{DRIVER}-reg.sock")
        assert not os.path.exists(tmp_path / "registry" / f"{DRIVER}-reg.sock")


async def test_per_node_all_takes_topology_from_node_get_info(api: FakeKubeAPI, tmp_path: Any) -> None:
    peer = VolumeCSI(node_id="node-9")
    async with served(peer, str(tmp_path / "csi.sock")) as endpoint:
        args = parse(
            "--controllers", "provisioner,liveness", "--node-deployment", "--node-name", "node-9",
            "--health-address", "127.0.0.1", "--health-port", "0", *FAST,
        )  # fmt: skip
        async with running(ClusterSim(api)), cli_running(args, endpoint, api, limit=30):
            await make_class(api, binding="WaitForFirstConsumer")
            await make_claim(api, "mine", node="node-9")
            await make_claim(api, "theirs", node="node-3")
            await eventually(lambda: bound(api, "mine"), "own claim bound")
            (pv,) = api.objects(PV)
            (term,) = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
            assert {(e["key"], tuple(e["values"])) for e in term["matchExpressions"]} == {
                (TOPO_KEY, ("node-9",)),
                ("kubernetes.io/hostname", ("node-9",)),
            }
            assert not bound(api, "theirs")
            assert api.objects(LEASE) == []  # per-node loops need no election
            assert api.peek(PVC, "theirs", "default") is not None


async def test_liveness_served_by_the_cli(api: FakeKubeAPI, tmp_path: Any, unused_tcp_port: int) -> None:
    peer = VolumeCSI()
    async with served(peer, str(tmp_path / "csi.sock")) as endpoint:
        args = parse(
            "--controllers", "liveness",
            "--health-address", "127.0.0.1", "--health-port", str(unused_tcp_port),
        )  # fmt: skip
        async with cli_running(args, endpoint, api, limit=30):
            await eventually(lambda: _listening(unused_tcp_port), "listening")
            assert await http_get(unused_tcp_port) == (200, "ok")
            peer.ready = False
            assert (await http_get(unused_tcp_port))[0] == 500


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Partitionable:
    """One replica's view of the API: its Lease requests fail while `cut` is set."""

    def __init__(self, inner: FakeKubeAPI) -> None:
        self.inner = inner
        self.cut = False

    def with_agent(self, agent: str) -> Partitionable:
        """Tagged per loop and for the Lease by `Clients`: the same view (the cut must hold for all)."""
        return self

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in ("get", "create", "update", "patch"):
            return attr

        async def call(res: Any, *a: Any, **kw: Any) -> Any:
            if self.cut and res == LEASE:
                raise ApiError(503, "ServiceUnavailable", "partitioned")
            return await attr(res, *a, **kw)

        return call


async def test_leader_hand_over_mid_create_volume(api: FakeKubeAPI, tmp_path: Any) -> None:
    """Replica A loses its Lease while CreateVolume is in flight; B takes over: one volume, one PV."""
    peer = VolumeCSI()
    async with served(peer, str(tmp_path / "csi.sock")) as endpoint:

        def args(identity: str) -> argparse.Namespace:
            return parse(
                "--controllers", "provisioner", "--leader-election", "--leader-election-namespace", "csi",
                "--leader-election-identity", identity,
                "--leader-election-lease-duration", "0.6", "--leader-election-renew-deadline", "0.4",
                "--leader-election-retry-period", "0.05", *FAST,
            )  # fmt: skip

        view_a, view_b = Partitionable(api), Partitionable(api)
        sim_tasks = await run_tasks(ClusterSim(api))
        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        gate = peer.hold("CreateVolume")
        replicas = [
            asyncio.create_task(run_controllers(args("a"), endpoint, stop_a, connect=lambda _: view_a))
        ]
        try:
            await eventually(lambda: api.objects(LEASE), "A leads")
            replicas.append(
                asyncio.create_task(run_controllers(args("b"), endpoint, stop_b, connect=lambda _: view_b))
            )
            await make_class(api)
            await make_claim(api)
            await eventually(lambda: peer.calls["CreateVolume"] >= 1, "A's CreateVolume in flight")
            (lease,) = api.objects(LEASE)
            assert lease["spec"]["holderIdentity"] == "a"
            view_a.cut = True  # A can no longer renew: it stops its loops, B takes the Lease
            await eventually(
                lambda: (api.objects(LEASE) or [{}])[0].get("spec", {}).get("holderIdentity") == "b",
                "B leads",
            )
            await eventually(lambda: peer.calls["CreateVolume"] >= 2, "B asks again")
            gate.set()
            await eventually(lambda: bound(api), "claim bound")
            await asyncio.sleep(0.3)
            assert len(peer.volumes) == 1 and len(api.objects(PV)) == 1
            assert {r.name for r in peer.requests["CreateVolume"]} == {api.objects(PV)[0]["metadata"]["name"]}
        finally:
            gate.set()
            stop_a.set()
            stop_b.set()
            await asyncio.wait_for(asyncio.gather(*replicas, return_exceptions=True), 30)
            await stop_tasks(sim_tasks)


async def test_all_runs_the_attacher_only_for_drivers_that_publish(api: FakeKubeAPI, tmp_path: Any) -> None:
    peer = VolumeCSI()
    async with served(peer, str(tmp_path / "csi.sock")) as endpoint:
        for caps, controllers, expected in (
            ({"PUBLISH_UNPUBLISH_VOLUME"}, "all", True),
            (set(), "all", False),
            (set(), "attacher", True),
        ):
            peer.controller_caps = {"CREATE_DELETE_VOLUME", *caps}
            args = parse("--controllers", controllers)
            client = CSIClient(endpoint)
            info = await client.driver_info()
            ctx = loop_context(args, api, client, info)
            try:
                plans = await registry.build(ctx, selected(args) - {"registration", "liveness"})
            finally:
                await ctx.clients.close()
                await client.close()
            assert any(isinstance(p.loop, Attacher) for p in plans) is expected, (caps, controllers)


async def test_capacity_only_for_late_binding_classes_unless_asked(
    api: FakeKubeAPI, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--capacity-for-immediate-binding (or its env default) reaches the tracker; off by default."""
    peer = VolumeCSI()
    async with served(peer, str(tmp_path / "csi.sock")) as endpoint:
        client = CSIClient(endpoint)
        info = await client.driver_info()
        try:
            for argv, env, expected in (
                ((), None, False),
                (("--capacity-for-immediate-binding",), None, True),
                ((), "true", True),
                (("--no-capacity-for-immediate-binding",), "true", False),
            ):
                if env is None:
                    monkeypatch.delenv("CSI_KIT_CAPACITY_FOR_IMMEDIATE_BINDING", raising=False)
                else:
                    monkeypatch.setenv("CSI_KIT_CAPACITY_FOR_IMMEDIATE_BINDING", env)
                ctx = loop_context(parse("--controllers", "capacity", *argv), api, client, info)
                (plan,) = await capacity.build(ctx)
                await ctx.clients.close()
                assert isinstance(plan.loop, CapacityTracker) and plan.lease == LEASES["capacity"]
                assert plan.loop.immediate_binding is expected, (argv, env)
        finally:
            await client.close()


async def test_a_service_that_cannot_start_ends_the_run(api: FakeKubeAPI, tmp_path: Any) -> None:
    """/healthz on a port already taken: run_controllers fails with the bind error instead of running on."""
    import socket

    peer = VolumeCSI()
    async with served(peer, str(tmp_path / "csi.sock")) as endpoint:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            args = parse(
                "--controllers", "provisioner,liveness",
                "--health-address", "127.0.0.1", "--health-port", str(port), *FAST,
            )  # fmt: skip
            run = run_controllers(args, endpoint, asyncio.Event(), connect=lambda a: api)
            with pytest.raises(OSError):
                await asyncio.wait_for(run, 30)
