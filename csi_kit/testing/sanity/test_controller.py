"""Controller service: capabilities, GetCapacity, ListVolumes, CreateVolume,
DeleteVolume, ValidateVolumeCapabilities, ControllerPublish/Unpublish,
ControllerExpandVolume, ControllerGetVolume, ControllerModifyVolume."""

from __future__ import annotations

import pytest

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.sanity._support import (
    C,
    CtrlCap,
    Resources,
    SanityContext,
    call_ok_or,
    expect_error,
    unique_name,
)

__all__ = [
    "TestControllerCapabilities",
    "TestGetCapacity",
    "TestListVolumes",
    "TestCreateVolume",
    "TestDeleteVolume",
    "TestValidateVolumeCapabilities",
    "TestControllerPublishVolume",
    "TestControllerExpandVolume",
    "TestControllerGetVolume",
    "TestControllerModifyVolume",
]

NONEXISTENT_VOLUME = "sanity-no-such-volume-0123456789"
NONEXISTENT_SNAPSHOT = "sanity-no-such-snapshot-0123456789"


def _list_all_volumes(ctx: SanityContext, max_entries: int = 0) -> list[str]:
    ids: list[str] = []
    token = ""
    for _ in range(10000):
        resp = ctx.controller.ListVolumes(
            pb.ListVolumesRequest(max_entries=max_entries, starting_token=token)
        )
        if max_entries:
            assert len(resp.entries) <= max_entries, (
                f"ListVolumes returned {len(resp.entries)} entries for max_entries={max_entries}"
            )
        ids.extend(e.volume.volume_id for e in resp.entries)
        token = resp.next_token
        if not token:
            return ids
    raise AssertionError("ListVolumes pagination never ended")


class TestControllerCapabilities:
    def test_capabilities_are_known(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller()
        resp = csi_sanity.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
        known = set(CtrlCap.Type.values()) - {CtrlCap.UNKNOWN}
        for cap in resp.capabilities:
            assert cap.WhichOneof("type") == "rpc", f"capability without rpc: {cap}"
            assert cap.rpc.type in known, f"unknown controller capability {cap.rpc.type}"

    def test_capabilities_are_consistent(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller()
        caps = csi_sanity.caps.controller
        if CtrlCap.LIST_VOLUMES_PUBLISHED_NODES in caps:
            assert CtrlCap.PUBLISH_UNPUBLISH_VOLUME in caps, (
                "LIST_VOLUMES_PUBLISHED_NODES requires PUBLISH_UNPUBLISH_VOLUME"
            )
        if CtrlCap.PUBLISH_READONLY in caps:
            assert CtrlCap.PUBLISH_UNPUBLISH_VOLUME in caps, (
                "PUBLISH_READONLY without PUBLISH_UNPUBLISH_VOLUME"
            )

    def test_node_get_info_present_when_controller_publishes(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.PUBLISH_UNPUBLISH_VOLUME)
        assert csi_sanity.node_info.node_id, "NodeGetInfo is required with PUBLISH_UNPUBLISH_VOLUME"


class TestGetCapacity:
    def test_without_optional_fields(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.GET_CAPACITY)
        resp = csi_sanity.controller.GetCapacity(pb.GetCapacityRequest())
        assert resp.available_capacity >= 0
        if resp.HasField("maximum_volume_size"):
            assert resp.maximum_volume_size.value >= 0
        if resp.HasField("minimum_volume_size"):
            assert resp.minimum_volume_size.value >= 0

    def test_with_capabilities_and_parameters(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.GET_CAPACITY)
        resp = csi_sanity.controller.GetCapacity(
            pb.GetCapacityRequest(
                volume_capabilities=[csi_sanity.capability()], parameters=csi_sanity.config.parameters
            )
        )
        assert resp.available_capacity >= 0


class TestListVolumes:
    def test_entries_have_volume_ids(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_VOLUMES)
        csi_resources.create_volume()
        resp = csi_sanity.controller.ListVolumes(pb.ListVolumesRequest())
        assert resp.entries, "ListVolumes is empty although a volume exists"
        for e in resp.entries:
            assert e.volume.volume_id, f"ListVolumes entry without volume_id: {e}"
            assert e.volume.capacity_bytes >= 0
        if CtrlCap.LIST_VOLUMES_PUBLISHED_NODES in csi_sanity.caps.controller:
            for e in resp.entries:
                assert e.HasField("status"), "status is required with LIST_VOLUMES_PUBLISHED_NODES"

    def test_invalid_starting_token_is_aborted(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_VOLUMES)
        expect_error(
            csi_sanity.controller.ListVolumes,
            pb.ListVolumesRequest(starting_token="sanity-invalid-token-\u2603"),
            C.ABORTED,
        )

    def test_negative_max_entries_is_invalid(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_VOLUMES)
        expect_error(
            csi_sanity.controller.ListVolumes, pb.ListVolumesRequest(max_entries=-1), C.INVALID_ARGUMENT
        )

    def test_new_volume_listed_and_deleted_volume_gone(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_VOLUMES)
        before = set(_list_all_volumes(csi_sanity))
        vol = csi_resources.create_volume()
        after = set(_list_all_volumes(csi_sanity))
        assert vol.volume_id in after, "new volume is missing from ListVolumes"
        assert after - before == {vol.volume_id}
        csi_resources.delete_volume(vol.volume_id)
        assert vol.volume_id not in set(_list_all_volumes(csi_sanity)), "deleted volume still listed"

    def test_pagination_visits_every_volume_once(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_VOLUMES)
        made = {csi_resources.create_volume().volume_id for _ in range(5)}
        full = _list_all_volumes(csi_sanity)
        assert made <= set(full)
        for page in (1, 2, 3):
            paged = _list_all_volumes(csi_sanity, max_entries=page)
            assert len(paged) == len(set(paged)), f"ListVolumes max_entries={page} returned duplicates"
            assert set(paged) == set(full), f"ListVolumes max_entries={page} does not visit every volume"

    def test_max_entries_sets_next_token(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.LIST_VOLUMES)
        for _ in range(3):
            csi_resources.create_volume()
        resp = csi_sanity.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2))
        assert len(resp.entries) == 2
        assert resp.next_token, "more volumes than max_entries but no next_token"


