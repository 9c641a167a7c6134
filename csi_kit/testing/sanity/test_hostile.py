"""Hostile input: ids and paths with `..`, `/`, NUL and 10 KiB lengths,
unknown enum values and absurd sizes.

Ids come from callers and are untrusted (csi-driver-host-path#644 was a path
traversal through a snapshot id).  Every answer must be a code the spec
allows for that RPC — never a crash — and the canary, a file tree outside
every root the driver may use that the `..` chains and absolute paths point
at, must be untouched afterwards (checked after every test).
"""

from __future__ import annotations

from collections.abc import Iterator
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
    unique_name,
)

__all__ = ["TestHostileIds", "TestHostilePaths", "TestHostileEnums", "TestHostileSizes"]

INT64_MAX = 2**63 - 1

#: Hostile id shapes, by test id.  "escape" and "absolute" point at the canary.
ID_KINDS = ("dotdot", "escape", "absolute", "root", "slash", "nul", "10KiB", "newline")


def hostile(ctx: SanityContext, kind: str) -> str:
    return {
        "dotdot": "..",
        "escape": ctx.canary.relative_escape(),
        "absolute": ctx.canary.victim,
        "root": "/",
        "slash": "a/../../b",
        "nul": "sanity\x00vol",
        "10KiB": "v" * 10240,
        "newline": "sanity\nvol",
    }[kind]


class _Alive:
    @pytest.fixture(autouse=True)
    def _driver_survives(self, csi_sanity: SanityContext) -> Iterator[None]:
        """After each hostile call the driver still answers Probe and the
        canary is intact (checked here, so the guilty test is the one named)."""
        yield
        csi_sanity.identity.Probe(pb.ProbeRequest())
        csi_sanity.check_canary()


