"""Crash and hand-over: state must come back from the API objects alone.

The loops are killed right when they attempt their N-th write (the write
does not happen), for every N along the whole create-to-delete path, then
started again from nothing.  Whatever step was interrupted, the end state is
the same: the snapshot became ready, exactly one backend snapshot was cut,
and after deletion nothing is left -- in the API or on the backend.
"""

from __future__ import annotations

import asyncio

import pytest
from csi_peer import ScriptedCSI
from k8s_helpers import (
    DRIVER,
    Crash,
    Loops,
    RestartOnCrash,
    as_user,
    contents,
    eventually,
    is_ready,
    make_class,
    make_snapshot,
    make_volume,
    request_snapshot,
    snapshot,
)

from csi_kit.k8s.objects.resources import PVC, VOLUME_SNAPSHOT, VOLUME_SNAPSHOT_CONTENT
from csi_kit.k8s.runtime.api import conflict
from csi_kit.testing.fake_k8s import FakeKubeAPI


async def run_flow(
    api: FakeKubeAPI, csi: ScriptedCSI, endpoint: str, crash: Crash, flow: str = "delete"
) -> None:
    """One snapshot through its whole life; `flow` is delete, retain or pre-provisioned."""
    lp = Loops(api, endpoint)
    api.reactors.append(crash)
    await lp.start()
    try:
        until = RestartOnCrash(lp, crash).until
        if flow == "pre-provisioned":
            csi.add_existing("existing")
            await as_user(
                api.create,
                VOLUME_SNAPSHOT_CONTENT,
                {
                    "metadata": {"name": "pre-content"},
                    "spec": {
                        "deletionPolicy": "Delete",
                        "driver": DRIVER,
                        "source": {"snapshotHandle": "existing"},
                        "volumeSnapshotRef": {"name": "snap", "namespace": "default"},
                    },
                },
            )
            await as_user(
                api.create,
                VOLUME_SNAPSHOT,
                {
                    "metadata": {"name": "snap", "namespace": "default"},
                    "spec": {"source": {"volumeSnapshotContentName": "pre-content"}},
                },
            )
        else:
            await as_user(request_snapshot, api, policy="Retain" if flow == "retain" else "Delete")
        await until(lambda: is_ready(api), "ready", limit=30)
        await as_user(api.delete, VOLUME_SNAPSHOT, "snap", "default")
        if flow == "retain":
            await until(lambda: snapshot(api) is None, "snapshot gone", limit=30)
            [c] = contents(api)
            await as_user(api.delete, VOLUME_SNAPSHOT_CONTENT, c["metadata"]["name"])
        await until(lambda: snapshot(api) is None and not contents(api), "gone", limit=30)
    finally:
        await lp.stop()


WRITES_PER_FLOW = {"delete": 11, "retain": 10, "pre-provisioned": 9}


@pytest.mark.parametrize("flow", sorted(WRITES_PER_FLOW))
async def test_flow_without_crash_counts_the_writes(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], flow: str
) -> None:
    csi, endpoint = peer
    counter = Crash(at=10**9)
    await run_flow(api, csi, endpoint, counter, flow)
    # The crash parametrisation below must cover every write of each flow.
    assert counter.writes == WRITES_PER_FLOW[flow], counter.writes
    assert len(csi.snapshots) == (1 if flow == "retain" else 0)


@pytest.mark.parametrize(
    ("flow", "at"), [(flow, at) for flow, n in sorted(WRITES_PER_FLOW.items()) for at in range(1, n + 1)]
)
async def test_crash_at_every_write_of_every_flow(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], flow: str, at: int
) -> None:
    csi, endpoint = peer
    await run_flow(api, csi, endpoint, Crash(at), flow)
    assert not contents(api) and snapshot(api) is None
    if flow == "retain":
        assert len(csi.snapshots) == 1 and csi.calls["DeleteSnapshot"] == 0, "Retain keeps the storage"
    else:
        assert csi.snapshots == {}, "nothing leaked on the backend"
    if flow != "pre-provisioned":
        assert len(csi.names) == 1, f"one backend snapshot name, got {csi.names}"
        pvc = api.peek(PVC, "data", "default")
        assert pvc is not None and not pvc["metadata"].get("finalizers"), "PVC released"
    else:
        assert csi.calls["CreateSnapshot"] == 0


async def test_restart_while_create_snapshot_in_flight(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    csi, endpoint = peer
    csi.create_gate = asyncio.Event()
    lp = Loops(api, endpoint)
    await lp.start()
    try:
        await request_snapshot(api)
        await eventually(lambda: csi.create_started.is_set(), "CreateSnapshot sent")
        await lp.stop()  # the process dies with the call in flight; the driver finishes it anyway
        csi.create_gate.set()
        await lp.start()
        await eventually(lambda: is_ready(api), "ready after restart")
        assert len(csi.snapshots) == 1, "the retried CreateSnapshot reused the same name"
    finally:
        await lp.stop()


async def test_watch_expiry_relists_and_converges(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    await make_volume(api)
    await make_class(api)
    api.expire_watches()
    await make_snapshot(api)
    await eventually(lambda: is_ready(api), "ready after re-list")
    assert loops.controller is not None and loops.controller.snapshots.relists >= 1
    assert loops.snapshotter is not None and loops.snapshotter.contents.relists >= 1


async def test_conflicts_are_retried(api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops) -> None:
    api.fail("patch", VOLUME_SNAPSHOT, conflict("the object has been modified"), times=3)
    api.fail("patch", PVC, conflict("the object has been modified"), times=2)
    await request_snapshot(api)
    await eventually(lambda: is_ready(api), "ready despite conflicts")
    s = snapshot(api)
    assert s is not None and len(s["metadata"]["finalizers"]) == 2
