"""The volume loops as `csi-kit serve/controllers --controllers ...` runs them."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from test_liveness import http_get
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

from csi_kit.k8s.api import LEASE, PV, PVC
from csi_kit.k8s.cli import add_controller_options, run_controllers, selected
from csi_kit.k8s.volume_cli import lease_names
from csi_kit.testing.fake_k8s import FakeKubeAPI


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_controller_options(parser)
    return parser.parse_args(list(argv))


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
    assert lease_names("hostpath.csi.k8s.io") == {
        "provisioner": "hostpath-csi-k8s-io",
        "resizer": "external-resizer-hostpath-csi-k8s-io",
        "attacher": "external-attacher-leader-hostpath-csi-k8s-io",
        "capacity": "hostpath-csi-k8s-io-capacity",
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
        sim = ClusterSim(api)
        sim_tasks = await run_tasks(sim)
        stop = asyncio.Event()
        task = asyncio.create_task(run_controllers(args, endpoint, stop, connect=lambda a: api))
        try:
            await make_class(api)
            await make_claim(api)
            await eventually(lambda: bound(api), "claim bound")
            names = {o["metadata"]["name"] for o in api.objects(LEASE)}
            assert names == set(lease_names(DRIVER).values())
            assert os.path.exists(tmp_path / "registry" / f"{DRIVER}-reg.sock")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await stop_tasks(sim_tasks)
        assert not os.path.exists(tmp_path / "registry" / f"{DRIVER}-reg.sock")


async def test_per_node_all_takes_topology_from_node_get_info(api: FakeKubeAPI, tmp_path: Any) -> None:
    peer = VolumeCSI(node_id="node-9")
    async with served(peer, str(tmp_path / "csi.sock")) as endpoint:
        args = parse(
            "--controllers", "provisioner,liveness", "--node-deployment", "--node-name", "node-9",
            "--health-address", "127.0.0.1", "--health-port", "0", *FAST,
        )  # fmt: skip
        sim = ClusterSim(api)
        sim_tasks = await run_tasks(sim)
        stop = asyncio.Event()
        task = asyncio.create_task(run_controllers(args, endpoint, stop, connect=lambda a: api))
        try:
            await make_class(api, binding="WaitForFirstConsumer")
            await make_claim(api, "mine", node="node-9")
            await make_claim(api, "theirs", node="node-3")
            await eventually(lambda: bound(api, "mine"), "own claim bound")
            (pv,) = api.objects(PV)
            expr = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
            assert (expr["key"], expr["values"]) == (TOPO_KEY, ["node-9"])
            assert not bound(api, "theirs")
            assert api.objects(LEASE) == []  # per-node loops need no election
            assert api.peek(PVC, "theirs", "default") is not None
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await stop_tasks(sim_tasks)


async def test_liveness_served_by_the_cli(api: FakeKubeAPI, tmp_path: Any, unused_tcp_port: int) -> None:
    peer = VolumeCSI()
    async with served(peer, str(tmp_path / "csi.sock")) as endpoint:
        args = parse(
            "--controllers", "liveness",
            "--health-address", "127.0.0.1", "--health-port", str(unused_tcp_port),
        )  # fmt: skip
        stop = asyncio.Event()
        task = asyncio.create_task(run_controllers(args, endpoint, stop, connect=lambda a: api))
        try:
            await eventually(lambda: _listening(unused_tcp_port), "listening")
            assert await http_get(unused_tcp_port) == (200, "ok")
            peer.ready = False
            assert (await http_get(unused_tcp_port))[0] == 500
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