@pytest.mark.parametrize("kind", ID_KINDS)
class TestHostileIds(_Alive):
    def test_delete_volume(self, csi_sanity: SanityContext, kind: str) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        call_ok_or(
            csi_sanity.controller.DeleteVolume,
            csi_sanity.delete_volume_request(hostile(csi_sanity, kind)),
            (C.INVALID_ARGUMENT,),
        )

    def test_validate_volume_capabilities(self, csi_sanity: SanityContext, kind: str) -> None:
        csi_sanity.need_controller()
        expect_error(
            csi_sanity.controller.ValidateVolumeCapabilities,
            pb.ValidateVolumeCapabilitiesRequest(
                volume_id=hostile(csi_sanity, kind), volume_capabilities=[csi_sanity.capability()]
            ),
            (C.NOT_FOUND, C.INVALID_ARGUMENT),
        )

    def test_controller_get_volume(self, csi_sanity: SanityContext, kind: str) -> None:
        csi_sanity.need_controller(CtrlCap.GET_VOLUME)
        expect_error(
            csi_sanity.controller.ControllerGetVolume,
            pb.ControllerGetVolumeRequest(volume_id=hostile(csi_sanity, kind)),
            (C.NOT_FOUND, C.INVALID_ARGUMENT),
        )

    def test_controller_expand_volume(self, csi_sanity: SanityContext, kind: str) -> None:
        csi_sanity.need_controller(CtrlCap.EXPAND_VOLUME)
        req = pb.ControllerExpandVolumeRequest(volume_id=hostile(csi_sanity, kind))
        req.capacity_range.required_bytes = csi_sanity.config.target_expand_size
        expect_error(csi_sanity.controller.ControllerExpandVolume, req, (C.NOT_FOUND, C.INVALID_ARGUMENT))

    def test_create_volume_name(self, csi_sanity: SanityContext, csi_resources: Resources, kind: str) -> None:
        """Any Unicode name without banned control characters is legal; a
        driver may refuse the rest (and over-long names) as INVALID_ARGUMENT."""
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request(name=hostile(csi_sanity, kind))
        if kind == "nul":
            expect_error(csi_sanity.controller.CreateVolume, req, C.INVALID_ARGUMENT)
            return
        resp, _ = call_ok_or(csi_sanity.controller.CreateVolume, req, (C.INVALID_ARGUMENT,))
        if resp is not None:
            csi_resources.track_volume(resp.volume.volume_id)

    def test_create_volume_from_snapshot_id(self, csi_sanity: SanityContext, kind: str) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CREATE_DELETE_SNAPSHOT)
        req = csi_sanity.create_request()
        req.volume_content_source.snapshot.snapshot_id = hostile(csi_sanity, kind)
        expect_error(csi_sanity.controller.CreateVolume, req, (C.NOT_FOUND, C.INVALID_ARGUMENT))

    def test_create_volume_from_volume_id(self, csi_sanity: SanityContext, kind: str) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CLONE_VOLUME)
        req = csi_sanity.create_request()
        req.volume_content_source.volume.volume_id = hostile(csi_sanity, kind)
        expect_error(csi_sanity.controller.CreateVolume, req, (C.NOT_FOUND, C.INVALID_ARGUMENT))

    def test_create_snapshot_source(self, csi_sanity: SanityContext, kind: str) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        expect_error(
            csi_sanity.controller.CreateSnapshot,
            csi_sanity.snapshot_request(hostile(csi_sanity, kind)),
            (C.NOT_FOUND, C.INVALID_ARGUMENT),
        )

    def test_create_snapshot_name(
        self, csi_sanity: SanityContext, csi_resources: Resources, kind: str
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        req = csi_sanity.snapshot_request(vol.volume_id, name=hostile(csi_sanity, kind))
        if kind == "nul":
            expect_error(csi_sanity.controller.CreateSnapshot, req, C.INVALID_ARGUMENT)
            return
        resp, _ = call_ok_or(csi_sanity.controller.CreateSnapshot, req, (C.INVALID_ARGUMENT,))
        if resp is not None:
            csi_resources.track_snapshot(resp.snapshot.snapshot_id)

    def test_delete_snapshot(self, csi_sanity: SanityContext, kind: str) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        call_ok_or(
            csi_sanity.controller.DeleteSnapshot,
            csi_sanity.delete_snapshot_request(hostile(csi_sanity, kind)),
            (C.INVALID_ARGUMENT,),
        )

    def test_get_snapshot(self, csi_sanity: SanityContext, kind: str) -> None:
        csi_sanity.need_controller(CtrlCap.GET_SNAPSHOT)
        expect_error(
            csi_sanity.controller.GetSnapshot,
            pb.GetSnapshotRequest(snapshot_id=hostile(csi_sanity, kind)),
            (C.NOT_FOUND, C.INVALID_ARGUMENT),
        )

    def test_list_snapshots_by_id(self, csi_sanity: SanityContext, kind: str) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_SNAPSHOTS)
        for field in ("snapshot_id", "source_volume_id"):
            req = pb.ListSnapshotsRequest()
            setattr(req, field, hostile(csi_sanity, kind))
            resp, _ = call_ok_or(
                csi_sanity.controller.ListSnapshots,
                req,
                (C.INVALID_ARGUMENT,),
            )
            if resp is not None:
                assert not resp.entries, f"ListSnapshots by hostile {field} returned entries"

    def test_node_stage(self, csi_sanity: SanityContext, csi_resources: Resources, kind: str) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        path = csi_resources.staging_path()
        vid = hostile(csi_sanity, kind)
        csi_resources.staged.append((vid, path))
        expect_error(
            csi_sanity.node.NodeStageVolume,
            pb.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=path, volume_capability=csi_sanity.capability()
            ),
            (C.NOT_FOUND, C.INVALID_ARGUMENT),
        )
        assert not is_mountpoint(path), "a hostile NodeStageVolume mounted something"

    def test_node_publish(self, csi_sanity: SanityContext, csi_resources: Resources, kind: str) -> None:
        vid = hostile(csi_sanity, kind)
        target = csi_resources.target_path()
        staging = csi_resources.staging_path() if csi_sanity.stages else ""
        req = csi_resources.publish_request(vid, target, staging)
        csi_resources.published.append((vid, target))
        expect_error(
            csi_sanity.node.NodePublishVolume, req, (C.NOT_FOUND, C.INVALID_ARGUMENT, C.FAILED_PRECONDITION)
        )
        assert not is_mountpoint(target), "a hostile NodePublishVolume mounted something"

    def test_node_unpublish(self, csi_sanity: SanityContext, csi_resources: Resources, kind: str) -> None:
        call_ok_or(
            csi_sanity.node.NodeUnpublishVolume,
            pb.NodeUnpublishVolumeRequest(
                volume_id=hostile(csi_sanity, kind), target_path=csi_resources.target_path()
            ),
            (C.NOT_FOUND, C.INVALID_ARGUMENT),
        )

    def test_node_unstage(self, csi_sanity: SanityContext, csi_resources: Resources, kind: str) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        call_ok_or(
            csi_sanity.node.NodeUnstageVolume,
            pb.NodeUnstageVolumeRequest(
                volume_id=hostile(csi_sanity, kind), staging_target_path=csi_resources.staging_path()
            ),
            (C.NOT_FOUND, C.INVALID_ARGUMENT),
        )

    def test_node_get_volume_stats(
        self, csi_sanity: SanityContext, csi_resources: Resources, kind: str
    ) -> None:
        csi_sanity.need_node(NodeCap.GET_VOLUME_STATS)
        expect_error(
            csi_sanity.node.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(
                volume_id=hostile(csi_sanity, kind), volume_path=csi_resources.workdir
            ),
            (C.NOT_FOUND, C.INVALID_ARGUMENT),
        )

    def test_node_expand_volume(self, csi_sanity: SanityContext, csi_resources: Resources, kind: str) -> None:
        csi_sanity.need_node(NodeCap.EXPAND_VOLUME)
        expect_error(
            csi_sanity.node.NodeExpandVolume,
            pb.NodeExpandVolumeRequest(
                volume_id=hostile(csi_sanity, kind), volume_path=csi_resources.workdir
            ),
            (C.NOT_FOUND, C.INVALID_ARGUMENT),
        )


