"""The engine over the real socket: idempotency, per-key locks (ABORTED, no
global lock, cancellation never releases a lock early), rollback of half-made
volumes, topology, and the start-up reconciliation of store and backend."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from helpers import Csi, Gate, GatedHostPath, create_req, expect, mount_cap, short_dir, tree

from csi_kit._core.engine import VolumeEngine
from csi_kit._core.store import Store
from csi_kit._pb import csi_pb2 as pb
from csi_kit.backend import BackendContext
from csi_kit.errors import Internal, ResourceExhausted
from csi_kit.testing.driver import running_driver
from csi_kit.types import (
    CapacityRange,
    ContentSource,
    CreatedVolume,
    Snapshot,
    Volume,
    VolumeCapability,
    VolumeRequest,
)
from csi_kit_backends.hostpath import backend as hostpath_module
from csi_kit_backends.hostpath.backend import HostPathBackend, HostPathConfig

MiB = 1 << 20
ALREADY = grpc.StatusCode.ALREADY_EXISTS
ABORTED = grpc.StatusCode.ABORTED
PVC = "csi.storage.k8s.io/pvc/name"


@pytest.fixture
def state() -> Iterator[str]:
    with short_dir() as d:
        yield d


@pytest.fixture
def csi(state: str) -> Iterator[Csi]:
    with running_driver(state) as ep, Csi(ep) as c:
        yield c


def rows(state: str, table: str) -> list[tuple[str, str, str]]:
    """(id, name, state) of every row, read straight from the driver's SQLite file."""
    db = sqlite3.connect(f"file:{os.path.join(state, 'state.db')}?mode=ro", uri=True)
    try:
        return list(db.execute(f"SELECT id, name, state FROM {table} ORDER BY seq"))
    finally:
        db.close()


def volume_dirs(state: str) -> set[str]:
    return set(os.listdir(os.path.join(state, "hostpath", "volumes")))


def incoming(state: str) -> list[str]:
    return os.listdir(os.path.join(state, "hostpath", ".incoming"))


def retry_aborted(call: Any, request: Any, attempts: int = 600) -> Any:
    """Repeat a call while it answers ABORTED (what a CO does), return its answer."""
    for _ in range(attempts):
        try:
            return call(request, timeout=30)
        except grpc.RpcError as e:
            if e.code() != ABORTED:
                raise
        time.sleep(0.05)
    raise AssertionError("still ABORTED")


# -- idempotency ---------------------------------------------------------------------------


def test_same_name_same_request_same_volume(csi: Csi, state: str) -> None:
    first = csi.create("idem", required=4 * MiB, params={PVC: "a"})
    again = csi.create("idem", required=4 * MiB, params={PVC: "a"})
    assert again == first
    assert volume_dirs(state) == {first.volume_id}
    assert [r[1] for r in rows(state, "volumes")] == ["idem"]


def test_smaller_compatible_request_returns_the_same_volume(csi: Csi) -> None:
    first = csi.create("compat", required=4 * MiB)
    assert csi.create("compat", required=2 * MiB, limit=8 * MiB).volume_id == first.volume_id


def test_same_name_larger_size_already_exists(csi: Csi) -> None:
    csi.create("size", required=4 * MiB)
    expect(
        ALREADY, csi.controller.CreateVolume, create_req("size", required=8 * MiB), "size", "required_bytes"
    )
    expect(ALREADY, csi.controller.CreateVolume, create_req("size", limit=2 * MiB), "limit_bytes")


def test_same_name_other_parameters_already_exists(csi: Csi) -> None:
    csi.create("params", params={PVC: "a"})
    expect(ALREADY, csi.controller.CreateVolume, create_req("params", params={PVC: "b"}), "parameters")
    expect(ALREADY, csi.controller.CreateVolume, create_req("params"), "parameters")


