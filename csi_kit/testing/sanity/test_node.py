"""Node service: capabilities, NodeGetInfo, Stage/Unstage, Publish/Unpublish,
NodeGetVolumeStats, NodeExpandVolume, and the data a workload sees.

Tests that stage or publish real volumes are marked `privileged`: a real
driver needs root to mount, and the suite needs it to write through the
published path.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

import grpc
import pytest

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.sanity._support import (
    C,
    CtrlCap,
    Mode,
    NodeCap,
    Published,
    Resources,
    SanityContext,
    block_read,
    block_write,
    call_ok_or,
    expect_error,
    is_block_device,
    is_mountpoint,
    read_tokens,
    write_token,
)

__all__ = [
    "TestNodeCapabilities",
    "TestNodeGetInfo",
    "TestNodeStageVolume",
    "TestNodeUnstageVolume",
    "TestNodePublishVolume",
    "TestNodeUnpublishVolume",
    "TestNodeLifecycle",
    "TestNodeGetVolumeStats",
    "TestNodeExpandVolume",
]

NONEXISTENT_VOLUME = "sanity-no-such-volume-0123456789"
_TOPO_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


def _need_volumes(ctx: SanityContext) -> None:
    ctx.need_controller(CtrlCap.CREATE_DELETE_VOLUME)


def _stage_req(ctx: SanityContext, volume_id: str, path: str, cap: Any = None) -> pb.NodeStageVolumeRequest:
    return pb.NodeStageVolumeRequest(
        volume_id=volume_id,
        staging_target_path=path,
        volume_capability=cap or ctx.capability(),
        secrets=ctx.config.secrets_for("NodeStageVolume"),
    )


def check_usable(ctx: SanityContext, p: Published, token: str) -> None:
    """The published path is what the access type promises, and works."""
    if ctx.config.access_type == "block":
        assert is_block_device(p.target_path), f"{p.target_path} is not a block device"
        if not p.readonly:
            block_write(p.target_path, 4096, token.encode().ljust(512, b"\0"))
            assert block_read(p.target_path, 4096, 512).rstrip(b"\0") == token.encode()
        return
    assert os.path.isdir(p.target_path), f"published path {p.target_path} is not a directory"
    if not p.readonly:
        data = write_token(p.target_path, token)
        assert read_tokens(p.target_path)[token] == data


class TestNodeCapabilities:
    def test_capabilities_are_known(self, csi_sanity: SanityContext) -> None:
        resp = csi_sanity.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest())
        known = set(NodeCap.Type.values()) - {NodeCap.UNKNOWN}
        for cap in resp.capabilities:
            assert cap.WhichOneof("type") == "rpc", f"node capability without rpc: {cap}"
            assert cap.rpc.type in known, f"unknown node capability {cap.rpc.type}"


class TestNodeGetInfo:
    def test_node_id_is_set(self, csi_sanity: SanityContext) -> None:
        info = csi_sanity.node.NodeGetInfo(pb.NodeGetInfoRequest())
        assert info.node_id, "NodeGetInfo: node_id is REQUIRED"
        assert len(info.node_id.encode()) <= 256, "node_id is longer than 256 bytes"
        assert info.max_volumes_per_node >= 0

    def test_topology_matches_plugin_capability(self, csi_sanity: SanityContext) -> None:
        from csi_kit.testing.sanity._support import PluginSvc

        info = csi_sanity.node.NodeGetInfo(pb.NodeGetInfoRequest())
        if info.HasField("accessible_topology") and info.accessible_topology.segments:
            assert PluginSvc.VOLUME_ACCESSIBILITY_CONSTRAINTS in csi_sanity.caps.plugin, (
                "topology reported without VOLUME_ACCESSIBILITY_CONSTRAINTS"
            )
            for key, value in info.accessible_topology.segments.items():
                name = key.rsplit("/", 1)[-1]
                assert _TOPO_VALUE.match(name), f"bad topology key {key!r}"
                assert _TOPO_VALUE.match(value), f"bad topology value {value!r}"

    def test_is_stable(self, csi_sanity: SanityContext) -> None:
        first = csi_sanity.node.NodeGetInfo(pb.NodeGetInfoRequest())
        assert csi_sanity.node.NodeGetInfo(pb.NodeGetInfoRequest()) == first


class TestNodeStageVolume:
    def test_missing_volume_id(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        expect_error(
            csi_sanity.node.NodeStageVolume,
            _stage_req(csi_sanity, "", csi_resources.staging_path()),
            C.INVALID_ARGUMENT,
        )

    def test_missing_staging_target_path(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        expect_error(
            csi_sanity.node.NodeStageVolume, _stage_req(csi_sanity, vol.volume_id, ""), C.INVALID_ARGUMENT
        )

    def test_missing_volume_capability(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        req = _stage_req(csi_sanity, vol.volume_id, csi_resources.staging_path())
        req.ClearField("volume_capability")
        expect_error(csi_sanity.node.NodeStageVolume, req, C.INVALID_ARGUMENT)

    def test_unknown_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        path = csi_resources.staging_path()
        expect_error(
            csi_sanity.node.NodeStageVolume, _stage_req(csi_sanity, NONEXISTENT_VOLUME, path), C.NOT_FOUND
        )
        assert not is_mountpoint(path)

    @pytest.mark.privileged
    def test_stage_then_unstage(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        pctx = csi_resources.controller_publish(vol.volume_id)
        path = csi_resources.stage(vol.volume_id, pctx)
        csi_sanity.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=path)
        )
        csi_resources.staged.remove((vol.volume_id, path))
        assert not is_mountpoint(path), "staging path is still a mount point after NodeUnstageVolume"


class TestNodeUnstageVolume:
    def test_missing_volume_id(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        expect_error(
            csi_sanity.node.NodeUnstageVolume,
            pb.NodeUnstageVolumeRequest(staging_target_path=csi_resources.staging_path()),
            C.INVALID_ARGUMENT,
        )

    def test_missing_staging_target_path(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        expect_error(
            csi_sanity.node.NodeUnstageVolume,
            pb.NodeUnstageVolumeRequest(volume_id=NONEXISTENT_VOLUME),
            C.INVALID_ARGUMENT,
        )

    def test_not_staged_succeeds(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        csi_sanity.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=csi_resources.staging_path()
            )
        )


class TestNodePublishVolume:
    def test_missing_volume_id(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        req = csi_resources.publish_request("", csi_resources.target_path(), "")
        expect_error(csi_sanity.node.NodePublishVolume, req, C.INVALID_ARGUMENT)

    def test_missing_target_path(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        staging = csi_resources.staging_path() if csi_sanity.stages else ""
        req = csi_resources.publish_request(vol.volume_id, "", staging)
        expect_error(csi_sanity.node.NodePublishVolume, req, C.INVALID_ARGUMENT)

    def test_missing_volume_capability(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        staging = csi_resources.staging_path() if csi_sanity.stages else ""
        req = csi_resources.publish_request(vol.volume_id, csi_resources.target_path(), staging)
        req.ClearField("volume_capability")
        expect_error(csi_sanity.node.NodePublishVolume, req, C.INVALID_ARGUMENT)

    def test_unknown_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        staging = csi_resources.staging_path() if csi_sanity.stages else ""
        target = csi_resources.target_path()
        req = csi_resources.publish_request(NONEXISTENT_VOLUME, target, staging)
        expect_error(csi_sanity.node.NodePublishVolume, req, C.NOT_FOUND)
        assert not is_mountpoint(target)

    def test_staging_path_not_set(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        req = csi_resources.publish_request(vol.volume_id, csi_resources.target_path(), "")
        expect_error(csi_sanity.node.NodePublishVolume, req, (C.FAILED_PRECONDITION, C.INVALID_ARGUMENT))

    @pytest.mark.privileged
    def test_wrong_staging_path(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        """Publishing from a staging path the volume was never staged at."""
        csi_sanity.need_node(NodeCap.STAGE_UNSTAGE_VOLUME)
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        pctx = csi_resources.controller_publish(vol.volume_id)
        csi_resources.stage(vol.volume_id, pctx)
        wrong = csi_resources.staging_path("wrong")
        target = csi_resources.target_path()
        req = csi_resources.publish_request(vol.volume_id, target, wrong, publish_context=pctx)
        csi_resources.published.append((vol.volume_id, target))
        expect_error(
            csi_sanity.node.NodePublishVolume, req, (C.FAILED_PRECONDITION, C.NOT_FOUND, C.INVALID_ARGUMENT)
        )
        assert not is_mountpoint(target)

    @pytest.mark.privileged
    def test_repeat_publish_is_idempotent(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        p = csi_resources.publish(vol.volume_id)
        req = csi_resources.publish_request(vol.volume_id, p.target_path, p.staging_path)
        csi_sanity.node.NodePublishVolume(req)
        check_usable(csi_sanity, p, "repeat")
        csi_resources.unpublish(p)

    @pytest.mark.privileged
    def test_same_target_different_readonly_already_exists(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        p = csi_resources.publish(vol.volume_id)
        req = csi_resources.publish_request(vol.volume_id, p.target_path, p.staging_path, readonly=True)
        expect_error(csi_sanity.node.NodePublishVolume, req, C.ALREADY_EXISTS)

    @pytest.mark.privileged
    def test_single_node_writer_second_target(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        """SINGLE_NODE_WRITER at a second target on the same node.

        The spec's table says FAILED_PRECONDITION (a SHOULD), but Kubernetes
        publishes a ReadWriteOnce volume to every pod on its node, so drivers
        accept it; either answer passes, and an accepted second target must
        work and show the same data as the first.
        """
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        p = csi_resources.publish(vol.volume_id)
        second = csi_resources.target_path("second")
        req = csi_resources.publish_request(vol.volume_id, second, p.staging_path)
        csi_resources.published.append((vol.volume_id, second))
        _, err = call_ok_or(csi_sanity.node.NodePublishVolume, req, (C.FAILED_PRECONDITION,))
        if err is not None:
            assert not is_mountpoint(second), "a refused NodePublishVolume left a mount behind"
            return
        if csi_sanity.config.access_type == "mount":
            data = write_token(p.target_path, "first-target")
            assert read_tokens(second) == {"first-target": data}, "the second target shows other data"
        else:
            check_usable(csi_sanity, Published(vol.volume_id, second, p.staging_path), "second")

    def _second_target(self, ctx: SanityContext, res: Resources, mode: int) -> tuple[Any, Any, str]:
        """Publish a volume of access mode `mode` once; return the request for a
        second target with the same arguments (tracked for cleanup)."""
        if CtrlCap.SINGLE_NODE_MULTI_WRITER not in ctx.caps.controller and (
            NodeCap.SINGLE_NODE_MULTI_WRITER not in ctx.caps.node
        ):
            pytest.skip("driver does not advertise SINGLE_NODE_MULTI_WRITER")
        _need_volumes(ctx)
        cap = ctx.capability(mode)
        req = ctx.create_request()
        req.volume_capabilities[0].CopyFrom(cap)
        vol = res.create_volume_from(req)
        first = res.publish(vol.volume_id, cap=cap)
        second = res.target_path("second")
        res.published.append((vol.volume_id, second))
        return res.publish_request(vol.volume_id, second, first.staging_path, cap=cap), vol, second

    @pytest.mark.privileged
    def test_single_node_single_writer_second_target_refused(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        req, _, second = self._second_target(csi_sanity, csi_resources, Mode.SINGLE_NODE_SINGLE_WRITER)
        expect_error(csi_sanity.node.NodePublishVolume, req, C.FAILED_PRECONDITION)
        assert not is_mountpoint(second)

    @pytest.mark.privileged
    def test_single_node_multi_writer_second_target_allowed(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        req, vol, second = self._second_target(csi_sanity, csi_resources, Mode.SINGLE_NODE_MULTI_WRITER)
        csi_sanity.node.NodePublishVolume(req)
        check_usable(csi_sanity, Published(vol.volume_id, second, req.staging_target_path), "snmw")

    @pytest.mark.privileged
    def test_multi_node_reader_second_target_allowed(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        _need_volumes(csi_sanity)
        cap = csi_sanity.capability(Mode.MULTI_NODE_READER_ONLY)
        req = csi_sanity.create_request()
        req.volume_capabilities[0].CopyFrom(cap)
        try:
            vol = csi_sanity.controller.CreateVolume(req).volume
        except grpc.RpcError as err:  # any refusal: the mode is not supported
            pytest.skip(f"no MULTI_NODE_READER_ONLY volumes ({err.code().name}: {err.details()})")
        csi_resources.track_volume(vol.volume_id)
        p1 = csi_resources.publish(vol.volume_id, readonly=True, cap=cap)
        target = csi_resources.target_path("second")
        csi_resources.node_publish(
            csi_resources.publish_request(vol.volume_id, target, p1.staging_path, readonly=True, cap=cap)
        )
        check_usable(csi_sanity, Published(vol.volume_id, target, p1.staging_path, True), "mnr")


class TestNodeUnpublishVolume:
    def test_missing_volume_id(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        expect_error(
            csi_sanity.node.NodeUnpublishVolume,
            pb.NodeUnpublishVolumeRequest(target_path=csi_resources.target_path()),
            C.INVALID_ARGUMENT,
        )

    def test_missing_target_path(self, csi_sanity: SanityContext) -> None:
        expect_error(
            csi_sanity.node.NodeUnpublishVolume,
            pb.NodeUnpublishVolumeRequest(volume_id=NONEXISTENT_VOLUME),
            C.INVALID_ARGUMENT,
        )

    def test_not_published_succeeds(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        csi_sanity.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=csi_resources.target_path())
        )


@pytest.mark.privileged
class TestNodeLifecycle:
    def test_publish_write_unpublish(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        p = csi_resources.publish(vol.volume_id)
        assert csi_sanity.config.access_type == "block" or is_mountpoint(p.target_path), (
            f"{p.target_path} is not a mount point after NodePublishVolume"
        )
        check_usable(csi_sanity, p, "lifecycle")
        csi_resources.unpublish(p)
        assert not is_mountpoint(p.target_path), "target still mounted after NodeUnpublishVolume"
        assert not os.path.lexists(p.target_path), (
            "NodeUnpublishVolume must delete the file or directory the SP created at target_path"
        )
        if p.staging_path:
            assert not is_mountpoint(p.staging_path), "staging path still mounted after NodeUnstageVolume"

    def test_data_survives_republish(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        _need_volumes(csi_sanity)
        if csi_sanity.config.access_type == "block":
            pytest.skip("data checks through files need a mount volume")
        vol = csi_resources.create_volume()
        p = csi_resources.publish(vol.volume_id)
        data = write_token(p.target_path, "persist")
        csi_resources.unpublish(p)
        p2 = csi_resources.publish(vol.volume_id)
        assert read_tokens(p2.target_path) == {"persist": data}, "data written before unpublish is gone"

    def test_readonly_publish_refuses_writes(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        _need_volumes(csi_sanity)
        if csi_sanity.config.access_type == "block":
            pytest.skip("read-only check through files needs a mount volume")
        vol = csi_resources.create_volume()
        rw = csi_resources.publish(vol.volume_id)
        data = write_token(rw.target_path, "before-ro")
        csi_resources.unpublish(rw)
        ro = csi_resources.publish(vol.volume_id, readonly=True)
        assert read_tokens(ro.target_path) == {"before-ro": data}
        with pytest.raises(OSError) as exc:
            write_token(ro.target_path, "must-fail")
        assert exc.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), exc.value

    def test_new_volume_is_empty(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        _need_volumes(csi_sanity)
        if csi_sanity.config.access_type == "block":
            pytest.skip("emptiness check through files needs a mount volume")
        vol = csi_resources.create_volume()
        p = csi_resources.publish(vol.volume_id)
        leftovers = [n for n in os.listdir(p.target_path) if n != "lost+found"]
        assert leftovers == [], f"a new volume already holds {leftovers}"

    def test_restored_volume_has_snapshot_data(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CREATE_DELETE_SNAPSHOT)
        if csi_sanity.config.access_type == "block":
            pytest.skip("data checks through files need a mount volume")
        vol = csi_resources.create_volume()
        p = csi_resources.publish(vol.volume_id)
        before = write_token(p.target_path, "before-snapshot")
        csi_resources.unpublish(p)
        snap = csi_resources.create_snapshot(vol.volume_id)
        p = csi_resources.publish(vol.volume_id)
        write_token(p.target_path, "after-snapshot")
        csi_resources.unpublish(p)
        req = csi_sanity.create_request()
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        restored = csi_resources.create_volume_from(req)
        pr = csi_resources.publish(restored.volume_id)
        assert read_tokens(pr.target_path) == {"before-snapshot": before}, (
            "a volume restored from a snapshot must hold exactly the data written before the snapshot"
        )

    def test_clone_is_independent(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME, CtrlCap.CLONE_VOLUME)
        if csi_sanity.config.access_type == "block":
            pytest.skip("data checks through files need a mount volume")
        src = csi_resources.create_volume()
        p = csi_resources.publish(src.volume_id)
        original = write_token(p.target_path, "original")
        csi_resources.unpublish(p)
        req = csi_sanity.create_request()
        req.volume_content_source.volume.volume_id = src.volume_id
        clone = csi_resources.create_volume_from(req)
        pc = csi_resources.publish(clone.volume_id)
        assert read_tokens(pc.target_path) == {"original": original}, (
            "the clone does not hold the source's data"
        )
        write_token(pc.target_path, "clone-only")
        csi_resources.unpublish(pc)
        ps = csi_resources.publish(src.volume_id)
        assert read_tokens(ps.target_path) == {"original": original}, "writing to a clone changed its source"


class TestNodeGetVolumeStats:
    def test_missing_volume_id(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.GET_VOLUME_STATS)
        expect_error(
            csi_sanity.node.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(volume_path=csi_resources.workdir),
            C.INVALID_ARGUMENT,
        )

    def test_missing_volume_path(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_node(NodeCap.GET_VOLUME_STATS)
        expect_error(
            csi_sanity.node.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(volume_id=NONEXISTENT_VOLUME),
            C.INVALID_ARGUMENT,
        )

    def test_unknown_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.GET_VOLUME_STATS)
        expect_error(
            csi_sanity.node.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(volume_id=NONEXISTENT_VOLUME, volume_path=csi_resources.workdir),
            C.NOT_FOUND,
        )

    def test_unknown_volume_relative_path(self, csi_sanity: SanityContext) -> None:
        """csi-sanity sends an unknown id with `some/path` and expects
        NOT_FOUND: the volume is looked up before the path is judged."""
        csi_sanity.need_node(NodeCap.GET_VOLUME_STATS)
        expect_error(
            csi_sanity.node.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(volume_id=NONEXISTENT_VOLUME, volume_path="some/path"),
            C.NOT_FOUND,
        )

    @pytest.mark.privileged
    def test_unknown_volume_path(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.GET_VOLUME_STATS)
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        csi_resources.publish(vol.volume_id)
        expect_error(
            csi_sanity.node.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(
                volume_id=vol.volume_id, volume_path=os.path.join(csi_resources.workdir, "no-such-path")
            ),
            C.NOT_FOUND,
        )

    @pytest.mark.privileged
    def test_reports_usage_of_published_volume(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_node(NodeCap.GET_VOLUME_STATS)
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        p = csi_resources.publish(vol.volume_id)
        resp = csi_sanity.node.NodeGetVolumeStats(
            pb.NodeGetVolumeStatsRequest(
                volume_id=vol.volume_id, volume_path=p.target_path, staging_target_path=p.staging_path
            )
        )
        units = {u.unit for u in resp.usage}
        if csi_sanity.config.access_type == "mount":
            assert pb.VolumeUsage.BYTES in units, "no BYTES usage for a mounted volume"
        for u in resp.usage:
            assert u.unit != pb.VolumeUsage.UNKNOWN, "usage with UNKNOWN unit"
            assert u.total >= 0 and u.used >= 0 and u.available >= 0, f"negative usage: {u}"
            if u.unit == pb.VolumeUsage.BYTES:
                assert u.total > 0, "BYTES total is 0"
        if NodeCap.VOLUME_CONDITION in csi_sanity.caps.node:
            assert resp.HasField("volume_condition"), "VOLUME_CONDITION advertised but no condition reported"
            assert not resp.volume_condition.abnormal, resp.volume_condition.message


class TestNodeExpandVolume:
    def test_missing_volume_id(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.EXPAND_VOLUME)
        expect_error(
            csi_sanity.node.NodeExpandVolume,
            pb.NodeExpandVolumeRequest(volume_path=csi_resources.workdir),
            C.INVALID_ARGUMENT,
        )

    def test_missing_volume_path(self, csi_sanity: SanityContext) -> None:
        csi_sanity.need_node(NodeCap.EXPAND_VOLUME)
        expect_error(
            csi_sanity.node.NodeExpandVolume,
            pb.NodeExpandVolumeRequest(volume_id=NONEXISTENT_VOLUME),
            C.INVALID_ARGUMENT,
        )

    def test_unknown_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.EXPAND_VOLUME)
        expect_error(
            csi_sanity.node.NodeExpandVolume,
            pb.NodeExpandVolumeRequest(volume_id=NONEXISTENT_VOLUME, volume_path=csi_resources.workdir),
            C.NOT_FOUND,
        )

    def test_unknown_volume_relative_path(self, csi_sanity: SanityContext) -> None:
        """An unknown volume is NOT_FOUND whatever the path (the spec has no
        absolute-path rule for NodeExpandVolume; csi-sanity expects this)."""
        csi_sanity.need_node(NodeCap.EXPAND_VOLUME)
        expect_error(
            csi_sanity.node.NodeExpandVolume,
            pb.NodeExpandVolumeRequest(volume_id=NONEXISTENT_VOLUME, volume_path="some/path"),
            C.NOT_FOUND,
        )

    @pytest.mark.privileged
    def test_unknown_volume_path(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.EXPAND_VOLUME)
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        csi_resources.publish(vol.volume_id)
        expect_error(
            csi_sanity.node.NodeExpandVolume,
            pb.NodeExpandVolumeRequest(
                volume_id=vol.volume_id, volume_path=os.path.join(csi_resources.workdir, "no-such-path")
            ),
            C.NOT_FOUND,
        )

    @pytest.mark.privileged
    def test_expands_published_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_node(NodeCap.EXPAND_VOLUME)
        _need_volumes(csi_sanity)
        vol = csi_resources.create_volume()
        p = csi_resources.publish(vol.volume_id)
        size = csi_sanity.config.target_expand_size
        if CtrlCap.EXPAND_VOLUME in csi_sanity.caps.controller:
            creq = pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id)
            creq.capacity_range.required_bytes = size
            _, err = call_ok_or(csi_sanity.controller.ControllerExpandVolume, creq, (C.FAILED_PRECONDITION,))
            if err is not None:
                pytest.skip("driver expands offline only")
        req = pb.NodeExpandVolumeRequest(
            volume_id=vol.volume_id,
            volume_path=p.target_path,
            staging_target_path=p.staging_path,
            volume_capability=csi_sanity.capability(),
        )
        req.capacity_range.required_bytes = size
        resp, err = call_ok_or(csi_sanity.node.NodeExpandVolume, req, (C.FAILED_PRECONDITION,))
        if err is not None:
            # The spec's "volume in use" row: this filesystem cannot grow while published.
            pytest.skip(f"the driver cannot expand this volume while it is published: {err.details()}")
        assert resp.capacity_bytes == 0 or resp.capacity_bytes >= size
        check_usable(csi_sanity, p, "after-expand")
