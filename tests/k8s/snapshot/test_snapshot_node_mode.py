"""Distributed snapshotting: each node's snapshotter handles only the contents of its own volumes."""

from __future__ import annotations

from typing import Any

from csi_peer import ScriptedCSI
from k8s_helpers import (
    DRIVER,
    contents,
    eventually,
    is_ready,
    make_class,
    make_snapshot,
    make_volume,
    running,
)

from csi_kit.k8s.runtime.csi import CSIClient, SnapshotInfo
from csi_kit.k8s.snapshot import protocol as p
from csi_kit.k8s.snapshot.controller import SnapshotController
from csi_kit.k8s.snapshot.snapshotter import Snapshotter
from csi_kit.testing.fake_k8s import FakeKubeAPI


class Counting:
    """The node's view of the driver: counts what this node's snapshotter asked for."""

    def __init__(self, client: CSIClient) -> None:
        self.client = client
        self.created: list[str] = []

    async def create_snapshot(self, volume: str, name: str, params: Any, secrets: Any) -> SnapshotInfo:
        self.created.append(volume)
        return await self.client.create_snapshot(volume, name, params, secrets)

    async def delete_snapshot(self, snapshot_id: str, secrets: Any) -> None:
        await self.client.delete_snapshot(snapshot_id, secrets)

    async def list_snapshots(self, **kw: Any) -> list[SnapshotInfo]:
        return await self.client.list_snapshots(**kw)


async def test_contents_are_labelled_and_handled_by_their_node(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    _, endpoint = peer
    client = CSIClient(endpoint)
    node_a, node_b = Counting(client), Counting(client)
    fast: dict[str, Any] = {"base_delay": 0.01, "max_delay": 0.05}
    loops = [
        SnapshotController(api, distributed=True, **fast),
        Snapshotter(api, node_a, DRIVER, node_name="node-a", **fast),
        Snapshotter(api, node_b, DRIVER, node_name="node-b", **fast),
    ]
    try:
        async with running(*loops):
            await make_class(api)
            await make_volume(api, "on-a", node="node-a")
            await make_volume(api, "on-b", node="node-b")
            await make_snapshot(api, "snap-a", pvc="on-a")
            await make_snapshot(api, "snap-b", pvc="on-b")
            await eventually(lambda: is_ready(api, "snap-a") and is_ready(api, "snap-b"), "both ready")
            labels = {
                c["spec"]["source"]["volumeHandle"]: c["metadata"]["labels"][p.LABEL_MANAGED_BY]
                for c in contents(api)
            }
            assert labels == {"vol-on-a": "node-a", "vol-on-b": "node-b"}
            assert node_a.created == ["vol-on-a"] and node_b.created == ["vol-on-b"]
    finally:
        await client.close()