def test_same_name_other_source_already_exists(csi: Csi, state: str) -> None:
    src = csi.create("src")
    snap = csi.snapshot("src-snap", src.volume_id)
    plain = csi.create("srcs")
    expect(
        ALREADY, csi.controller.CreateVolume, create_req("srcs", snapshot=snap.snapshot_id), "content source"
    )
    restored = csi.create("restored", snapshot=snap.snapshot_id)
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert csi.create("restored", snapshot=snap.snapshot_id).volume_id == restored.volume_id
    expect(
        ALREADY, csi.controller.CreateVolume, create_req("restored", volume=src.volume_id), "content source"
    )
    expect(ALREADY, csi.controller.CreateVolume, create_req("restored"), "content source")
    assert volume_dirs(state) == {src.volume_id, plain.volume_id, restored.volume_id}


def test_snapshot_same_name_same_source_same_snapshot(csi: Csi) -> None:
    vol = csi.create("snapsrc")
    first = csi.snapshot("snap", vol.volume_id)
    assert first.ready_to_use
    assert csi.snapshot("snap", vol.volume_id) == first


def test_snapshot_same_name_other_source_already_exists(csi: Csi) -> None:
    a, b = csi.create("sa"), csi.create("sb")
    csi.snapshot("snap", a.volume_id)
    req = pb.CreateSnapshotRequest(name="snap", source_volume_id=b.volume_id)
    expect(ALREADY, csi.controller.CreateSnapshot, req, "snap", a.volume_id)


def test_deletes_of_unknown_ids_succeed(csi: Csi) -> None:
    csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id="no-such-volume"))
    csi.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="no-such-snapshot"))
    csi.group.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="no-such-group", snapshot_ids=["x"])
    )


def test_delete_twice_succeeds_and_the_volume_is_gone(csi: Csi, state: str) -> None:
    vol = csi.create("twice")
    csi.delete(vol.volume_id)
    csi.delete(vol.volume_id)
    assert volume_dirs(state) == set()
    assert rows(state, "volumes") == []
    expect(
        grpc.StatusCode.NOT_FOUND,
        csi.controller.ControllerGetVolume,
        pb.ControllerGetVolumeRequest(volume_id=vol.volume_id),
    )
    # The name is free again and gets a new volume.
    assert csi.create("twice").volume_id != vol.volume_id


def test_unpublish_of_unknown_target_succeeds(csi: Csi) -> None:
    with short_dir("ck-tg-") as parent:
        target = os.path.join(parent, "never-published")
        csi.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id="no-such-volume", target_path=target)
        )
        assert not os.path.exists(target)


def test_snapshot_of_unknown_volume_is_not_found(csi: Csi, state: str) -> None:
    req = pb.CreateSnapshotRequest(name="orphan", source_volume_id="no-such-volume")
    expect(grpc.StatusCode.NOT_FOUND, csi.controller.CreateSnapshot, req, "no-such-volume")
    assert rows(state, "snapshots") == []


def test_group_snapshot_idempotency(csi: Csi) -> None:
    a, b = csi.create("ga"), csi.create("gb")
    req = pb.CreateVolumeGroupSnapshotRequest(name="grp", source_volume_ids=[a.volume_id, b.volume_id])
    first = csi.group.CreateVolumeGroupSnapshot(req).group_snapshot
    again = pb.CreateVolumeGroupSnapshotRequest(name="grp", source_volume_ids=[b.volume_id, a.volume_id])
    assert csi.group.CreateVolumeGroupSnapshot(again).group_snapshot == first
    other = pb.CreateVolumeGroupSnapshotRequest(name="grp", source_volume_ids=[a.volume_id])
    expect(ALREADY, csi.group.CreateVolumeGroupSnapshot, other, "grp")
    member = first.snapshots[0].snapshot_id
    # A member is deleted with its group, not on its own.
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        csi.controller.DeleteSnapshot,
        pb.DeleteSnapshotRequest(snapshot_id=member),
        "group",
    )
    csi.group.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=first.group_snapshot_id, snapshot_ids=[s.snapshot_id for s in first.snapshots]
        )
    )
    expect(grpc.StatusCode.NOT_FOUND, csi.controller.GetSnapshot, pb.GetSnapshotRequest(snapshot_id=member))


def test_delete_of_a_volume_with_snapshots_keeps_the_snapshots_usable(csi: Csi) -> None:
    vol = csi.create("parent")
    snap = csi.snapshot("child", vol.volume_id)
    csi.delete(vol.volume_id)
    assert csi.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot == snap
    assert csi.create("from-child", snapshot=snap.snapshot_id).volume_id


