"""Capacity tracking on the fake API against a scripted driver's GetCapacity."""

from __future__ import annotations

from typing import Any

import pytest
from volume_peer import (
    TOPO_KEY,
    GiB,
    VolumeCSI,
    eventually,
    make_class,
    make_node,
    run_tasks,
    stop_tasks,
)

from csi_kit.k8s.objects.quantity import parse_quantity
from csi_kit.k8s.objects.resources import CSI_STORAGE_CAPACITY, STORAGE_CLASS
from csi_kit.k8s.runtime.api import Obj
from csi_kit.k8s.runtime.csi import CSIClient
from csi_kit.k8s.volume.capacity import LABEL_DRIVER, LABEL_MANAGED_BY, CapacityTracker
from csi_kit.testing.fake_k8s import FakeKubeAPI

LATE = "WaitForFirstConsumer"


@pytest.fixture
def peer_client(volume_csi: VolumeCSI, csi_client: CSIClient) -> tuple[VolumeCSI, CSIClient]:
    return volume_csi, csi_client


def objects(api: FakeKubeAPI) -> dict[tuple[str, str], Obj]:
    return {
        (o["storageClassName"], ((o.get("nodeTopology") or {}).get("matchLabels") or {}).get(TOPO_KEY, "")): o
        for o in api.objects(CSI_STORAGE_CAPACITY)
    }


def capacity_of(api: FakeKubeAPI, cls: str, node: str) -> int | None:
    o = objects(api).get((cls, node))
    return parse_quantity(o["capacity"]) if o else None


async def test_per_node_tracking_publishes_updates_and_removes(
    api: FakeKubeAPI, peer_client: tuple[VolumeCSI, CSIClient]
) -> None:
    peer, client = peer_client
    peer.capacity = {"node-a": 10 * GiB}
    await make_class(api, "fast", binding=LATE, params={"tier": "1", "csi.storage.k8s.io/fstype": "xfs"})
    await make_class(api, "theirs", binding=LATE, driver="other.example.com")
    tracker = CapacityTracker(
        api,
        client,
        await client.driver_info(),
        "csi-kit",
        node_name="node-a",
        node_topology={TOPO_KEY: "node-a"},
        poll_interval=0.05,
        base_delay=0.01,
        max_delay=0.05,
    )
    tasks = await run_tasks(tracker)
    try:
        await eventually(lambda: capacity_of(api, "fast", "node-a") == 10 * GiB, "published")
        (obj,) = api.objects(CSI_STORAGE_CAPACITY)
        assert obj["metadata"]["namespace"] == "csi-kit" and obj["metadata"]["name"].startswith("csisc-")
        assert obj["metadata"]["labels"] == {
            LABEL_DRIVER: "vol.csi-kit.io",
            LABEL_MANAGED_BY: "external-provisioner-node-a",
        }
        assert parse_quantity(obj["maximumVolumeSize"]) == 5 * GiB
        assert dict(peer.requests["GetCapacity"][0].parameters) == {"tier": "1"}
        peer.capacity["node-a"] = 4 * GiB
        await eventually(lambda: capacity_of(api, "fast", "node-a") == 4 * GiB, "updated by the poll")
        assert len(api.objects(CSI_STORAGE_CAPACITY)) == 1
        await api.delete(STORAGE_CLASS, "fast")
        await eventually(lambda: not api.objects(CSI_STORAGE_CAPACITY), "removed with the class")
    finally:
        await stop_tasks(tasks)


async def test_central_tracking_covers_every_registered_node(
    api: FakeKubeAPI, peer_client: tuple[VolumeCSI, CSIClient]
) -> None:
    peer, client = peer_client
    peer.capacity = {"node-a": 1 * GiB, "node-b": 2 * GiB}
    await make_class(api, "fast", binding=LATE)
    await make_class(api, "slow", binding=LATE)
    await make_node(api, "node-a")
    await make_node(api, "node-b")
    tracker = CapacityTracker(
        api,
        client,
        await client.driver_info(),
        "csi-kit",
        poll_interval=3600,
        base_delay=0.01,
        max_delay=0.05,
    )
    tasks = await run_tasks(tracker)
    try:
        await eventually(lambda: len(api.objects(CSI_STORAGE_CAPACITY)) == 4, "four objects")
        assert capacity_of(api, "slow", "node-b") == 2 * GiB and capacity_of(api, "fast", "node-a") == GiB
        # A stray duplicate (e.g. from a crashed run) is cleaned up.
        dup = dict(objects(api)[("fast", "node-a")])
        dup["metadata"] = {"name": "csisc-dup", "namespace": "csi-kit", "labels": dup["metadata"]["labels"]}
        await api.create(CSI_STORAGE_CAPACITY, dup)
        await eventually(lambda: len(api.objects(CSI_STORAGE_CAPACITY)) == 4, "duplicate removed")
    finally:
        await stop_tasks(tasks)


async def test_immediate_classes_only_when_asked_and_removed_when_no_longer_eligible(
    api: FakeKubeAPI, peer_client: tuple[VolumeCSI, CSIClient]
) -> None:
    """As upstream: WaitForFirstConsumer classes by default, Immediate ones with the option."""
    peer, client = peer_client
    peer.capacity = {"node-a": 3 * GiB}
    await make_class(api, "late", binding=LATE, params={"tier": "late"})
    await make_class(api, "now", binding="Immediate", params={"tier": "now"})
    info = await client.driver_info()

    async def tracked(**kw: Any) -> list[Any]:
        tracker = CapacityTracker(
            api,
            client,
            info,
            "csi-kit",
            node_name="node-a",
            node_topology={TOPO_KEY: "node-a"},
            poll_interval=0.02,
            base_delay=0.01,
            max_delay=0.05,
            **kw,
        )
        return await run_tasks(tracker)

    def asked(tier: str) -> int:
        return sum(1 for r in peer.requests.get("GetCapacity", []) if dict(r.parameters) == {"tier": tier})

    tasks = await tracked()
    try:
        # Several polls, each a full pass over the classes: the Immediate one is never asked about.
        await eventually(lambda: asked("late") >= 3, "polled")
        assert asked("now") == 0
        assert set(objects(api)) == {("late", "node-a")}
    finally:
        await stop_tasks(tasks)

    tasks = await tracked(capacity_for_immediate_binding=True)
    try:
        await eventually(lambda: set(objects(api)) == {("late", "node-a"), ("now", "node-a")}, "both")
        assert capacity_of(api, "now", "node-a") == 3 * GiB
    finally:
        await stop_tasks(tasks)

    # Without the option again (e.g. a restart with the flag removed), the Immediate class's
    # object goes, the other stays.
    late = objects(api)[("late", "node-a")]
    tasks = await tracked()
    try:
        await eventually(lambda: set(objects(api)) == {("late", "node-a")}, "the Immediate class's removed")
        assert objects(api)[("late", "node-a")]["metadata"]["name"] == late["metadata"]["name"]
    finally:
        await stop_tasks(tasks)
