"""The SQLite store directly (round trips, durability across reopen, WAL,
file mode) and list pagination over the real socket."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator

import grpc
import pytest
from helpers import Csi, expect, short_dir

from csi_kit._core.store import Attachment, PublishRecord, Store
from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.driver import running_driver
from csi_kit.types import ContentSource, Snapshot, Topology, Volume

MiB = 1 << 20


@pytest.fixture
def db_path(tmp_path: os.PathLike[str]) -> str:
    return os.path.join(str(tmp_path), "sub", "state.db")


def _volume(i: int, **kw: object) -> Volume:
    return Volume(
        volume_id=f"id-{i}",
        name=f"name-{i}",
        capacity_bytes=i * MiB,
        parameters={"p": str(i)},
        topology=(Topology({"zone": "z1"}),),
        created_ns=1_700_000_000_123_456_789 + i,
        **kw,  # type: ignore[arg-type]
    )


def test_file_is_private_and_in_wal_mode(db_path: str) -> None:
    store = Store(db_path)
    try:
        assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
        db = sqlite3.connect(db_path)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()
    finally:
        store.close()


def test_volume_round_trip_survives_reopen(db_path: str) -> None:
    store = Store(db_path)
    vol = _volume(3, source=ContentSource("snapshot", "snap-1"))
    store.begin_volume(vol, {"iops": "100"})
    assert store.volume("id-3").state == "creating"  # type: ignore[union-attr]
    store.finish_volume("id-3", 4 * MiB, {"ctx": "v"})
    store.close()

    store = Store(db_path)
    try:
        rec = store.volume_by_name("name-3")
        assert rec is not None and rec.state == "ready"
        assert rec.volume.volume_id == "id-3"
        assert rec.volume.capacity_bytes == 4 * MiB
        assert rec.volume.source == ContentSource("snapshot", "snap-1")
        assert dict(rec.volume.parameters) == {"p": "3"}
        assert dict(rec.volume.context) == {"ctx": "v"}
        assert rec.volume.topology == (Topology({"zone": "z1"}),)
        assert rec.volume.created_ns == 1_700_000_000_123_456_792
        assert dict(rec.mutable_parameters) == {"iops": "100"}
    finally:
        store.close()


def test_names_and_ids_are_unique(db_path: str) -> None:
    store = Store(db_path)
    try:
        store.begin_volume(_volume(1), {})
        with pytest.raises(sqlite3.IntegrityError):
            store.begin_volume(Volume("id-other", "name-1", MiB), {})
        with pytest.raises(sqlite3.IntegrityError):
            store.begin_volume(Volume("id-1", "other-name", MiB), {})
        assert store.count_volumes() == 1
    finally:
        store.close()


def test_listing_shows_ready_rows_in_creation_order(db_path: str) -> None:
    store = Store(db_path)
    try:
        for i in range(1, 6):
            store.begin_volume(_volume(i), {})
        for i in (1, 2, 4, 5):
            store.finish_volume(f"id-{i}", i * MiB, {})
        store.set_volume_state("id-4", "deleting")
        listed = [r.volume.volume_id for r in store.list_volumes(0, 100)]
        assert listed == ["id-1", "id-2", "id-5"]
        first = store.list_volumes(0, 2)
        assert [r.volume.volume_id for r in store.list_volumes(first[-1].seq, 2)] == ["id-5"]
        assert {r.volume.volume_id for r in store.volumes_in_state("creating", "deleting")} == {
            "id-3",
            "id-4",
        }
        # Positions are never reused, so old page tokens stay meaningful.
        top = store.max_seq("volumes")
        store.remove_volume("id-5")
        assert store.max_seq("volumes") == top
        store.begin_volume(_volume(6), {})
        assert store.volume("id-6").seq > top  # type: ignore[union-attr]
    finally:
        store.close()


def test_snapshots_groups_publishes_and_attachments(db_path: str) -> None:
    store = Store(db_path)
    try:
        store.begin_snapshot(Snapshot("s-1", "snap-1", "v-9", MiB, 5, ready_to_use=False))
        store.finish_snapshot("s-1", 2 * MiB, True)
        members = [
            Snapshot(f"m-{i}", f"grp/v-{i}", f"v-{i}", MiB, 7, ready_to_use=False, group_snapshot_id="g-1")
            for i in range(3)
        ]
        store.begin_group("g-1", "grp", members, {"k": "v"}, 7)
        store.finish_group("g-1", {m.snapshot_id: (MiB, True) for m in members})
        group = store.group_by_name("grp")
        assert group is not None and group.source_volume_ids == ("v-0", "v-1", "v-2")
        gs = store.group_snapshot(group)
        assert [s.snapshot_id for s in gs.snapshots] == ["m-0", "m-1", "m-2"] and gs.ready_to_use
        assert [r.snapshot.snapshot_id for r in store.list_snapshots(0, 10, source_volume_id="v-1")] == [
            "m-1"
        ]
        assert [r.snapshot.snapshot_id for r in store.list_snapshots(0, 10, snapshot_id="s-1")] == ["s-1"]
        store.remove_group("g-1")
        assert store.group("g-1") is None
        assert store.snapshot_ids() == {"s-1"}

        rec = PublishRecord("/t", "v-1", "publish", False, "mount", 1, "", ("noatime",))
        store.record_publish(rec)
        store.record_publish(PublishRecord("/t", "v-1", "publish", True, "mount", 1, "", ()))
        assert store.publish_at("/t").readonly  # type: ignore[union-attr]
        assert len(store.publishes_of("v-1")) == 1
        store.remove_publish("/t")
        assert store.publish_at("/t") is None

        store.record_attachment(Attachment("v-1", "n-1", False, 1, {"dev": "/dev/x"}))
        assert store.attachments("v-1")[0].context == {"dev": "/dev/x"}
        store.remove_attachment("v-1", "n-1")
        assert store.attachments("v-1") == []
    finally:
        store.close()


def test_a_failed_transaction_leaves_nothing(db_path: str) -> None:
    store = Store(db_path)
    try:
        members = [Snapshot("dup", "grp/a", "a", MiB, 1), Snapshot("dup", "grp/b", "b", MiB, 1)]
        with pytest.raises(sqlite3.IntegrityError):
            store.begin_group("g", "grp", members, {}, 1)
        assert store.group("g") is None
        assert store.snapshot_ids() == set()
    finally:
        store.close()


# -- pagination over gRPC ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def csi() -> Iterator[Csi]:
    with short_dir() as state, running_driver(state) as ep, Csi(ep) as c:
        yield c


@pytest.fixture(scope="module")
def listed(csi: Csi) -> tuple[list[str], list[str]]:
    vols = [csi.create(f"page-{i}").volume_id for i in range(23)]
    snaps = [csi.snapshot(f"page-snap-{i}", vols[i % 3]).snapshot_id for i in range(11)]
    return vols, snaps


def test_list_volumes_pages_cover_everything_once(csi: Csi, listed: tuple[list[str], list[str]]) -> None:
    vols, _ = listed
    sizes = []
    seen: list[str] = []
    token = ""
    while True:
        resp = csi.controller.ListVolumes(pb.ListVolumesRequest(max_entries=5, starting_token=token))
        sizes.append(len(resp.entries))
        seen += [e.volume.volume_id for e in resp.entries]
        token = resp.next_token
        if not token:
            break
    assert sizes == [5, 5, 5, 5, 3]
    assert seen == vols
    assert csi.list_volume_ids(page=0) == vols
    assert csi.list_volume_ids(page=23) == vols
    assert csi.list_volume_ids(page=1000) == vols


def test_list_volumes_walk_survives_deletes_and_creates(
    csi: Csi, listed: tuple[list[str], list[str]]
) -> None:
    vols, _ = listed
    first = csi.controller.ListVolumes(pb.ListVolumesRequest(max_entries=10))
    assert [e.volume.volume_id for e in first.entries] == vols[:10]
    extra = csi.create("page-late")
    doomed = csi.create("page-doomed")
    csi.delete(doomed.volume_id)
    rest: list[str] = []
    token = first.next_token
    while token:
        resp = csi.controller.ListVolumes(pb.ListVolumesRequest(max_entries=10, starting_token=token))
        rest += [e.volume.volume_id for e in resp.entries]
        token = resp.next_token
    assert rest == [*vols[10:], extra.volume_id]
    csi.delete(extra.volume_id)


def test_list_snapshots_pages_and_filters(csi: Csi, listed: tuple[list[str], list[str]]) -> None:
    vols, snaps = listed
    assert csi.list_snapshot_ids(page=4) == snaps
    by_source = csi.controller.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=vols[1]))
    assert [e.snapshot.snapshot_id for e in by_source.entries] == snaps[1::3]
    one = csi.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=snaps[5]))
    assert [e.snapshot.snapshot_id for e in one.entries] == [snaps[5]]
    assert one.entries[0].snapshot.source_volume_id == vols[5 % 3]
    none = csi.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id="no-such-snapshot"))
    assert list(none.entries) == [] and none.next_token == ""
    hostile = csi.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id="../" * 100))
    assert list(hostile.entries) == []


@pytest.mark.parametrize("token", ["garbage", "-1", "99999999", "1e3", "9" * 40])
def test_invalid_token_is_aborted(csi: Csi, listed: tuple[list[str], list[str]], token: str) -> None:
    expect(
        grpc.StatusCode.ABORTED,
        csi.controller.ListVolumes,
        pb.ListVolumesRequest(starting_token=token),
        "starting_token",
    )
    expect(
        grpc.StatusCode.ABORTED,
        csi.controller.ListSnapshots,
        pb.ListSnapshotsRequest(starting_token=token),
        "starting_token",
    )


def test_negative_max_entries_is_invalid(csi: Csi) -> None:
    for call, req in (
        (csi.controller.ListVolumes, pb.ListVolumesRequest(max_entries=-1)),
        (csi.controller.ListSnapshots, pb.ListSnapshotsRequest(max_entries=-3)),
    ):
        expect(grpc.StatusCode.INVALID_ARGUMENT, call, req, "max_entries")


def test_listing_survives_a_driver_restart() -> None:
    with short_dir() as state:
        with running_driver(state) as ep, Csi(ep) as csi:
            made = [csi.create(f"durable-{i}").volume_id for i in range(4)]
            snap = csi.snapshot("durable-snap", made[0])
            page = csi.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2))
        with running_driver(state) as ep, Csi(ep) as csi:
            assert csi.list_volume_ids() == made
            assert csi.list_snapshot_ids() == [snap.snapshot_id]
            # A token handed out before the restart still continues the walk.
            rest = csi.controller.ListVolumes(pb.ListVolumesRequest(starting_token=page.next_token))
            assert [e.volume.volume_id for e in rest.entries] == made[2:]
            assert csi.create("durable-1").volume_id == made[1]