# -- topology ------------------------------------------------------------------------------------


def test_topology_of_another_node_is_resource_exhausted(csi: Csi, state: str) -> None:
    key = "topology.hostpath.csi-kit.io/node"
    info = csi.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == "node-1"
    assert dict(info.accessible_topology.segments) == {key: "node-1"}
    req = create_req("elsewhere")
    req.accessibility_requirements.requisite.add(segments={key: "node-2"})
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, csi.controller.CreateVolume, req, "node-1")
    assert volume_dirs(state) == set()
    req = create_req("here")
    req.accessibility_requirements.requisite.add(segments={key: "node-2"})
    req.accessibility_requirements.requisite.add(segments={key: "node-1"})
    vol = csi.controller.CreateVolume(req).volume
    assert [dict(t.segments) for t in vol.accessible_topology] == [{key: "node-1"}]


# -- locks ------------------------------------------------------------------------------------------


@pytest.fixture
def gated(state: str) -> Iterator[tuple[Csi, Gate, GatedHostPath]]:
    gate = Gate()
    backend = GatedHostPath(state, gate, gated_names=frozenset({"slow"}))
    try:
        with running_driver(state, backend_object=backend) as ep, Csi(ep) as c:
            yield c, gate, backend
    finally:
        gate.open()


def test_second_operation_on_the_same_name_is_aborted(gated: tuple[Csi, Gate, GatedHostPath]) -> None:
    csi, gate, backend = gated
    first = csi.controller.CreateVolume.future(create_req("slow"), timeout=60)
    assert gate.entered.wait(30)
    details = expect(ABORTED, csi.controller.CreateVolume, create_req("slow"), "slow", "in progress")
    assert "retry" in details
    # An incompatible request for the same name is also told to wait, not answered early.
    expect(ABORTED, csi.controller.CreateVolume, create_req("slow", required=8 * MiB))
    gate.open()
    made = first.result().volume
    assert made.volume_id == gate.ids[0]
    assert csi.create("slow").volume_id == made.volume_id
    assert backend.made == [made.volume_id]


def test_unrelated_volumes_proceed_while_one_is_busy(gated: tuple[Csi, Gate, GatedHostPath]) -> None:
    csi, gate, _ = gated
    first = csi.controller.CreateVolume.future(create_req("slow"), timeout=60)
    assert gate.entered.wait(30)
    # No global lock: other names, snapshots, deletes and reads all complete meanwhile.
    other = csi.create("fast")
    snap = csi.snapshot("fast-snap", other.volume_id)
    clone = csi.create("fast-clone", volume=other.volume_id)
    csi.delete(clone.volume_id)
    assert other.volume_id in csi.list_volume_ids()
    assert snap.snapshot_id in csi.list_snapshot_ids()
    assert not first.done()
    gate.open()
    assert first.result().volume.volume_id == gate.ids[0]


def test_writer_waits_for_readers_of_the_same_volume(state: str) -> None:
    """A snapshot shares its source volume's key; deleting or expanding the
    volume meanwhile is ABORTED, another snapshot of it is not."""
    gate = Gate()

    class SlowSnapshots(HostPathBackend):
        def create_snapshot(self, snapshot_id: str, source: Volume, parameters: Any) -> Any:
            if parameters.get("slow"):
                gate.hold(snapshot_id)
            return super().create_snapshot(snapshot_id, source, parameters)

    backend = SlowSnapshots(HostPathConfig(), BackendContext("hostpath.csi-kit.io", "node-1", state))
    try:
        with running_driver(state, backend_object=backend) as ep, Csi(ep) as csi:
            vol = csi.create("shared")
            slow = pb.CreateSnapshotRequest(
                name="s1", source_volume_id=vol.volume_id, parameters={"slow": "1"}
            )
            fut = csi.controller.CreateSnapshot.future(slow, timeout=60)
            assert gate.entered.wait(30)
            expect(ABORTED, csi.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vol.volume_id))
            expand = pb.ControllerExpandVolumeRequest(
                volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 << 30)
            )
            expect(ABORTED, csi.controller.ControllerExpandVolume, expand)
            assert csi.snapshot("s2", vol.volume_id).snapshot_id
            gate.open()
            assert fut.result().snapshot.ready_to_use
            csi.controller.ControllerExpandVolume(expand)
            csi.delete(vol.volume_id)
    finally:
        gate.open()


