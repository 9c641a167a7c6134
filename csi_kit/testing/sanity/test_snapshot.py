"""Snapshots: CreateSnapshot, DeleteSnapshot, ListSnapshots, GetSnapshot."""

from __future__ import annotations

from typing import Any

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.sanity._support import C, CtrlCap, Resources, SanityContext, expect_error, unique_name

__all__ = ["TestCreateSnapshot", "TestDeleteSnapshot", "TestListSnapshots", "TestGetSnapshot"]

NONEXISTENT_VOLUME = "sanity-no-such-volume-0123456789"
NONEXISTENT_SNAPSHOT = "sanity-no-such-snapshot-0123456789"


def check_snapshot(snap: Any, source_volume_id: str) -> None:
    """The REQUIRED fields of a Snapshot message."""
    assert snap.snapshot_id, "snapshot without snapshot_id"
    assert snap.source_volume_id == source_volume_id, (
        f"snapshot source_volume_id {snap.source_volume_id!r}, expected {source_volume_id!r}"
    )
    assert snap.HasField("creation_time") and snap.creation_time.seconds > 0, "snapshot without creation_time"
    assert snap.size_bytes >= 0


def list_all_snapshots(ctx: SanityContext, max_entries: int = 0, **kw: Any) -> list[Any]:
    out: list[Any] = []
    token = ""
    for _ in range(10000):
        resp = ctx.controller.ListSnapshots(
            pb.ListSnapshotsRequest(
                max_entries=max_entries,
                starting_token=token,
                secrets=ctx.config.secrets_for("ListSnapshots"),
                **kw,
            )
        )
        if max_entries:
            assert len(resp.entries) <= max_entries, (
                f"ListSnapshots returned {len(resp.entries)} entries for max_entries={max_entries}"
            )
        out.extend(e.snapshot for e in resp.entries)
        token = resp.next_token
        if not token:
            return out
    raise AssertionError("ListSnapshots pagination never ended")