class TestCreateVolume:
    def test_missing_name(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        expect_error(
            csi_sanity.controller.CreateVolume, csi_sanity.create_request(name=""), C.INVALID_ARGUMENT
        )

    def test_missing_volume_capabilities(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request()
        del req.volume_capabilities[:]
        expect_error(csi_sanity.controller.CreateVolume, req, C.INVALID_ARGUMENT)

    def test_capability_without_access_mode(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request()
        req.volume_capabilities[0].ClearField("access_mode")
        expect_error(csi_sanity.controller.CreateVolume, req, C.INVALID_ARGUMENT)

    def test_capability_without_access_type(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request()
        req.volume_capabilities[0].ClearField("mount")
        req.volume_capabilities[0].ClearField("block")
        expect_error(csi_sanity.controller.CreateVolume, req, C.INVALID_ARGUMENT)

    def test_without_capacity_range(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request()
        req.ClearField("capacity_range")
        vol = csi_resources.create_volume_from(req)
        assert vol.capacity_bytes >= 0

    def test_with_required_capacity(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        size = csi_sanity.config.volume_size
        vol = csi_resources.create_volume(size=size)
        assert vol.capacity_bytes == 0 or vol.capacity_bytes >= size, (
            f"capacity {vol.capacity_bytes} is below required_bytes {size}"
        )

    def test_limit_bytes_is_honoured(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        size = csi_sanity.config.volume_size
        req = csi_sanity.create_request(size=size)
        req.capacity_range.limit_bytes = size
        vol, err = call_ok_or(csi_sanity.controller.CreateVolume, req, (C.OUT_OF_RANGE,))
        if err is not None:
            return  # an exact size it cannot make is refused the right way
        csi_resources.track_volume(vol.volume.volume_id)
        assert vol.volume.capacity_bytes <= size, (
            f"capacity {vol.volume.capacity_bytes} exceeds limit_bytes {size}"
        )

    def test_limit_below_required_is_refused(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request(size=2 * csi_sanity.config.volume_size)
        req.capacity_range.limit_bytes = csi_sanity.config.volume_size
        expect_error(csi_sanity.controller.CreateVolume, req, (C.INVALID_ARGUMENT, C.OUT_OF_RANGE))

    def test_same_name_same_request_returns_same_volume(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request()
        first = csi_resources.create_volume_from(req)
        second = csi_resources.create_volume_from(req)
        assert second.volume_id == first.volume_id, "same name and request gave a second volume"
        assert second.capacity_bytes == first.capacity_bytes
        assert dict(second.volume_context) == dict(first.volume_context)

    def test_same_name_different_capacity_already_exists(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request()
        first = csi_resources.create_volume_from(req)
        # Strictly more than the volume has (it may have been rounded up), so
        # the existing volume cannot be compatible.
        bigger = 2 * max(first.capacity_bytes, csi_sanity.config.volume_size)
        other = pb.CreateVolumeRequest()
        other.CopyFrom(req)
        other.capacity_range.required_bytes = bigger
        other.capacity_range.limit_bytes = bigger
        expect_error(csi_sanity.controller.CreateVolume, other, C.ALREADY_EXISTS)

    def test_same_name_different_parameters_refused(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request()
        csi_resources.create_volume_from(req)
        other = pb.CreateVolumeRequest()
        other.CopyFrom(req)
        other.parameters["csi-sanity.example.com/different"] = "yes"
        # Incompatible parameters: ALREADY_EXISTS; a driver that rejects the
        # unknown key outright answers INVALID_ARGUMENT.  Never OK.
        expect_error(csi_sanity.controller.CreateVolume, other, (C.ALREADY_EXISTS, C.INVALID_ARGUMENT))

    def test_name_of_128_bytes_accepted(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        name = unique_name("max")
        name = name + "x" * (128 - len(name))
        assert len(name.encode()) == 128
        csi_resources.create_volume(name)

    def test_banned_control_characters_in_name(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        expect_error(
            csi_sanity.controller.CreateVolume,
            csi_sanity.create_request(name=unique_name("ctl") + "\x01"),
            C.INVALID_ARGUMENT,
        )

    def test_from_snapshot(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CREATE_DELETE_SNAPSHOT)
        src = csi_resources.create_volume()
        snap = csi_resources.create_snapshot(src.volume_id)
        req = csi_sanity.create_request()
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        vol = csi_resources.create_volume_from(req)
        assert vol.content_source.snapshot.snapshot_id == snap.snapshot_id, (
            "a volume made from a snapshot must name it in content_source"
        )

    def test_from_snapshot_not_found(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CREATE_DELETE_SNAPSHOT)
        req = csi_sanity.create_request()
        req.volume_content_source.snapshot.snapshot_id = NONEXISTENT_SNAPSHOT
        expect_error(csi_sanity.controller.CreateVolume, req, C.NOT_FOUND)

    def test_from_snapshot_smaller_than_snapshot_out_of_range(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CREATE_DELETE_SNAPSHOT)
        src = csi_resources.create_volume()
        snap = csi_resources.create_snapshot(src.volume_id)
        if snap.size_bytes < 2:
            pytest.skip("the snapshot reports no size")
        req = csi_sanity.create_request(size=snap.size_bytes // 2)
        req.capacity_range.limit_bytes = snap.size_bytes // 2
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        expect_error(csi_sanity.controller.CreateVolume, req, C.OUT_OF_RANGE)

    def test_from_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CLONE_VOLUME)
        src = csi_resources.create_volume()
        req = csi_sanity.create_request()
        req.volume_content_source.volume.volume_id = src.volume_id
        vol = csi_resources.create_volume_from(req)
        assert vol.volume_id != src.volume_id
        assert vol.content_source.volume.volume_id == src.volume_id, (
            "a cloned volume must name its source in content_source"
        )

    def test_from_volume_not_found(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CLONE_VOLUME)
        req = csi_sanity.create_request()
        req.volume_content_source.volume.volume_id = NONEXISTENT_VOLUME
        expect_error(csi_sanity.controller.CreateVolume, req, C.NOT_FOUND)

    def test_content_source_without_type(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request()
        req.volume_content_source.SetInParent()
        expect_error(csi_sanity.controller.CreateVolume, req, C.INVALID_ARGUMENT)

    def test_same_name_different_source_already_exists(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CLONE_VOLUME)
        src = csi_resources.create_volume()
        req = csi_sanity.create_request()
        csi_resources.create_volume_from(req)
        other = pb.CreateVolumeRequest()
        other.CopyFrom(req)
        other.volume_content_source.volume.volume_id = src.volume_id
        expect_error(csi_sanity.controller.CreateVolume, other, C.ALREADY_EXISTS)


class TestDeleteVolume:
    def test_missing_volume_id(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        expect_error(
            csi_sanity.controller.DeleteVolume, csi_sanity.delete_volume_request(""), C.INVALID_ARGUMENT
        )

    def test_unknown_volume_id_succeeds(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        csi_sanity.controller.DeleteVolume(csi_sanity.delete_volume_request(NONEXISTENT_VOLUME))

    def test_deletes_the_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        csi_resources.delete_volume(vol.volume_id)
        if CtrlCap.GET_VOLUME in csi_sanity.caps.controller:
            expect_error(
                csi_sanity.controller.ControllerGetVolume,
                pb.ControllerGetVolumeRequest(volume_id=vol.volume_id),
                C.NOT_FOUND,
            )
        expect_error(
            csi_sanity.controller.ValidateVolumeCapabilities,
            pb.ValidateVolumeCapabilitiesRequest(
                volume_id=vol.volume_id, volume_capabilities=[csi_sanity.capability()]
            ),
            C.NOT_FOUND,
        )

    def test_second_delete_succeeds(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        csi_resources.delete_volume(vol.volume_id)
        csi_sanity.controller.DeleteVolume(csi_sanity.delete_volume_request(vol.volume_id))

    def test_name_reusable_after_delete(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request()
        vol = csi_resources.create_volume_from(req)
        csi_resources.delete_volume(vol.volume_id)
        req.capacity_range.required_bytes = 2 * csi_sanity.config.volume_size
        again = csi_resources.create_volume_from(req)
        assert again.capacity_bytes == 0 or again.capacity_bytes >= req.capacity_range.required_bytes

    def test_snapshots_survive_volume_delete(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        """Volumes and snapshots are independent, or the delete is refused."""
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CREATE_DELETE_SNAPSHOT)
        src = csi_resources.create_volume()
        snap = csi_resources.create_snapshot(src.volume_id)
        _, err = call_ok_or(
            csi_sanity.controller.DeleteVolume,
            csi_sanity.delete_volume_request(src.volume_id),
            (C.FAILED_PRECONDITION,),
        )
        if err is not None:
            return
        csi_resources.forget_volume(src.volume_id)
        req = csi_sanity.create_request()
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        csi_resources.create_volume_from(req)
        if CtrlCap.LIST_SNAPSHOTS in csi_sanity.caps.controller:
            resp = csi_sanity.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=snap.snapshot_id))
            assert [e.snapshot.snapshot_id for e in resp.entries] == [snap.snapshot_id]


class TestValidateVolumeCapabilities:
    def test_confirms_the_created_capabilities(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        resp = csi_sanity.controller.ValidateVolumeCapabilities(
            pb.ValidateVolumeCapabilitiesRequest(
                volume_id=vol.volume_id,
                volume_context=vol.volume_context,
                volume_capabilities=[csi_sanity.capability()],
                parameters=csi_sanity.config.parameters,
                secrets=csi_sanity.config.secrets_for("ValidateVolumeCapabilities"),
            )
        )
        assert resp.HasField("confirmed"), f"capabilities used at creation not confirmed: {resp.message!r}"
        want = csi_sanity.capability()
        got = list(resp.confirmed.volume_capabilities)
        assert len(got) == 1, f"confirmed {len(got)} capabilities for the 1 asked"
        assert got[0].access_mode.mode == want.access_mode.mode, "confirmed another access mode"
        assert got[0].WhichOneof("access_type") == want.WhichOneof("access_type"), (
            "confirmed another access type"
        )

    def test_missing_volume_id(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller()
        expect_error(
            csi_sanity.controller.ValidateVolumeCapabilities,
            pb.ValidateVolumeCapabilitiesRequest(volume_capabilities=[csi_sanity.capability()]),
            C.INVALID_ARGUMENT,
        )

    def test_missing_volume_capabilities(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        expect_error(
            csi_sanity.controller.ValidateVolumeCapabilities,
            pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id),
            C.INVALID_ARGUMENT,
        )

    def test_unknown_volume(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller()
        expect_error(
            csi_sanity.controller.ValidateVolumeCapabilities,
            pb.ValidateVolumeCapabilitiesRequest(
                volume_id=NONEXISTENT_VOLUME, volume_capabilities=[csi_sanity.capability()]
            ),
            C.NOT_FOUND,
        )


class TestControllerPublishVolume:
    def _req(
        self, ctx: SanityContext, volume_id: str, node_id: str | None = None, readonly: bool = False
    ) -> object:
        return pb.ControllerPublishVolumeRequest(
            volume_id=volume_id,
            node_id=ctx.node_info.node_id if node_id is None else node_id,
            volume_capability=ctx.capability(),
            readonly=readonly,
            secrets=ctx.config.secrets_for("ControllerPublishVolume"),
        )

    def test_missing_volume_id(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.PUBLISH_UNPUBLISH_VOLUME)
        expect_error(
            csi_sanity.controller.ControllerPublishVolume, self._req(csi_sanity, ""), C.INVALID_ARGUMENT
        )

    def test_missing_node_id(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.PUBLISH_UNPUBLISH_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        expect_error(
            csi_sanity.controller.ControllerPublishVolume,
            self._req(csi_sanity, vol.volume_id, ""),
            C.INVALID_ARGUMENT,
        )

    def test_missing_volume_capability(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.PUBLISH_UNPUBLISH_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        req = self._req(csi_sanity, vol.volume_id)
        req.ClearField("volume_capability")  # type: ignore[attr-defined]
        expect_error(csi_sanity.controller.ControllerPublishVolume, req, C.INVALID_ARGUMENT)

    def test_unknown_volume(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.PUBLISH_UNPUBLISH_VOLUME)
        expect_error(
            csi_sanity.controller.ControllerPublishVolume,
            self._req(csi_sanity, NONEXISTENT_VOLUME),
            C.NOT_FOUND,
        )

    def test_unknown_node(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.PUBLISH_UNPUBLISH_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        expect_error(
            csi_sanity.controller.ControllerPublishVolume,
            self._req(csi_sanity, vol.volume_id, "sanity-no-such-node"),
            C.NOT_FOUND,
        )

    def test_publish_then_unpublish(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.PUBLISH_UNPUBLISH_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        csi_resources.controller_publish(vol.volume_id)
        csi_sanity.controller.ControllerUnpublishVolume(
            pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id=csi_sanity.node_info.node_id)
        )

    def test_incompatible_readonly_already_exists(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(
            CtrlCap.PUBLISH_UNPUBLISH_VOLUME, CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.PUBLISH_READONLY
        )
        vol = csi_resources.create_volume()
        csi_resources.controller_publish(vol.volume_id, readonly=False)
        expect_error(
            csi_sanity.controller.ControllerPublishVolume,
            self._req(csi_sanity, vol.volume_id, readonly=True),
            C.ALREADY_EXISTS,
        )

    def test_unpublish_missing_volume_id(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.PUBLISH_UNPUBLISH_VOLUME)
        expect_error(
            csi_sanity.controller.ControllerUnpublishVolume,
            pb.ControllerUnpublishVolumeRequest(node_id=csi_sanity.node_info.node_id),
            C.INVALID_ARGUMENT,
        )

    def test_unpublish_unknown_volume(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.PUBLISH_UNPUBLISH_VOLUME)
        call_ok_or(
            csi_sanity.controller.ControllerUnpublishVolume,
            pb.ControllerUnpublishVolumeRequest(
                volume_id=NONEXISTENT_VOLUME, node_id=csi_sanity.node_info.node_id
            ),
            (C.NOT_FOUND,),
        )


class TestControllerExpandVolume:
    def _req(self, ctx: SanityContext, volume_id: str, size: int | None) -> object:
        req = pb.ControllerExpandVolumeRequest(
            volume_id=volume_id, secrets=ctx.config.secrets_for("ControllerExpandVolume")
        )
        if size is not None:
            req.capacity_range.required_bytes = size
        return req

    def test_missing_volume_id(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.EXPAND_VOLUME)
        expect_error(
            csi_sanity.controller.ControllerExpandVolume,
            self._req(csi_sanity, "", csi_sanity.config.target_expand_size),
            C.INVALID_ARGUMENT,
        )

    def test_missing_capacity_range(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.EXPAND_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        expect_error(
            csi_sanity.controller.ControllerExpandVolume,
            self._req(csi_sanity, vol.volume_id, None),
            C.INVALID_ARGUMENT,
        )

    def test_unknown_volume(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.EXPAND_VOLUME)
        expect_error(
            csi_sanity.controller.ControllerExpandVolume,
            self._req(csi_sanity, NONEXISTENT_VOLUME, csi_sanity.config.target_expand_size),
            C.NOT_FOUND,
        )

    def test_grows_the_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.EXPAND_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        size = csi_sanity.config.target_expand_size
        resp = csi_sanity.controller.ControllerExpandVolume(self._req(csi_sanity, vol.volume_id, size))
        assert resp.capacity_bytes >= size, f"expanded capacity {resp.capacity_bytes} is below {size}"
        if CtrlCap.GET_VOLUME in csi_sanity.caps.controller:
            got = csi_sanity.controller.ControllerGetVolume(
                pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)
            )
            assert got.volume.capacity_bytes >= size, "ControllerGetVolume does not show the new size"

    def test_smaller_request_does_not_shrink(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.EXPAND_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        size = csi_sanity.config.target_expand_size
        grown = csi_sanity.controller.ControllerExpandVolume(self._req(csi_sanity, vol.volume_id, size))
        again = csi_sanity.controller.ControllerExpandVolume(
            self._req(csi_sanity, vol.volume_id, csi_sanity.config.volume_size)
        )
        assert again.capacity_bytes >= grown.capacity_bytes, "a smaller expansion request shrank the volume"


class TestControllerGetVolume:
    def test_returns_the_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.GET_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        resp = csi_sanity.controller.ControllerGetVolume(
            pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)
        )
        assert resp.volume.volume_id == vol.volume_id
        assert resp.volume.capacity_bytes == vol.capacity_bytes
        assert dict(resp.volume.volume_context) == dict(vol.volume_context), "volume_context changed"
        if CtrlCap.VOLUME_CONDITION in csi_sanity.caps.controller:
            assert resp.status.HasField("volume_condition"), "VOLUME_CONDITION advertised but no condition"
            assert not resp.status.volume_condition.abnormal, resp.status.volume_condition.message

    def test_missing_volume_id(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.GET_VOLUME)
        expect_error(
            csi_sanity.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest(), C.INVALID_ARGUMENT
        )

    def test_unknown_volume(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.GET_VOLUME)
        expect_error(
            csi_sanity.controller.ControllerGetVolume,
            pb.ControllerGetVolumeRequest(volume_id=NONEXISTENT_VOLUME),
            C.NOT_FOUND,
        )


class TestControllerModifyVolume:
    def test_missing_volume_id(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.MODIFY_VOLUME)
        expect_error(
            csi_sanity.controller.ControllerModifyVolume,
            pb.ControllerModifyVolumeRequest(mutable_parameters={"a": "b"}),
            C.INVALID_ARGUMENT,
        )

    def test_missing_mutable_parameters(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.MODIFY_VOLUME, CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        expect_error(
            csi_sanity.controller.ControllerModifyVolume,
            pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id),
            C.INVALID_ARGUMENT,
        )

    def test_unknown_volume(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.MODIFY_VOLUME)
        expect_error(
            csi_sanity.controller.ControllerModifyVolume,
            pb.ControllerModifyVolumeRequest(volume_id=NONEXISTENT_VOLUME, mutable_parameters={"a": "b"}),
            (C.NOT_FOUND, C.INVALID_ARGUMENT),
        )