def test_cancelled_call_keeps_the_lock_until_the_backend_finishes(
    gated: tuple[Csi, Gate, GatedHostPath], caplog: pytest.LogCaptureFixture
) -> None:
    csi, gate, backend = gated
    caplog.set_level(logging.INFO, logger="csi_kit.rpc")
    call = csi.controller.CreateVolume.future(create_req("slow"), timeout=60)
    assert gate.entered.wait(30)
    call.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    # Wait until the server has seen the cancellation (its per-call log line).
    for _ in range(600):
        if any(getattr(r, "object_name", "") == "slow" for r in caplog.records):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the server never finished the cancelled call")
    expect(ABORTED, csi.controller.CreateVolume, create_req("slow"), "in progress")
    assert backend.made == []
    gate.open()
    assert gate.returned.wait(30)
    retried = retry_aborted(csi.controller.CreateVolume, create_req("slow")).volume
    assert retried.volume_id == gate.ids[0]
    assert backend.made == [retried.volume_id]
    assert len(gate.ids) == 1  # the backend was asked once


def test_a_deadline_exceeded_call_completes_for_the_retry(gated: tuple[Csi, Gate, GatedHostPath]) -> None:
    csi, gate, backend = gated
    call = csi.controller.CreateVolume.future(create_req("slow"), timeout=60)
    assert gate.entered.wait(30)
    with pytest.raises(grpc.RpcError) as info:
        csi.controller.CreateVolume(create_req("slow"), timeout=0.5)
    assert info.value.code() in (ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)
    gate.open()
    assert call.result().volume.volume_id == gate.ids[0]
    assert backend.made == gate.ids


# -- rollback -------------------------------------------------------------------------------------


class FailAfterPlacing(HostPathBackend):
    """Makes the volume fully (directory in place), then fails: the engine must undo it."""

    def restore_snapshot(self, volume_id: str, request: VolumeRequest, snapshot: Snapshot) -> CreatedVolume:
        super().restore_snapshot(volume_id, request, snapshot)
        assert os.path.isdir(self.volume_path(volume_id))
        raise Internal("checksum of the restored data does not match")

    def clone_volume(self, volume_id: str, request: VolumeRequest, source: Volume) -> CreatedVolume:
        made = super().clone_volume(volume_id, request, source)
        return CreatedVolume(made.capacity_bytes - 1, made.context)  # smaller than asked: engine refuses


@pytest.fixture
def failing(state: str) -> Iterator[Csi]:
    backend = FailAfterPlacing(HostPathConfig(), BackendContext("hostpath.csi-kit.io", "node-1", state))
    with running_driver(state, backend_object=backend) as ep, Csi(ep) as c:
        yield c


def _source_with_data(csi: Csi, state: str) -> tuple[Any, Any]:
    src = csi.create("data-src", required=4 * MiB)
    with open(os.path.join(state, "hostpath", "volumes", src.volume_id, "file"), "wb") as f:
        f.write(os.urandom(64 * 1024))
    return src, csi.snapshot("data-snap", src.volume_id)


def test_restore_failing_after_placing_leaves_nothing(failing: Csi, state: str) -> None:
    src, snap = _source_with_data(failing, state)
    before = tree(os.path.join(state, "hostpath"))
    expect(
        grpc.StatusCode.INTERNAL,
        failing.controller.CreateVolume,
        create_req("restore", snapshot=snap.snapshot_id),
        "checksum",
    )
    assert volume_dirs(state) == {src.volume_id}
    assert incoming(state) == []
    assert [r[1] for r in rows(state, "volumes")] == ["data-src"]
    assert tree(os.path.join(state, "hostpath")) == before
    assert failing.list_volume_ids() == [src.volume_id]


def test_backend_reporting_less_than_asked_is_rolled_back(failing: Csi, state: str) -> None:
    src, _ = _source_with_data(failing, state)
    expect(
        grpc.StatusCode.INTERNAL,
        failing.controller.CreateVolume,
        create_req("clone", volume=src.volume_id),
        "less than",
    )
    assert volume_dirs(state) == {src.volume_id}
    assert [r[1] for r in rows(state, "volumes")] == ["data-src"]


