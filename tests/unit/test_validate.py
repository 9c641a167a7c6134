"""Request validation over the real socket: every REQUIRED field of every RPC,
sizes, access modes, hostile names and ids — with the spec's status codes and
messages that name what was wrong, and nothing touched on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
import pytest
from helpers import Csi, block_cap, create_req, expect, mount_cap, short_dir, tree

from csi_kit._core import validate as v
from csi_kit._pb import csi_pb2 as pb
from csi_kit.backend import Backend, BackendContext
from csi_kit.errors import InvalidArgument, OutOfRange
from csi_kit.testing.driver import running_driver
from csi_kit.types import AccessMode, CapacityRange, PublishRequest, StageRequest, Volume, VolumeCapability
from csi_kit_backends.hostpath.backend import HostPathBackend, HostPathConfig

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MiB = 1 << 20


class FullHostPath(HostPathBackend):
    """hostPath plus no-op controller publish, stage and modify, so that every
    RPC of the spec is served and its validation can be reached."""

    def controller_publish(
        self, volume: Volume, node_id: str, capability: VolumeCapability, readonly: bool
    ) -> Mapping[str, str]:
        return {}

    def controller_unpublish(self, volume_id: str, node_id: str) -> None:
        pass

    def node_stage(self, request: StageRequest) -> None:
        pass

    def node_unstage(self, volume_id: str, staging_path: str) -> None:
        pass

    def modify_volume(self, volume: Volume, mutable_parameters: Mapping[str, str]) -> None:
        pass


class Env:
    def __init__(self, csi: Csi, state: str) -> None:
        self.csi = csi
        self.state = state
        self.root = os.path.join(state, "hostpath")


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with short_dir() as state:
        backend = FullHostPath(HostPathConfig(), BackendContext("hostpath.csi-kit.io", "node-1", state))
        with running_driver(state, backend_object=backend) as ep, Csi(ep) as csi:
            yield Env(csi, state)


@pytest.fixture
def csi(env: Env) -> Csi:
    return env.csi


CAP = mount_cap()
RANGE = pb.CapacityRange(required_bytes=MiB)
VID = "vol-that-does-not-exist"

# (service, method, request, field the message must name)
REQUIRED: list[tuple[str, str, Any, str]] = [
    ("controller", "CreateVolume", pb.CreateVolumeRequest(volume_capabilities=[CAP]), "name"),
    ("controller", "CreateVolume", pb.CreateVolumeRequest(name="n"), "volume_capabilities"),
    (
        "controller",
        "CreateVolume",
        pb.CreateVolumeRequest(name="n", volume_capabilities=[pb.VolumeCapability(mount={})]),
        "volume_capabilities[0].access_mode",
    ),
    (
        "controller",
        "CreateVolume",
        pb.CreateVolumeRequest(name="n", volume_capabilities=[pb.VolumeCapability(access_mode={"mode": 1})]),
        "volume_capabilities[0].access_type",
    ),
    (
        "controller",
        "CreateVolume",
        create_req("n", volume_content_source=pb.VolumeContentSource(snapshot={})),
        "volume_content_source.snapshot.snapshot_id",
    ),
    (
        "controller",
        "CreateVolume",
        create_req("n", volume_content_source=pb.VolumeContentSource(volume={})),
        "volume_content_source.volume.volume_id",
    ),
    ("controller", "DeleteVolume", pb.DeleteVolumeRequest(), "volume_id"),
    (
        "controller",
        "ControllerPublishVolume",
        pb.ControllerPublishVolumeRequest(node_id="node-1", volume_capability=CAP),
        "volume_id",
    ),
    (
        "controller",
        "ControllerPublishVolume",
        pb.ControllerPublishVolumeRequest(volume_id=VID, volume_capability=CAP),
        "node_id",
    ),
    (
        "controller",
        "ControllerPublishVolume",
        pb.ControllerPublishVolumeRequest(volume_id=VID, node_id="node-1"),
        "volume_capability",
    ),
    ("controller", "ControllerUnpublishVolume", pb.ControllerUnpublishVolumeRequest(), "volume_id"),
    (
        "controller",
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(volume_capabilities=[CAP]),
        "volume_id",
    ),
    (
        "controller",
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(volume_id=VID),
        "volume_capabilities",
    ),
    (
        "controller",
        "ControllerExpandVolume",
        pb.ControllerExpandVolumeRequest(capacity_range=RANGE),
        "volume_id",
    ),
    (
        "controller",
        "ControllerExpandVolume",
        pb.ControllerExpandVolumeRequest(volume_id=VID),
        "capacity_range",
    ),
    ("controller", "ControllerGetVolume", pb.ControllerGetVolumeRequest(), "volume_id"),
    (
        "controller",
        "ControllerModifyVolume",
        pb.ControllerModifyVolumeRequest(mutable_parameters={"a": "b"}),
        "volume_id",
    ),
    (
        "controller",
        "ControllerModifyVolume",
        pb.ControllerModifyVolumeRequest(volume_id=VID),
        "mutable_parameters",
    ),
    ("controller", "CreateSnapshot", pb.CreateSnapshotRequest(name="s"), "source_volume_id"),
    ("controller", "CreateSnapshot", pb.CreateSnapshotRequest(source_volume_id=VID), "name"),
    ("controller", "DeleteSnapshot", pb.DeleteSnapshotRequest(), "snapshot_id"),
    ("controller", "GetSnapshot", pb.GetSnapshotRequest(), "snapshot_id"),
    (
        "node",
        "NodeStageVolume",
        pb.NodeStageVolumeRequest(staging_target_path="/tmp/x", volume_capability=CAP),
        "volume_id",
    ),
    (
        "node",
        "NodeStageVolume",
        pb.NodeStageVolumeRequest(volume_id=VID, volume_capability=CAP),
        "staging_target_path",
    ),
    (
        "node",
        "NodeStageVolume",
        pb.NodeStageVolumeRequest(volume_id=VID, staging_target_path="/tmp/x"),
        "volume_capability",
    ),
    ("node", "NodeUnstageVolume", pb.NodeUnstageVolumeRequest(staging_target_path="/tmp/x"), "volume_id"),
    ("node", "NodeUnstageVolume", pb.NodeUnstageVolumeRequest(volume_id=VID), "staging_target_path"),
    (
        "node",
        "NodePublishVolume",
        pb.NodePublishVolumeRequest(
            target_path="/tmp/x", volume_capability=CAP, staging_target_path="/tmp/s"
        ),
        "volume_id",
    ),
    (
        "node",
        "NodePublishVolume",
        pb.NodePublishVolumeRequest(volume_id=VID, volume_capability=CAP, staging_target_path="/tmp/s"),
        "target_path",
    ),
    (
        "node",
        "NodePublishVolume",
        pb.NodePublishVolumeRequest(volume_id=VID, target_path="/tmp/x", staging_target_path="/tmp/s"),
        "volume_capability",
    ),
    ("node", "NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(target_path="/tmp/x"), "volume_id"),
    ("node", "NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id=VID), "target_path"),
    ("node", "NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_path="/tmp/x"), "volume_id"),
    ("node", "NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_id=VID), "volume_path"),
    ("node", "NodeExpandVolume", pb.NodeExpandVolumeRequest(volume_path="/tmp/x"), "volume_id"),
    ("node", "NodeExpandVolume", pb.NodeExpandVolumeRequest(volume_id=VID), "volume_path"),
    (
        "group",
        "CreateVolumeGroupSnapshot",
        pb.CreateVolumeGroupSnapshotRequest(source_volume_ids=[VID]),
        "name",
    ),
    (
        "group",
        "CreateVolumeGroupSnapshot",
        pb.CreateVolumeGroupSnapshotRequest(name="g"),
        "source_volume_ids",
    ),
    (
        "group",
        "DeleteVolumeGroupSnapshot",
        pb.DeleteVolumeGroupSnapshotRequest(snapshot_ids=["s"]),
        "group_snapshot_id",
    ),
    (
        "group",
        "DeleteVolumeGroupSnapshot",
        pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="g"),
        "snapshot_ids",
    ),
    ("group", "GetVolumeGroupSnapshot", pb.GetVolumeGroupSnapshotRequest(), "group_snapshot_id"),
]


@pytest.mark.parametrize(
    ("service", "method", "request_msg", "field"),
    REQUIRED,
    ids=[f"{m}-{f}" for _, m, _, f in REQUIRED],
)
def test_missing_required_field_is_invalid_argument_naming_it(
    env: Env, service: str, method: str, request_msg: Any, field: str
) -> None:
    before = tree(env.root)
    call = getattr(getattr(env.csi, service), method)
    details = expect(INVALID, call, request_msg, field)
    assert "required" in details
    assert tree(env.root) == before


# -- sizes -------------------------------------------------------------------------------------


def test_negative_required_bytes(csi: Csi) -> None:
    expect(INVALID, csi.controller.CreateVolume, create_req("neg", required=-1), "required_bytes", "-1")


def test_negative_limit_bytes(csi: Csi) -> None:
    expect(INVALID, csi.controller.CreateVolume, create_req("negl", limit=-5), "limit_bytes", "-5")


def test_limit_below_required(csi: Csi) -> None:
    req = create_req("inverted", required=2 * MiB, limit=MiB)
    expect(INVALID, csi.controller.CreateVolume, req, "required_bytes", "exceeds", "limit_bytes")


def test_above_the_backend_maximum_is_out_of_range(csi: Csi) -> None:
    req = create_req("huge", required=HostPathBackend.max_volume_bytes + 1)
    expect(
        grpc.StatusCode.OUT_OF_RANGE, csi.controller.CreateVolume, req, str(HostPathBackend.max_volume_bytes)
    )
    assert "huge" not in [
        e.volume.volume_id for e in csi.controller.ListVolumes(pb.ListVolumesRequest()).entries
    ]


def test_restore_below_a_snapshot_size_is_out_of_range(csi: Csi) -> None:
    src = csi.create("oor-src", required=8 * MiB)
    snap = csi.snapshot("oor-snap", src.volume_id)
    assert snap.size_bytes == 8 * MiB
    req = create_req("oor-restore", required=MiB, limit=4 * MiB, snapshot=snap.snapshot_id)
    expect(grpc.StatusCode.OUT_OF_RANGE, csi.controller.CreateVolume, req, "content source", str(8 * MiB))
    # Without a limit the restored volume grows to the snapshot's size.
    restored = csi.create("oor-restore-2", required=MiB, snapshot=snap.snapshot_id)
    assert restored.capacity_bytes == 8 * MiB
    clone_req = create_req("oor-clone", limit=2 * MiB, volume=src.volume_id)
    expect(grpc.StatusCode.OUT_OF_RANGE, csi.controller.CreateVolume, clone_req, "content source")


def test_limit_only_gives_a_volume_within_it(csi: Csi) -> None:
    vol = csi.create("limit-only", limit=3 * MiB)
    assert 0 < vol.capacity_bytes <= 3 * MiB


def test_expand_can_never_shrink(csi: Csi) -> None:
    vol = csi.create("noshrink", required=4 * MiB)
    req = pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=MiB, limit_bytes=2 * MiB)
    )
    expect(grpc.StatusCode.OUT_OF_RANGE, csi.controller.ControllerExpandVolume, req, "never shrink")


# -- capabilities ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [8, 42, 1000])
def test_unknown_access_mode_number(csi: Csi, mode: int) -> None:
    req = create_req(f"mode-{mode}", caps=[mount_cap(mode=mode)])
    expect(INVALID, csi.controller.CreateVolume, req, f"access_mode {mode}", "not a known access mode")


def test_unsupported_access_mode_is_named(csi: Csi) -> None:
    req = create_req("mnmw", caps=[mount_cap(mode=AccessMode.MULTI_NODE_MULTI_WRITER)])
    expect(INVALID, csi.controller.CreateVolume, req, "MULTI_NODE_MULTI_WRITER")


def test_block_on_a_mount_only_backend(csi: Csi) -> None:
    expect(INVALID, csi.controller.CreateVolume, create_req("blk", caps=[block_cap()]), "block")


def test_mixed_block_and_mount_is_invalid() -> None:
    class Both(Backend):
        access_types = frozenset({"mount", "block"})

    caps = [
        VolumeCapability("mount", AccessMode.SINGLE_NODE_WRITER),
        VolumeCapability("block", AccessMode.SINGLE_NODE_WRITER),
    ]
    with pytest.raises(InvalidArgument, match="mixes block and mount"):
        v.check_capabilities(Both, caps)
    v.check_capabilities(Both, caps[:1])
    v.check_capabilities(Both, caps[1:])


def test_unsupported_fs_type(csi: Csi) -> None:
    expect(INVALID, csi.controller.CreateVolume, create_req("fs", caps=[mount_cap(fs_type="ext4")]), "'ext4'")


def test_malformed_mount_flag(csi: Csi) -> None:
    req = create_req("flags", caps=[mount_cap(flags=("ro,exec",))])
    expect(INVALID, csi.controller.CreateVolume, req, "mount flag")


def test_node_publish_with_capability_the_backend_lacks_is_failed_precondition(env: Env) -> None:
    req = pb.NodePublishVolumeRequest(
        volume_id=VID,
        target_path=os.path.join(env.state, "t"),
        staging_target_path=os.path.join(env.state, "s"),
        volume_capability=mount_cap(mode=AccessMode.MULTI_NODE_MULTI_WRITER),
    )
    expect(
        grpc.StatusCode.FAILED_PRECONDITION, env.csi.node.NodePublishVolume, req, "MULTI_NODE_MULTI_WRITER"
    )


def test_staged_driver_needs_a_staging_path_to_publish(env: Env) -> None:
    req = pb.NodePublishVolumeRequest(
        volume_id=VID, target_path=os.path.join(env.state, "t"), volume_capability=CAP
    )
    expect(grpc.StatusCode.FAILED_PRECONDITION, env.csi.node.NodePublishVolume, req, "staging_target_path")


def test_unknown_parameter_is_rejected_but_sidecar_keys_pass(csi: Csi) -> None:
    expect(INVALID, csi.controller.CreateVolume, create_req("p", params={"speed": "fast"}), "speed")
    vol = csi.create("p2", params={"csi.storage.k8s.io/pvc/name": "data"})
    assert vol.volume_id


# -- hostile names and ids -------------------------------------------------------------------

LONG = "x" * 10240


def test_ten_kib_name(csi: Csi) -> None:
    expect(INVALID, csi.controller.CreateVolume, create_req(LONG), "name", "10240 bytes", "128")
    req = pb.CreateSnapshotRequest(name=LONG, source_volume_id=VID)
    expect(INVALID, csi.controller.CreateSnapshot, req, "name", "10240 bytes")


def test_ten_kib_id(csi: Csi) -> None:
    expect(INVALID, csi.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=LONG), "volume_id", "10240")
    expect(INVALID, csi.controller.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=LONG), "snapshot_id")
    expect(
        INVALID,
        csi.controller.CreateSnapshot,
        pb.CreateSnapshotRequest(name="s", source_volume_id=LONG),
        "source_volume_id",
    )


def test_nul_in_name_and_id(csi: Csi) -> None:
    expect(INVALID, csi.controller.CreateVolume, create_req("a\x00b"), "name", "NUL")
    expect(
        INVALID, csi.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id="a\x00b"), "volume_id", "NUL"
    )
    expect(
        INVALID,
        csi.controller.CreateVolume,
        create_req("nulsrc", snapshot="a\x00b"),
        "volume_content_source.snapshot.snapshot_id",
    )


def test_128_byte_name_is_accepted(csi: Csi) -> None:
    vol = csi.create("n" * 128)
    assert vol.volume_id


HOSTILE_IDS = ["..", "../..", "../../victim", "/etc", "/tmp", "volumes/../../victim", ".", "../volumes"]


@pytest.mark.parametrize("bad", HOSTILE_IDS)
def test_traversal_ids_touch_nothing(env: Env, bad: str) -> None:
    """`..` and absolute ids: the spec's INVALID_ARGUMENT or NOT_FOUND, deletes
    succeed as for any unknown id, and nothing inside or outside the root changes."""
    csi = env.csi
    victim = os.path.join(env.state, "victim")
    os.makedirs(victim, exist_ok=True)
    with open(os.path.join(victim, "keep"), "w") as f:
        f.write("precious")
    kept = csi.create("kept-volume")
    before_root, before_victim = tree(env.root), tree(victim)

    csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=bad))
    csi.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=bad))
    notfound = grpc.StatusCode.NOT_FOUND
    expect(notfound, csi.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=bad))
    expect(notfound, csi.controller.GetSnapshot, pb.GetSnapshotRequest(snapshot_id=bad))
    expect(
        notfound, csi.controller.CreateSnapshot, pb.CreateSnapshotRequest(name="trav-s", source_volume_id=bad)
    )
    expect(notfound, csi.controller.CreateVolume, create_req("trav-r", snapshot=bad))
    expect(notfound, csi.controller.CreateVolume, create_req("trav-c", volume=bad))
    expand = pb.ControllerExpandVolumeRequest(volume_id=bad, capacity_range=RANGE)
    expect(notfound, csi.controller.ControllerExpandVolume, expand)
    validate = pb.ValidateVolumeCapabilitiesRequest(volume_id=bad, volume_capabilities=[CAP])
    expect(notfound, csi.controller.ValidateVolumeCapabilities, validate)
    node_codes = (INVALID, notfound)
    stats = pb.NodeGetVolumeStatsRequest(volume_id=bad, volume_path=os.path.join(env.state, "t"))
    assert _code(csi.node.NodeGetVolumeStats, stats) in node_codes
    stage = pb.NodeStageVolumeRequest(
        volume_id=bad, staging_target_path=os.path.join(env.state, "st"), volume_capability=CAP
    )
    assert _code(csi.node.NodeStageVolume, stage) in node_codes
    group = pb.CreateVolumeGroupSnapshotRequest(name="trav-g", source_volume_ids=[kept.volume_id, bad])
    expect(notfound, csi.group.CreateVolumeGroupSnapshot, group)

    assert tree(env.root) == before_root
    assert tree(victim) == before_victim
    assert not os.path.exists(os.path.join(env.state, "st"))
    assert kept.volume_id in csi.list_volume_ids()


def _code(call: Any, request: Any) -> grpc.StatusCode:
    try:
        call(request, timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("path", ["relative/target", "/tmp/../etc/x", "/a/b/../../c"])
def test_caller_paths_must_be_absolute_without_dotdot(env: Env, path: str) -> None:
    req = pb.NodeUnpublishVolumeRequest(volume_id=VID, target_path=path)
    expect(INVALID, env.csi.node.NodeUnpublishVolume, req, "target_path")
    pub = pb.NodePublishVolumeRequest(
        volume_id=VID, target_path=path, staging_target_path="/tmp/s", volume_capability=CAP
    )
    expect(INVALID, env.csi.node.NodePublishVolume, pub, "target_path")


def test_hostpath_refuses_to_build_a_path_from_a_bad_id(tmp_path: Any) -> None:
    backend = HostPathBackend(HostPathConfig(), BackendContext("d", "n", str(tmp_path)))
    for bad in ["", "..", ".", "a/b", "../x", "/etc", "a\x00b", "x" * 129]:
        with pytest.raises(InvalidArgument):
            backend.volume_path(bad)
        with pytest.raises(InvalidArgument):
            backend.snapshot_path(bad)


# -- the pure functions ------------------------------------------------------------------------


def test_resolve_capacity_rules() -> None:
    backend = HostPathBackend(HostPathConfig(), BackendContext("d", "n", "/nonexistent"))
    assert v.resolve_capacity(backend, CapacityRange()) == HostPathBackend.default_volume_bytes
    assert v.resolve_capacity(backend, CapacityRange(0, 5 * MiB)) == 5 * MiB
    assert v.resolve_capacity(backend, CapacityRange(MiB, 0), minimum=3 * MiB) == 3 * MiB
    with pytest.raises(OutOfRange):
        v.resolve_capacity(backend, CapacityRange(0, MiB), minimum=2 * MiB)


def test_check_path_normalises() -> None:
    assert v.check_path("/a//b/./c/", "target_path") == "/a/b/c"


def test_publish_and_stage_values_hide_secrets_in_repr() -> None:
    pub = PublishRequest("v", "/t", None, secrets={"password": "hunter2"})
    stage = StageRequest("v", "/s", None, secrets={"password": "hunter2"})
    assert "hunter2" not in repr(pub) and "hunter2" not in repr(stage)


# -- answers that are not errors, and the remaining RPC rules ----------------------------------


def test_validate_volume_capabilities_confirms_only_what_the_volume_serves(csi: Csi) -> None:
    vol = csi.create("vvc")
    ok = csi.controller.ValidateVolumeCapabilities(
        pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id, volume_capabilities=[CAP])
    )
    assert list(ok.confirmed.volume_capabilities) == [CAP] and ok.message == ""
    for cap in (mount_cap(mode=AccessMode.MULTI_NODE_MULTI_WRITER), block_cap()):
        resp = csi.controller.ValidateVolumeCapabilities(
            pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id, volume_capabilities=[cap])
        )
        assert not resp.HasField("confirmed")
        assert resp.message
    other = csi.controller.ValidateVolumeCapabilities(
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[CAP], parameters={"csi.storage.k8s.io/x": "y"}
        )
    )
    assert not other.HasField("confirmed") and "parameters" in other.message


def test_mutable_parameters_take_part_in_idempotency(csi: Csi) -> None:
    first = csi.create("mut", mutable_parameters={"iops": "100"})
    assert csi.create("mut", mutable_parameters={"iops": "100"}).volume_id == first.volume_id
    req = create_req("mut", mutable_parameters={"iops": "200"})
    expect(grpc.StatusCode.ALREADY_EXISTS, csi.controller.CreateVolume, req, "mutable_parameters")
    csi.controller.ControllerModifyVolume(
        pb.ControllerModifyVolumeRequest(volume_id=first.volume_id, mutable_parameters={"iops": "300"})
    )
    expect(
        grpc.StatusCode.NOT_FOUND,
        csi.controller.ControllerModifyVolume,
        pb.ControllerModifyVolumeRequest(volume_id=VID, mutable_parameters={"iops": "1"}),
    )


def test_group_snapshot_argument_rules(csi: Csi) -> None:
    a, b = csi.create("grp-rule-a"), csi.create("grp-rule-b")
    dup = pb.CreateVolumeGroupSnapshotRequest(name="dup", source_volume_ids=[a.volume_id, a.volume_id])
    expect(INVALID, csi.group.CreateVolumeGroupSnapshot, dup, "more than once")
    group = csi.group.CreateVolumeGroupSnapshot(
        pb.CreateVolumeGroupSnapshotRequest(name="rules", source_volume_ids=[a.volume_id, b.volume_id])
    ).group_snapshot
    members = [s.snapshot_id for s in group.snapshots]
    wrong = pb.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=members[:1]
    )
    expect(INVALID, csi.group.DeleteVolumeGroupSnapshot, wrong, "snapshot_ids")
    get = pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id, snapshot_ids=["x"])
    expect(INVALID, csi.group.GetVolumeGroupSnapshot, get, "snapshot_ids")
    missing = pb.GetVolumeGroupSnapshotRequest(group_snapshot_id="no-such-group")
    expect(grpc.StatusCode.NOT_FOUND, csi.group.GetVolumeGroupSnapshot, missing)
    csi.group.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id, snapshot_ids=members)
    )


def test_controller_publish_rules(csi: Csi) -> None:
    vol = csi.create("cpub")
    req = pb.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id="node-1", volume_capability=CAP)
    csi.controller.ControllerPublishVolume(req)
    csi.controller.ControllerPublishVolume(req)  # idempotent
    listed = {
        e.volume.volume_id: e.status for e in csi.controller.ListVolumes(pb.ListVolumesRequest()).entries
    }
    assert list(listed[vol.volume_id].published_node_ids) == ["node-1"]
    ro = pb.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id="node-1", volume_capability=CAP, readonly=True
    )
    expect(grpc.StatusCode.ALREADY_EXISTS, csi.controller.ControllerPublishVolume, ro, "other options")
    elsewhere = pb.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id="node-2", volume_capability=CAP
    )
    expect(grpc.StatusCode.NOT_FOUND, csi.controller.ControllerPublishVolume, elsewhere, "node-2")
    unknown = pb.ControllerPublishVolumeRequest(volume_id=VID, node_id="node-1", volume_capability=CAP)
    expect(grpc.StatusCode.NOT_FOUND, csi.controller.ControllerPublishVolume, unknown, VID)
    delete = pb.DeleteVolumeRequest(volume_id=vol.volume_id)
    expect(grpc.StatusCode.FAILED_PRECONDITION, csi.controller.DeleteVolume, delete, "node-1")
    csi.controller.ControllerUnpublishVolume(
        pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id="node-1")
    )
    csi.controller.ControllerUnpublishVolume(
        pb.ControllerUnpublishVolumeRequest(volume_id=VID, node_id="node-1")
    )
    got = csi.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert list(got.status.published_node_ids) == []
    csi.delete(vol.volume_id)
