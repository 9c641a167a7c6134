"""GroupController: volume group snapshots, where the driver advertises them."""

from __future__ import annotations

from typing import Any

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.sanity._support import (
    C,
    CtrlCap,
    GroupCap,
    Resources,
    SanityContext,
    expect_error,
    unique_name,
)

__all__ = ["TestGroupController"]

NEED = GroupCap.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT


def create_group(
    ctx: SanityContext, res: Resources, volume_ids: list[str], name: str | None = None
) -> tuple[Any, Any]:
    """CreateVolumeGroupSnapshot that must succeed; tracked for deletion."""
    req = pb.CreateVolumeGroupSnapshotRequest(
        name=name or unique_name("group"),
        source_volume_ids=volume_ids,
        secrets=ctx.config.secrets_for("CreateVolumeGroupSnapshot"),
    )
    group = ctx.group.CreateVolumeGroupSnapshot(req).group_snapshot
    assert group.group_snapshot_id, "group snapshot without group_snapshot_id"
    if all(gid != group.group_snapshot_id for gid, _ in res.groups):
        res.groups.append((group.group_snapshot_id, [s.snapshot_id for s in group.snapshots]))
    return req, group


class TestGroupController:
    def test_capabilities_are_known(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_group()
        resp = csi_sanity.group.GroupControllerGetCapabilities(pb.GroupControllerGetCapabilitiesRequest())
        known = set(GroupCap.Type.values()) - {GroupCap.UNKNOWN}
        for cap in resp.capabilities:
            assert cap.rpc.type in known, f"unknown group controller capability {cap.rpc.type}"

    def test_create_returns_member_snapshots(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_group(NEED)
        vols = [csi_resources.create_volume().volume_id for _ in range(2)]
        _, group = create_group(csi_sanity, csi_resources, vols)
        assert group.HasField("creation_time"), "group snapshot without creation_time"
        assert sorted(s.source_volume_id for s in group.snapshots) == sorted(vols)
        for s in group.snapshots:
            assert s.snapshot_id
            assert s.group_snapshot_id in ("", group.group_snapshot_id)
        if not all(s.ready_to_use for s in group.snapshots):
            assert not group.ready_to_use, "group ready_to_use although a member is not"

    def test_missing_name(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_group(NEED)
        vol = csi_resources.create_volume()
        expect_error(
            csi_sanity.group.CreateVolumeGroupSnapshot,
            pb.CreateVolumeGroupSnapshotRequest(source_volume_ids=[vol.volume_id]),
            C.INVALID_ARGUMENT,
        )

    def test_missing_source_volume_ids(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_group(NEED)
        expect_error(
            csi_sanity.group.CreateVolumeGroupSnapshot,
            pb.CreateVolumeGroupSnapshotRequest(name=unique_name("group")),
            C.INVALID_ARGUMENT,
        )

    def test_same_name_different_sources_already_exists(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_group(NEED)
        a, b, c = (csi_resources.create_volume().volume_id for _ in range(3))
        req, _ = create_group(csi_sanity, csi_resources, [a, b])
        expect_error(
            csi_sanity.group.CreateVolumeGroupSnapshot,
            pb.CreateVolumeGroupSnapshotRequest(name=req.name, source_volume_ids=[a, c]),
            C.ALREADY_EXISTS,
        )

    def test_get(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_group(NEED)
        vols = [csi_resources.create_volume().volume_id for _ in range(2)]
        _, group = create_group(csi_sanity, csi_resources, vols)
        got = csi_sanity.group.GetVolumeGroupSnapshot(
            pb.GetVolumeGroupSnapshotRequest(
                group_snapshot_id=group.group_snapshot_id,
                snapshot_ids=[s.snapshot_id for s in group.snapshots],
            )
        ).group_snapshot
        assert got.group_snapshot_id == group.group_snapshot_id
        assert {s.snapshot_id for s in got.snapshots} == {s.snapshot_id for s in group.snapshots}

    def test_get_unknown(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_group(NEED)
        expect_error(
            csi_sanity.group.GetVolumeGroupSnapshot,
            pb.GetVolumeGroupSnapshotRequest(group_snapshot_id="sanity-no-such-group", snapshot_ids=["x"]),
            C.NOT_FOUND,
        )

    def test_delete_removes_members(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_group(NEED)
        vols = [csi_resources.create_volume().volume_id for _ in range(2)]
        _, group = create_group(csi_sanity, csi_resources, vols)
        ids = [s.snapshot_id for s in group.snapshots]
        csi_sanity.group.DeleteVolumeGroupSnapshot(
            pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids)
        )
        csi_resources.groups.clear()
        expect_error(
            csi_sanity.group.GetVolumeGroupSnapshot,
            pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids),
            C.NOT_FOUND,
        )
        if CtrlCap.LIST_SNAPSHOTS in csi_sanity.caps.controller:
            for sid in ids:
                resp = csi_sanity.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=sid))
                assert not resp.entries, f"member snapshot {sid} still listed after the group was deleted"

    def test_delete_unknown_succeeds(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_group(NEED)
        csi_sanity.group.DeleteVolumeGroupSnapshot(
            pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="sanity-no-such-group", snapshot_ids=["x"])
        )

    def test_delete_unknown_without_snapshot_ids_succeeds(self, csi_sanity: SanityContext) -> None:
        """csi-sanity sends no snapshot_ids for a group that does not exist:
        the group is gone, so OK (not INVALID_ARGUMENT)."""
        csi_sanity.need_group(NEED)
        csi_sanity.group.DeleteVolumeGroupSnapshot(
            pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="sanity-no-such-group")
        )

    def test_member_usable_as_volume_source(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_group(NEED)
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vols = [csi_resources.create_volume().volume_id for _ in range(2)]
        _, group = create_group(csi_sanity, csi_resources, vols)
        for s in group.snapshots:
            req = csi_sanity.create_request()
            req.volume_content_source.snapshot.snapshot_id = s.snapshot_id
            csi_resources.create_volume_from(req)