def test_copy_failing_midway_leaves_nothing(csi: Csi, state: str, monkeypatch: pytest.MonkeyPatch) -> None:
    src, snap = _source_with_data(csi, state)
    real = hostpath_module.copy.copy_tree

    def half_copy(source: str, dest: str, *, reflink: bool | None = None) -> Any:
        os.mkdir(dest)
        with open(os.path.join(dest, "partial"), "wb") as f:
            f.write(b"x" * 4096)
        raise ResourceExhausted("no space left on device while copying")

    monkeypatch.setattr(hostpath_module.copy, "copy_tree", half_copy)
    for req in (create_req("r", snapshot=snap.snapshot_id), create_req("c", volume=src.volume_id)):
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, csi.controller.CreateVolume, req, "no space")
    req = pb.CreateSnapshotRequest(name="s2", source_volume_id=src.volume_id)
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, csi.controller.CreateSnapshot, req)
    assert volume_dirs(state) == {src.volume_id}
    assert os.listdir(os.path.join(state, "hostpath", "snapshots")) == [snap.snapshot_id]
    assert incoming(state) == []
    assert [r[1] for r in rows(state, "volumes")] == ["data-src"]
    assert [r[1] for r in rows(state, "snapshots")] == ["data-snap"]
    # Once the storage works again the same names succeed.
    monkeypatch.setattr(hostpath_module.copy, "copy_tree", real)
    restored = csi.create("r", snapshot=snap.snapshot_id)
    with open(os.path.join(state, "hostpath", "volumes", restored.volume_id, "file"), "rb") as f:
        assert len(f.read()) == 64 * 1024


# -- reconcile ---------------------------------------------------------------------------------------


def _engine(state: str) -> tuple[VolumeEngine, HostPathBackend, Store]:
    backend = HostPathBackend(HostPathConfig(), BackendContext("hostpath.csi-kit.io", "node-1", state))
    backend.start()
    store = Store(os.path.join(state, "state.db"))
    return VolumeEngine(backend, store, workers=2), backend, store


def _request(name: str, source: ContentSource | None = None) -> VolumeRequest:
    return VolumeRequest(
        name=name,
        capacity_bytes=0,
        capacity=CapacityRange(MiB),
        capabilities=(VolumeCapability("mount", 1),),
        source=source,
    )


def test_reconcile_cleans_half_made_and_half_deleted_rows(state: str) -> None:
    engine, backend, store = _engine(state)
    try:
        ready = asyncio.run(engine.create_volume(_request("ready")))
        snap = asyncio.run(engine.create_snapshot("ready-snap", ready.volume_id, {}))
        # A creation interrupted after the backend made the directory ...
        creating = Volume("vol-creating", "creating", MiB)
        store.begin_volume(creating, {})
        backend.create_volume(creating.volume_id, _request("creating"))
        # ... one interrupted before the backend did anything ...
        store.begin_volume(Volume("vol-nothing", "nothing", MiB), {})
        # ... a deletion interrupted half-way, and a snapshot being taken.
        deleting = asyncio.run(engine.create_volume(_request("deleting")))
        store.set_volume_state(deleting.volume_id, "deleting")
        half = Snapshot("snap-creating", "half", ready.volume_id, MiB, 1, ready_to_use=False)
        store.begin_snapshot(half)
        backend.create_snapshot(half.snapshot_id, ready, {})
    finally:
        engine.close()
        store.close()

    engine, backend, store = _engine(state)
    try:
        report = engine.reconcile()
        assert sorted(report.cleaned_volumes) == sorted(["vol-creating", "vol-nothing", deleting.volume_id])
        assert report.cleaned_snapshots == ("snap-creating",)
        assert report.orphan_volumes == report.missing_volumes == ()
        assert volume_dirs(state) == {ready.volume_id}
        assert os.listdir(backend.snapshots_dir) == [snap.snapshot_id]
        assert {r.volume.name for r in store.volumes_in_state("creating", "deleting", "ready")} == {"ready"}
        # The names are free and creatable again.
        again = asyncio.run(engine.create_volume(_request("creating")))
        assert again.volume_id != "vol-creating"
    finally:
        engine.close()
        store.close()


