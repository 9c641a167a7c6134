"""Every mutating RPC, repeated (`idempotency_repeats` times, 10 by default),
gives the same answer as the first call and changes nothing more."""

from __future__ import annotations

import os
from typing import Any

import pytest

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.sanity._support import (
    C,
    CtrlCap,
    NodeCap,
    Resources,
    SanityContext,
    call_ok_or,
    expect_error,
    is_mountpoint,
    mountinfo,
    read_tokens,
    write_token,
)

__all__ = ["TestIdempotency"]


def _same(first: Any, again: Any, what: str) -> None:
    assert again == first, f"{what}: a repeat answered differently:\nfirst: {first}\nrepeat: {again}"


class TestIdempotency:
    def test_create_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request()
        first = csi_resources.create_volume_from(req)
        for _ in range(csi_sanity.config.idempotency_repeats):
            _same(first, csi_resources.create_volume_from(req), "CreateVolume")
        if CtrlCap.LIST_VOLUMES in csi_sanity.caps.controller:
            from csi_kit.testing.sanity.test_controller import _list_all_volumes

            assert csi_resources.volumes == [first.volume_id]
            assert _list_all_volumes(csi_sanity).count(first.volume_id) == 1

    def test_create_volume_error(self, csi_sanity: SanityContext) -> None:
        """A refused request is refused the same way every time."""
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request(name="")
        for _ in range(csi_sanity.config.idempotency_repeats):
            expect_error(csi_sanity.controller.CreateVolume, req, C.INVALID_ARGUMENT)

    def test_create_volume_from_snapshot(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CREATE_DELETE_SNAPSHOT)
        src = csi_resources.create_volume()
        snap = csi_resources.create_snapshot(src.volume_id)
        req = csi_sanity.create_request()
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        first = csi_resources.create_volume_from(req)
        for _ in range(csi_sanity.config.idempotency_repeats):
            _same(first, csi_resources.create_volume_from(req), "CreateVolume from snapshot")

    def test_create_volume_from_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CLONE_VOLUME)
        src = csi_resources.create_volume()
        req = csi_sanity.create_request()
        req.volume_content_source.volume.volume_id = src.volume_id
        first = csi_resources.create_volume_from(req)
        for _ in range(csi_sanity.config.idempotency_repeats):
            _same(first, csi_resources.create_volume_from(req), "CreateVolume from volume")

    def test_delete_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        req = csi_sanity.delete_volume_request(vol.volume_id)
        for _ in range(csi_sanity.config.idempotency_repeats):
            csi_sanity.controller.DeleteVolume(req)
        csi_resources.forget_volume(vol.volume_id)

    def test_create_snapshot(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        req = csi_sanity.snapshot_request(vol.volume_id)
        first = csi_sanity.controller.CreateSnapshot(req).snapshot
        csi_resources.track_snapshot(first.snapshot_id)
        for _ in range(csi_sanity.config.idempotency_repeats):
            again = csi_sanity.controller.CreateSnapshot(req).snapshot
            csi_resources.track_snapshot(again.snapshot_id)
            # ready_to_use may flip false → true while the SP processes it.
            if first.ready_to_use:
                _same(first, again, "CreateSnapshot")
            else:
                assert again.snapshot_id == first.snapshot_id
        assert csi_resources.snapshots == [first.snapshot_id], "repeated CreateSnapshot made more snapshots"

    def test_delete_snapshot(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        snap = csi_resources.create_snapshot(vol.volume_id)
        req = csi_sanity.delete_snapshot_request(snap.snapshot_id)
        for _ in range(csi_sanity.config.idempotency_repeats):
            csi_sanity.controller.DeleteSnapshot(req)
        csi_resources.forget_snapshot(snap.snapshot_id)

    def test_controller_expand_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.EXPAND_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        req = pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, secrets=csi_sanity.config.secrets_for("ControllerExpandVolume")
        )
        req.capacity_range.required_bytes = csi_sanity.config.target_expand_size
        first = csi_sanity.controller.ControllerExpandVolume(req)
        for _ in range(csi_sanity.config.idempotency_repeats):
            _same(first, csi_sanity.controller.ControllerExpandVolume(req), "ControllerExpandVolume")

    def test_controller_modify_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.MODIFY_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        params = dict(csi_sanity.config.modify_parameters)
        if not params:
            pytest.skip("no modify_parameters configured (a valid ControllerModifyVolume change)")
        vol = csi_resources.create_volume()
        req = pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id, mutable_parameters=params)
        for _ in range(csi_sanity.config.idempotency_repeats):
            csi_sanity.controller.ControllerModifyVolume(req)

    def test_controller_publish_unpublish(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.PUBLISH_UNPUBLISH_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        first = csi_resources.controller_publish(vol.volume_id)
        for _ in range(csi_sanity.config.idempotency_repeats):
            assert csi_resources.controller_publish(vol.volume_id) == first, (
                "publish_context changed on repeat"
            )
        req = pb.ControllerUnpublishVolumeRequest(
            volume_id=vol.volume_id, node_id=csi_sanity.node_info.node_id
        )
        for _ in range(csi_sanity.config.idempotency_repeats):
            csi_sanity.controller.ControllerUnpublishVolume(req)

    @pytest.mark.privileged
    def test_node_stage_unstage(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        pctx = csi_resources.controller_publish(vol.volume_id)
        path = csi_resources.stage(vol.volume_id, pctx)
        req = pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id,
            staging_target_path=path,
            volume_capability=csi_sanity.capability(),
            publish_context=pctx,
            secrets=csi_sanity.config.secrets_for("NodeStageVolume"),
        )
        for _ in range(csi_sanity.config.idempotency_repeats):
            csi_sanity.node.NodeStageVolume(req)
        unstage = pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=path)
        for _ in range(csi_sanity.config.idempotency_repeats):
            csi_sanity.node.NodeUnstageVolume(unstage)
        csi_resources.staged.remove((vol.volume_id, path))
        assert not is_mountpoint(path), "staging path still mounted after repeated NodeUnstageVolume"

    @pytest.mark.privileged
    def test_node_publish_unpublish(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        p = csi_resources.publish(vol.volume_id)
        req = csi_resources.publish_request(vol.volume_id, p.target_path, p.staging_path)
        if csi_sanity.config.access_type == "mount":
            data = write_token(p.target_path, "idem")
        for _ in range(csi_sanity.config.idempotency_repeats):
            csi_sanity.node.NodePublishVolume(req)
        if csi_sanity.config.access_type == "mount":
            assert read_tokens(p.target_path) == {"idem": data}, (
                "repeated publish changed what the path shows"
            )
            real = os.path.realpath(p.target_path)
            stacked = [mp for mp, _root, _src in mountinfo() if mp == real]
            assert len(stacked) == 1, (
                f"repeated NodePublishVolume stacked {len(stacked)} mounts on the target"
            )
        unpub = pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=p.target_path)
        for _ in range(csi_sanity.config.idempotency_repeats):
            csi_sanity.node.NodeUnpublishVolume(unpub)
        csi_resources.published.remove((vol.volume_id, p.target_path))
        assert not is_mountpoint(p.target_path), "target still mounted after repeated NodeUnpublishVolume"

    @pytest.mark.privileged
    def test_node_expand_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.EXPAND_VOLUME)
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        size = csi_sanity.config.target_expand_size
        if CtrlCap.EXPAND_VOLUME in csi_sanity.caps.controller:
            creq = pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id)
            creq.capacity_range.required_bytes = size
            csi_sanity.controller.ControllerExpandVolume(creq)
        p = csi_resources.publish(vol.volume_id)
        req = pb.NodeExpandVolumeRequest(
            volume_id=vol.volume_id,
            volume_path=p.target_path,
            staging_target_path=p.staging_path,
            volume_capability=csi_sanity.capability(),
        )
        req.capacity_range.required_bytes = size
        first, err = call_ok_or(csi_sanity.node.NodeExpandVolume, req, (C.FAILED_PRECONDITION,))
        for _ in range(csi_sanity.config.idempotency_repeats):
            if err is None:
                _same(first, csi_sanity.node.NodeExpandVolume(req), "NodeExpandVolume")
            else:  # refused as "volume in use": refused the same way each time
                expect_error(csi_sanity.node.NodeExpandVolume, req, err.code())

    def test_group_snapshot(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        from csi_kit.testing.sanity._support import GroupCap
        from csi_kit.testing.sanity.test_group import create_group

        csi_sanity.need_group(GroupCap.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT)
        vols = [csi_resources.create_volume().volume_id for _ in range(2)]
        req, first = create_group(csi_sanity, csi_resources, vols)
        for _ in range(csi_sanity.config.idempotency_repeats):
            again = csi_sanity.group.CreateVolumeGroupSnapshot(req).group_snapshot
            assert again.group_snapshot_id == first.group_snapshot_id
            assert {s.snapshot_id for s in again.snapshots} == {s.snapshot_id for s in first.snapshots}
        delete = pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=first.group_snapshot_id, snapshot_ids=[s.snapshot_id for s in first.snapshots]
        )
        for _ in range(csi_sanity.config.idempotency_repeats):
            csi_sanity.group.DeleteVolumeGroupSnapshot(delete)
        csi_resources.groups.clear()