class TestHostilePaths(_Alive):
    @pytest.mark.parametrize(
        "path", ["relative/target", "", "/tmp/sanity\x00nul"], ids=["relative", "empty", "nul"]
    )
    def test_publish_bad_target_path(
        self, csi_sanity: SanityContext, csi_resources: Resources, path: str
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        staging = csi_resources.staging_path() if csi_sanity.stages else ""
        req = csi_resources.publish_request(vol.volume_id, path, staging)
        expect_error(csi_sanity.node.NodePublishVolume, req, (C.INVALID_ARGUMENT, C.FAILED_PRECONDITION))

    def test_unpublish_leaves_foreign_directory_alone(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        """NodeUnpublishVolume of a path the driver never published (the
        canary) must not remove or change it."""
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        call_ok_or(
            csi_sanity.node.NodeUnpublishVolume,
            pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=csi_sanity.canary.victim),
            (C.NOT_FOUND, C.INVALID_ARGUMENT, C.FAILED_PRECONDITION),
        )
        csi_sanity.canary.assert_intact()

    def test_unstage_leaves_foreign_directory_alone(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        call_ok_or(
            csi_sanity.node.NodeUnstageVolume,
            pb.NodeUnstageVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=csi_sanity.canary.victim
            ),
            (C.NOT_FOUND, C.INVALID_ARGUMENT, C.FAILED_PRECONDITION),
        )
        csi_sanity.canary.assert_intact()

    def test_stats_of_foreign_path(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        """Stats for a real volume at a path it is not published at: the
        spec's "volume does not exist at volume_path" row, NOT_FOUND (what
        csi-sanity expects too)."""
        csi_sanity.need_node(NodeCap.GET_VOLUME_STATS)
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        expect_error(
            csi_sanity.node.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=csi_sanity.canary.victim),
            C.NOT_FOUND,
        )


class TestHostileEnums(_Alive):
    def _cap(self, csi_sanity: SanityContext, mode: int) -> Any:
        cap = csi_sanity.capability()
        cap.access_mode.mode = mode
        return cap

    @pytest.mark.parametrize("mode", [0, 99, 2**31 - 1], ids=["unknown", "99", "int32max"])
    def test_create_volume_access_mode(self, csi_sanity: SanityContext, mode: int) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request()
        req.volume_capabilities[0].CopyFrom(self._cap(csi_sanity, mode))
        expect_error(csi_sanity.controller.CreateVolume, req, C.INVALID_ARGUMENT)

    def test_validate_unknown_access_mode(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        resp, _ = call_ok_or(
            csi_sanity.controller.ValidateVolumeCapabilities,
            pb.ValidateVolumeCapabilitiesRequest(
                volume_id=vol.volume_id, volume_capabilities=[self._cap(csi_sanity, 99)]
            ),
            (C.INVALID_ARGUMENT,),
        )
        if resp is not None:
            assert not resp.HasField("confirmed"), "an unknown access mode was confirmed"

    def test_publish_unknown_access_mode(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        staging = csi_resources.staging_path() if csi_sanity.stages else ""
        target = csi_resources.target_path()
        req = csi_resources.publish_request(vol.volume_id, target, staging, cap=self._cap(csi_sanity, 99))
        csi_resources.published.append((vol.volume_id, target))
        expect_error(csi_sanity.node.NodePublishVolume, req, (C.INVALID_ARGUMENT, C.FAILED_PRECONDITION))
        assert not is_mountpoint(target)

    def test_get_capacity_unknown_access_mode(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.GET_CAPACITY)
        resp, _ = call_ok_or(
            csi_sanity.controller.GetCapacity,
            pb.GetCapacityRequest(volume_capabilities=[self._cap(csi_sanity, 99)]),
            (C.INVALID_ARGUMENT,),
        )
        if resp is not None:
            assert resp.available_capacity >= 0


class TestHostileSizes(_Alive):
    def test_create_int64_max(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request(size=INT64_MAX)
        expect_error(csi_sanity.controller.CreateVolume, req, (C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED))

    @pytest.mark.parametrize("field", ["required_bytes", "limit_bytes"])
    def test_create_negative(self, csi_sanity: SanityContext, field: str) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request()
        setattr(req.capacity_range, field, -csi_sanity.config.volume_size)
        expect_error(csi_sanity.controller.CreateVolume, req, (C.INVALID_ARGUMENT, C.OUT_OF_RANGE))

    def test_expand_int64_max(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.EXPAND_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        req = pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id)
        req.capacity_range.required_bytes = INT64_MAX
        expect_error(
            csi_sanity.controller.ControllerExpandVolume, req, (C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED)
        )
        if CtrlCap.GET_VOLUME in csi_sanity.caps.controller:
            got = csi_sanity.controller.ControllerGetVolume(
                pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)
            )
            assert got.volume.capacity_bytes == vol.capacity_bytes, "a refused expansion changed the size"

    def test_expand_negative(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.EXPAND_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        req = pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id)
        req.capacity_range.required_bytes = -1
        expect_error(csi_sanity.controller.ControllerExpandVolume, req, (C.INVALID_ARGUMENT, C.OUT_OF_RANGE))

    def test_huge_parameter_map(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        """8 KiB of parameters (the spec's map limit is 4 KiB)."""
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request(name=unique_name("bigparams"))
        for i in range(64):
            req.parameters[f"csi-sanity.example.com/k{i}"] = "x" * 128
        resp, _ = call_ok_or(csi_sanity.controller.CreateVolume, req, (C.INVALID_ARGUMENT,))
        if resp is not None:
            csi_resources.track_volume(resp.volume.volume_id)

    def test_list_volumes_huge_max_entries(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_VOLUMES)
        csi_sanity.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2**31 - 1))