def test_reconcile_reports_orphans_and_leaves_them_alone(
    state: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine, backend, store = _engine(state)
    try:
        orphan = os.path.join(backend.volumes_dir, "not-ours")
        os.mkdir(orphan)
        with open(os.path.join(orphan, "data"), "w") as f:
            f.write("someone's data")
        os.mkdir(os.path.join(backend.snapshots_dir, "stray-snapshot"))
        with caplog.at_level(logging.WARNING, logger="csi_kit.engine"):
            report = engine.reconcile()
        assert report.orphan_volumes == ("not-ours",)
        assert report.orphan_snapshots == ("stray-snapshot",)
        assert report.cleaned_volumes == ()
        assert os.path.exists(os.path.join(orphan, "data"))
        assert os.path.isdir(os.path.join(backend.snapshots_dir, "stray-snapshot"))
        assert "not-ours" in caplog.text and "orphan" in caplog.text
    finally:
        engine.close()
        store.close()


def test_reconcile_reports_a_vanished_volume_and_its_condition_is_abnormal(state: str) -> None:
    with running_driver(state) as ep, Csi(ep) as csi:
        vol = csi.create("vanishing")
        keep = csi.create("staying")
        os.rmdir(os.path.join(state, "hostpath", "volumes", vol.volume_id))
        status = csi.controller.ControllerGetVolume(
            pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)
        ).status
        assert status.volume_condition.abnormal
        assert "missing" in status.volume_condition.message
        listed = {
            e.volume.volume_id: e.status.volume_condition
            for e in csi.controller.ListVolumes(pb.ListVolumesRequest()).entries
        }
        assert listed[vol.volume_id].abnormal and not listed[keep.volume_id].abnormal
    engine, _, store = _engine(state)
    try:
        report = engine.reconcile()
        assert report.missing_volumes == (vol.volume_id,)
        assert report.cleaned_volumes == ()
        listed_vol = asyncio.run(engine.controller_get_volume(vol.volume_id))
        assert listed_vol.condition is not None and listed_vol.condition.abnormal
        # Deleting the record of a vanished volume still works.
        asyncio.run(engine.delete_volume(vol.volume_id))
        assert engine.reconcile().missing_volumes == ()
    finally:
        engine.close()
        store.close()


def test_start_empties_incoming(state: str) -> None:
    backend = HostPathBackend(HostPathConfig(), BackendContext("hostpath.csi-kit.io", "node-1", state))
    backend.start()
    os.makedirs(os.path.join(backend.incoming_dir, "vol-interrupted", "deep"))
    with running_driver(state) as ep, Csi(ep) as csi:
        assert incoming(state) == []
        assert csi.list_volume_ids() == []


def test_node_publish_rejects_unknown_volume(csi: Csi) -> None:
    with short_dir("ck-tg-") as parent:
        target = os.path.join(parent, "target")
        req = pb.NodePublishVolumeRequest(
            volume_id="no-such-volume", target_path=target, volume_capability=mount_cap()
        )
        expect(grpc.StatusCode.NOT_FOUND, csi.node.NodePublishVolume, req, "no-such-volume")
        assert not os.path.exists(target)


def test_concurrent_creates_of_many_names_all_succeed_once(csi: Csi, state: str) -> None:
    names = [f"par-{i}" for i in range(24)]
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def make(name: str) -> None:
        try:
            results[name] = retry_aborted(csi.controller.CreateVolume, create_req(name)).volume.volume_id
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=make, args=(n,)) for n in names + names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert set(results) == set(names)
    assert volume_dirs(state) == set(results.values())
    assert sorted(csi.list_volume_ids()) == sorted(results.values())


def test_mutable_parameters_without_modify_support_are_invalid(csi: Csi, state: str) -> None:
    req = create_req("mutable", mutable_parameters={"iops": "100"})
    expect(grpc.StatusCode.INVALID_ARGUMENT, csi.controller.CreateVolume, req, "mutable_parameters")
    assert volume_dirs(state) == set()