class TestCreateSnapshot:
    def test_missing_name(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        expect_error(
            csi_sanity.controller.CreateSnapshot,
            csi_sanity.snapshot_request(vol.volume_id, name=""),
            C.INVALID_ARGUMENT,
        )

    def test_missing_source_volume_id(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        expect_error(
            csi_sanity.controller.CreateSnapshot, csi_sanity.snapshot_request(""), C.INVALID_ARGUMENT
        )

    def test_source_volume_not_found(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        expect_error(
            csi_sanity.controller.CreateSnapshot,
            csi_sanity.snapshot_request(NONEXISTENT_VOLUME),
            (C.NOT_FOUND, C.INVALID_ARGUMENT),
        )

    def test_returns_required_fields(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        snap = csi_resources.create_snapshot(vol.volume_id)
        check_snapshot(snap, vol.volume_id)

    def test_same_name_same_source_returns_same_snapshot(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        name = unique_name("snap")
        first = csi_resources.create_snapshot(vol.volume_id, name)
        second = csi_resources.create_snapshot(vol.volume_id, name)
        assert second.snapshot_id == first.snapshot_id
        assert second.creation_time == first.creation_time, "a repeated CreateSnapshot cut a new snapshot"

    def test_same_name_different_source_already_exists(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        a = csi_resources.create_volume()
        b = csi_resources.create_volume()
        name = unique_name("snap")
        csi_resources.create_snapshot(a.volume_id, name)
        expect_error(
            csi_sanity.controller.CreateSnapshot,
            csi_sanity.snapshot_request(b.volume_id, name),
            C.ALREADY_EXISTS,
        )

    def test_name_of_128_bytes_accepted(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        name = unique_name("max")
        csi_resources.create_snapshot(vol.volume_id, name + "x" * (128 - len(name)))


class TestDeleteSnapshot:
    def test_missing_snapshot_id(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        expect_error(
            csi_sanity.controller.DeleteSnapshot, csi_sanity.delete_snapshot_request(""), C.INVALID_ARGUMENT
        )

    def test_unknown_snapshot_id_succeeds(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        csi_sanity.controller.DeleteSnapshot(csi_sanity.delete_snapshot_request(NONEXISTENT_SNAPSHOT))

    def test_deletes_the_snapshot(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        snap = csi_resources.create_snapshot(vol.volume_id)
        csi_resources.delete_snapshot(snap.snapshot_id)
        if CtrlCap.LIST_SNAPSHOTS in csi_sanity.caps.controller:
            assert not list_all_snapshots(csi_sanity, snapshot_id=snap.snapshot_id), (
                "deleted snapshot still listed"
            )
        if CtrlCap.GET_SNAPSHOT in csi_sanity.caps.controller:
            expect_error(
                csi_sanity.controller.GetSnapshot,
                pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id),
                C.NOT_FOUND,
            )
        if CtrlCap.CREATE_DELETE_VOLUME in csi_sanity.caps.controller:
            req = csi_sanity.create_request()
            req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
            expect_error(csi_sanity.controller.CreateVolume, req, C.NOT_FOUND)

    def test_second_delete_succeeds(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        snap = csi_resources.create_snapshot(vol.volume_id)
        csi_resources.delete_snapshot(snap.snapshot_id)
        csi_sanity.controller.DeleteSnapshot(csi_sanity.delete_snapshot_request(snap.snapshot_id))


class TestListSnapshots:
    def test_entries_have_required_fields(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_SNAPSHOTS, CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        csi_resources.create_snapshot(vol.volume_id)
        snaps = list_all_snapshots(csi_sanity)
        assert snaps, "ListSnapshots is empty although a snapshot exists"
        for s in snaps:
            assert s.snapshot_id and s.source_volume_id, f"incomplete snapshot entry: {s}"

    def test_by_snapshot_id(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_SNAPSHOTS, CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        snap = csi_resources.create_snapshot(vol.volume_id)
        csi_resources.create_snapshot(vol.volume_id)
        got = list_all_snapshots(csi_sanity, snapshot_id=snap.snapshot_id)
        assert [s.snapshot_id for s in got] == [snap.snapshot_id]
        check_snapshot(got[0], vol.volume_id)

    def test_by_unknown_snapshot_id_is_empty(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_SNAPSHOTS)
        assert list_all_snapshots(csi_sanity, snapshot_id=NONEXISTENT_SNAPSHOT) == []

    def test_by_source_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_SNAPSHOTS, CtrlCap.CREATE_DELETE_SNAPSHOT)
        a = csi_resources.create_volume()
        b = csi_resources.create_volume()
        mine = {csi_resources.create_snapshot(a.volume_id).snapshot_id for _ in range(2)}
        csi_resources.create_snapshot(b.volume_id)
        got = list_all_snapshots(csi_sanity, source_volume_id=a.volume_id)
        assert {s.snapshot_id for s in got} == mine
        assert all(s.source_volume_id == a.volume_id for s in got)

    def test_by_unknown_source_volume_is_empty(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_SNAPSHOTS)
        assert list_all_snapshots(csi_sanity, source_volume_id=NONEXISTENT_VOLUME) == []

    def test_invalid_starting_token_is_aborted(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_SNAPSHOTS)
        expect_error(
            csi_sanity.controller.ListSnapshots,
            pb.ListSnapshotsRequest(starting_token="sanity-invalid-token-\u2603"),
            C.ABORTED,
        )

    def test_pagination_visits_every_snapshot_once(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_SNAPSHOTS, CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        made = {csi_resources.create_snapshot(vol.volume_id).snapshot_id for _ in range(5)}
        full = {s.snapshot_id for s in list_all_snapshots(csi_sanity)}
        assert made <= full
        for page in (1, 2, 3):
            paged = [s.snapshot_id for s in list_all_snapshots(csi_sanity, max_entries=page)]
            assert len(paged) == len(set(paged)), f"ListSnapshots max_entries={page} returned duplicates"
            assert set(paged) == full, f"ListSnapshots max_entries={page} does not visit every snapshot"

    def test_new_snapshot_listed_and_deleted_gone(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_SNAPSHOTS, CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        before = {s.snapshot_id for s in list_all_snapshots(csi_sanity)}
        snap = csi_resources.create_snapshot(vol.volume_id)
        after = {s.snapshot_id for s in list_all_snapshots(csi_sanity)}
        assert after - before == {snap.snapshot_id}
        csi_resources.delete_snapshot(snap.snapshot_id)
        assert snap.snapshot_id not in {s.snapshot_id for s in list_all_snapshots(csi_sanity)}


class TestGetSnapshot:
    def test_returns_the_snapshot(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.GET_SNAPSHOT, CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        snap = csi_resources.create_snapshot(vol.volume_id)
        got = csi_sanity.controller.GetSnapshot(
            pb.GetSnapshotRequest(
                snapshot_id=snap.snapshot_id, secrets=csi_sanity.config.secrets_for("GetSnapshot")
            )
        ).snapshot
        assert got.snapshot_id == snap.snapshot_id
        check_snapshot(got, vol.volume_id)

    def test_missing_snapshot_id(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.GET_SNAPSHOT)
        expect_error(csi_sanity.controller.GetSnapshot, pb.GetSnapshotRequest(), C.INVALID_ARGUMENT)

    def test_unknown_snapshot(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.GET_SNAPSHOT)
        expect_error(
            csi_sanity.controller.GetSnapshot,
            pb.GetSnapshotRequest(snapshot_id=NONEXISTENT_SNAPSHOT),
            C.NOT_FOUND,
        )
