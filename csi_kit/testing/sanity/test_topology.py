"""Topology, capacity limits, published-node reporting and secrets hygiene."""

from __future__ import annotations

from typing import Any

import pytest

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.sanity._support import (
    C,
    CtrlCap,
    PluginSvc,
    Resources,
    SanityContext,
    call_ok_or,
    expect_error,
)

__all__ = ["TestTopology", "TestCapacityLimits", "TestPublishedNodes", "TestSecrets"]

SECRET = "sanity-secret-value-7f3a9c"


def _node_topology(ctx: SanityContext) -> dict[str, str]:
    info = ctx.node_info
    return dict(info.accessible_topology.segments) if info.HasField("accessible_topology") else {}


def _need_topology(ctx: SanityContext) -> dict[str, str]:
    ctx.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
    if PluginSvc.VOLUME_ACCESSIBILITY_CONSTRAINTS not in ctx.caps.plugin:
        pytest.skip("driver does not advertise VOLUME_ACCESSIBILITY_CONSTRAINTS")
    segments = _node_topology(ctx)
    if not segments:
        pytest.skip("NodeGetInfo reports no topology")
    return segments


class TestTopology:
    def test_volume_topology_needs_the_capability(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        if vol.accessible_topology:
            assert PluginSvc.VOLUME_ACCESSIBILITY_CONSTRAINTS in csi_sanity.caps.plugin, (
                "accessible_topology returned without VOLUME_ACCESSIBILITY_CONSTRAINTS"
            )

    def test_requisite_is_honoured(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        """Requisite = this node's segments: the volume must be accessible there."""
        segments = _need_topology(csi_sanity)
        req = csi_sanity.create_request()
        req.accessibility_requirements.requisite.add(segments=segments)
        req.accessibility_requirements.preferred.add(segments=segments)
        vol = csi_resources.create_volume_from(req)
        got = [dict(t.segments) for t in vol.accessible_topology]
        assert got, "a volume made with requisite topology reports none"
        assert segments in got, f"volume accessible from {got}, requisite was {segments}"

    def test_unreachable_requisite_is_resource_exhausted(self, csi_sanity: SanityContext) -> None:
        """A well-formed topology the driver cannot serve: RESOURCE_EXHAUSTED
        (the spec's "unable to provision in accessible_topology")."""
        segments = _need_topology(csi_sanity)
        elsewhere = {k: "sanity-nowhere" for k in segments}
        req = csi_sanity.create_request()
        req.accessibility_requirements.requisite.add(segments=elsewhere)
        expect_error(csi_sanity.controller.CreateVolume, req, (C.RESOURCE_EXHAUSTED, C.INVALID_ARGUMENT))

    def test_get_capacity_for_node_topology(self, csi_sanity: SanityContext) -> None:
        segments = _need_topology(csi_sanity)
        csi_sanity.need_controller(CtrlCap.GET_CAPACITY)
        resp = csi_sanity.controller.GetCapacity(
            pb.GetCapacityRequest(accessible_topology=pb.Topology(segments=segments))
        )
        assert resp.available_capacity >= 0


class TestCapacityLimits:
    def test_above_maximum_volume_size_refused(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.GET_CAPACITY, CtrlCap.CREATE_DELETE_VOLUME)
        resp = csi_sanity.controller.GetCapacity(
            pb.GetCapacityRequest(
                volume_capabilities=[csi_sanity.capability()], parameters=csi_sanity.config.parameters
            )
        )
        if not resp.HasField("maximum_volume_size") or resp.maximum_volume_size.value >= 2**62:
            pytest.skip("GetCapacity reports no maximum_volume_size")
        req = csi_sanity.create_request(size=resp.maximum_volume_size.value + 1)
        expect_error(csi_sanity.controller.CreateVolume, req, (C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED))

    def test_below_minimum_volume_size_is_rounded_or_refused(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        """limit_bytes under the driver's minimum: refused, or honoured."""
        csi_sanity.need_controller(CtrlCap.GET_CAPACITY, CtrlCap.CREATE_DELETE_VOLUME)
        resp = csi_sanity.controller.GetCapacity(
            pb.GetCapacityRequest(volume_capabilities=[csi_sanity.capability()])
        )
        if not resp.HasField("minimum_volume_size") or resp.minimum_volume_size.value < 2:
            pytest.skip("GetCapacity reports no minimum_volume_size")
        tiny = resp.minimum_volume_size.value - 1
        req = csi_sanity.create_request(size=tiny)
        req.capacity_range.limit_bytes = tiny
        got, _ = call_ok_or(csi_sanity.controller.CreateVolume, req, (C.OUT_OF_RANGE, C.INVALID_ARGUMENT))
        if got is not None:
            assert got.volume.capacity_bytes <= tiny, "limit_bytes exceeded"


class TestPublishedNodes:
    def test_list_volumes_reports_published_node(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(
            CtrlCap.LIST_VOLUMES, CtrlCap.LIST_VOLUMES_PUBLISHED_NODES, CtrlCap.CREATE_DELETE_VOLUME
        )
        vol = csi_resources.create_volume()
        csi_resources.controller_publish(vol.volume_id)
        entries = [
            e
            for e in csi_sanity.controller.ListVolumes(pb.ListVolumesRequest()).entries
            if e.volume.volume_id == vol.volume_id
        ]
        assert len(entries) == 1
        assert csi_sanity.node_info.node_id in entries[0].status.published_node_ids

    def test_get_volume_reports_published_node(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.GET_VOLUME, CtrlCap.LIST_VOLUMES_PUBLISHED_NODES)
        vol = csi_resources.create_volume()
        csi_resources.controller_publish(vol.volume_id)
        got = csi_sanity.controller.ControllerGetVolume(
            pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)
        )
        assert csi_sanity.node_info.node_id in got.status.published_node_ids


def _no_secret(err: Any, rpc: str) -> None:
    assert SECRET not in (err.details() or ""), f"{rpc} echoed a secret value in its error message"


class TestSecrets:
    """Fields marked csi_secret must never be shown: not in error messages."""

    def test_create_volume_error_hides_secrets(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        req = csi_sanity.create_request(name="")
        req.secrets["password"] = SECRET
        req.secrets[SECRET] = SECRET
        _no_secret(expect_error(csi_sanity.controller.CreateVolume, req, C.INVALID_ARGUMENT), "CreateVolume")

    def test_node_publish_error_hides_secrets(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        req = csi_resources.publish_request("", csi_resources.target_path())
        req.secrets["password"] = SECRET
        err = expect_error(csi_sanity.node.NodePublishVolume, req, C.INVALID_ARGUMENT)
        _no_secret(err, "NodePublishVolume")

    def test_create_snapshot_error_hides_secrets(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        req = csi_sanity.snapshot_request("sanity-no-such-volume-0123456789")
        req.secrets["password"] = SECRET
        err = expect_error(csi_sanity.controller.CreateSnapshot, req, (C.NOT_FOUND, C.INVALID_ARGUMENT))
        _no_secret(err, "CreateSnapshot")
