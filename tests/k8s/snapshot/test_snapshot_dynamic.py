"""Dynamic snapshots end to end on the fake API, against a CSI driver over gRPC."""

from __future__ import annotations

import asyncio

import pytest
from csi_peer import ScriptedCSI
from k8s_helpers import (
    Loops,
    contents,
    eventually,
    is_ready,
    ready_snapshot,
    request_snapshot,
    settle,
    snapshot,
)

from csi_kit.k8s.objects.resources import PVC, VOLUME_SNAPSHOT, VOLUME_SNAPSHOT_CONTENT
from csi_kit.k8s.snapshot import controller as controller_module
from csi_kit.k8s.snapshot import protocol as p
from csi_kit.testing.fake_k8s import FakeKubeAPI


async def test_dynamic_snapshot_binds_and_becomes_ready(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    csi, _ = peer
    snap = await ready_snapshot(api)
    await settle(api)

    s = snapshot(api)
    assert s is not None
    name = "snapcontent-" + snap["metadata"]["uid"]
    assert s["status"]["boundVolumeSnapshotContentName"] == name
    assert s["status"]["restoreSize"] == "1Gi"
    assert s["status"]["creationTime"].endswith("Z")
    assert s["spec"]["volumeSnapshotClassName"] == "csi-snap"  # the default class is recorded
    assert set(s["metadata"]["finalizers"]) == {p.SNAPSHOT_AS_SOURCE_FINALIZER, p.SNAPSHOT_BOUND_FINALIZER}

    c = api.peek(VOLUME_SNAPSHOT_CONTENT, name)
    assert c is not None
    ref = c["spec"]["volumeSnapshotRef"]
    assert (ref["name"], ref["namespace"], ref["uid"]) == ("snap", "default", snap["metadata"]["uid"])
    assert c["spec"]["source"] == {"volumeHandle": "vol-data"}
    assert c["spec"]["deletionPolicy"] == "Delete"
    assert c["metadata"]["finalizers"] == [p.CONTENT_BOUND_FINALIZER]
    assert p.ANN_BEING_CREATED not in (c["metadata"].get("annotations") or {})
    assert c["status"]["snapshotHandle"] == "snap-snapshot-" + snap["metadata"]["uid"]
    assert c["status"]["readyToUse"] is True
    assert c["status"]["restoreSize"] == 1 << 30

    # The PVC was protected while the snapshot was cut, and released afterwards.
    pvc = api.peek(PVC, "data", "default")
    assert pvc is not None and p.PVC_AS_SOURCE_FINALIZER not in (pvc["metadata"].get("finalizers") or [])
    assert csi.calls["CreateSnapshot"] == 1


async def test_status_is_written_once_when_the_snapshotter_answers_at_once(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    """Bound, creationTime, restoreSize and readyToUse reach the snapshot in one status write."""
    await ready_snapshot(api)
    await settle(api)
    assert api.requests[("patch_status", VOLUME_SNAPSHOT.plural)] == 1
    s = snapshot(api)
    assert s is not None and s["status"]["boundVolumeSnapshotContentName"].startswith("snapcontent-")


async def test_bound_status_appears_when_the_snapshotter_is_slow(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The held-back status write is bounded: a snapshot whose cut takes long is shown bound, not ready."""
    monkeypatch.setattr(controller_module, "BOUND_STATUS_GRACE", 0.2)
    csi, _ = peer
    csi.create_gate = asyncio.Event()
    snap = await request_snapshot(api)
    await eventually(lambda: csi.create_started.is_set(), "CreateSnapshot sent")
    name = "snapcontent-" + snap["metadata"]["uid"]
    await eventually(
        lambda: (snapshot(api) or {}).get("status", {}).get("boundVolumeSnapshotContentName") == name,
        "bound while the driver is still cutting",
    )
    assert not is_ready(api)
    csi.create_gate.set()
    await eventually(lambda: is_ready(api), "ready once the driver answered")


async def test_delete_policy_deletes_backend_snapshot_and_objects(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    csi, _ = peer
    await ready_snapshot(api)
    handle = contents(api)[0]["status"]["snapshotHandle"]
    await api.delete(VOLUME_SNAPSHOT, "snap", "default")
    await eventually(lambda: snapshot(api) is None and not contents(api), "snapshot and content gone")
    assert csi.deleted == [handle]
    assert csi.snapshots == {}


async def test_retain_policy_keeps_content_and_backend_snapshot(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    csi, _ = peer
    await ready_snapshot(api, policy="Retain")
    s = snapshot(api)
    assert s is not None and s["metadata"]["finalizers"] == [p.SNAPSHOT_AS_SOURCE_FINALIZER]
    await api.delete(VOLUME_SNAPSHOT, "snap", "default")
    await eventually(lambda: snapshot(api) is None, "snapshot gone")
    await settle(api)
    [c] = contents(api)
    assert c["metadata"]["annotations"][p.ANN_BEING_DELETED] == "yes"
    assert "deletionTimestamp" not in c["metadata"]
    assert csi.calls["DeleteSnapshot"] == 0 and len(csi.snapshots) == 1

    # Deleting the retained content releases the object but never the storage.
    await api.delete(VOLUME_SNAPSHOT_CONTENT, c["metadata"]["name"])
    await eventually(lambda: not contents(api), "content gone")
    assert csi.calls["DeleteSnapshot"] == 0 and len(csi.snapshots) == 1


async def test_snapshot_used_as_restore_source_is_kept_until_the_pvc_is_provisioned(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    await ready_snapshot(api)
    restore = await api.create(
        PVC,
        {
            "metadata": {"name": "restored", "namespace": "default"},
            "spec": {"dataSource": {"apiGroup": p.GROUP, "kind": "VolumeSnapshot", "name": "snap"}},
        },
    )
    restore["status"] = {"phase": "Pending"}
    restore = await api.update_status(PVC, restore)
    await api.delete(VOLUME_SNAPSHOT, "snap", "default")
    await settle(api)
    s = snapshot(api)
    assert s is not None and s["metadata"]["deletionTimestamp"] and len(contents(api)) == 1
    restore["status"] = {"phase": "Bound"}
    await api.update_status(PVC, restore)
    await eventually(lambda: snapshot(api) is None and not contents(api), "deleted once the restore is done")


async def test_metrics_record_syncs_and_queue(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    from prometheus_client import REGISTRY

    def count(loop: str, op: str) -> float:
        v = REGISTRY.get_sample_value(
            "csi_kit_k8s_operation_seconds_count", {"loop": loop, "operation": op, "status": "ok"}
        )
        return v or 0.0

    before = count("snapshot-controller", "snapshot"), count("snapshotter", "content")
    await ready_snapshot(api)
    assert count("snapshot-controller", "snapshot") > before[0]
    assert count("snapshotter", "content") > before[1]
    assert REGISTRY.get_sample_value("csi_kit_k8s_operations_in_flight", {"loop": "snapshotter"}) is not None


async def test_events_when_enabled_once_per_reason(api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]) -> None:
    import grpc

    from csi_kit.k8s.objects.resources import EVENT
    from csi_kit.k8s.runtime.events import EventRecorder

    csi, endpoint = peer
    csi.create_errors = [(grpc.StatusCode.INTERNAL, "disk on fire")] * 3
    recorder = EventRecorder(api, "csi-kit-test")
    lp = Loops(api, endpoint, controller={"events": recorder}, snapshotter={"events": recorder})
    await lp.start()
    try:
        await ready_snapshot(api)
        await settle(api)
        await recorder.flush()
    finally:
        await lp.stop()
    events = api.objects(EVENT)
    on_snapshot = [
        (e["type"], e["reason"]) for e in events if e["involvedObject"]["kind"] == "VolumeSnapshot"
    ]
    assert ("Normal", "CreatingSnapshot") in on_snapshot
    assert ("Normal", "SnapshotCreated") in on_snapshot and ("Normal", "SnapshotReady") in on_snapshot
    warnings = [
        e for e in events if e["type"] == "Warning" and e["involvedObject"]["kind"] == "VolumeSnapshotContent"
    ]
    assert len(warnings) == 1, "three identical failures, one Event"
    assert warnings[0]["metadata"]["namespace"] == "default" and "disk on fire" in warnings[0]["message"]
