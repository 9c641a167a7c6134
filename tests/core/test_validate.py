"""Request validation over the real socket: every REQUIRED field of every RPC,
sizes, access modes, hostile names and ids — with the spec's status codes and
messages that name what was wrong, and nothing touched on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
import pytest
from helpers import Csi, block_cap, create_req, expect, mount_cap, short_dir, tree

from csi_kit._core import validate as v
from csi_kit._core.engine import _new_id
from csi_kit._pb import csi_pb2 as pb
from csi_kit.backend import Backend, BackendContext
from csi_kit.errors import InvalidArgument, OutOfRange
from csi_kit.testing.driver import running_driver
from csi_kit.types import (
    AccessMode,
    CapacityRange,
    CreatedSnapshot,
    CreatedVolume,
    ExpandResult,
    PublishRequest,
    Snapshot,
    StageRequest,
    Volume,
    VolumeCapability,
    VolumeRequest,
    VolumeStats,
)
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
    def __init__(self, csi: Csi, state: str, paths: str) -> None:
        self.csi = csi
        self.state = state
        self.root = os.path.join(state, "hostpath")
        #: Where node target and staging paths go: outside the driver's state directory.
        self.paths = paths


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with short_dir() as state, short_dir() as paths:
        backend = FullHostPath(HostPathConfig(), BackendContext("hostpath.csi-kit.io", "node-1", state))
        with running_driver(state, backend_object=backend) as ep, Csi(ep) as csi:
            yield Env(csi, state, paths)


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
        target_path=os.path.join(env.paths, "t"),
        staging_target_path=os.path.join(env.paths, "s"),
        volume_capability=mount_cap(mode=AccessMode.MULTI_NODE_MULTI_WRITER),
    )
    expect(
        grpc.StatusCode.FAILED_PRECONDITION, env.csi.node.NodePublishVolume, req, "MULTI_NODE_MULTI_WRITER"
    )


def test_staged_driver_needs_a_staging_path_to_publish(env: Env) -> None:
    req = pb.NodePublishVolumeRequest(
        volume_id=VID, target_path=os.path.join(env.paths, "t"), volume_capability=CAP
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
def test_traversal_ids_are_invalid_and_touch_nothing(env: Env, bad: str) -> None:
    """`..`, `.` and ids holding `/` are malformed: INVALID_ARGUMENT naming the
    field on every RPC, deletes included, and nothing inside or outside the
    root changes."""
    csi = env.csi
    victim = os.path.join(env.state, "victim")
    os.makedirs(victim, exist_ok=True)
    with open(os.path.join(victim, "keep"), "w") as f:
        f.write("precious")
    kept = csi.create("kept-volume")
    before_root, before_victim = tree(env.root), tree(victim)

    with short_dir() as outside:
        calls: list[tuple[Any, Any, str]] = [
            (csi.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=bad), "volume_id"),
            (csi.controller.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=bad), "snapshot_id"),
            (
                csi.controller.ControllerGetVolume,
                pb.ControllerGetVolumeRequest(volume_id=bad),
                "volume_id",
            ),
            (csi.controller.GetSnapshot, pb.GetSnapshotRequest(snapshot_id=bad), "snapshot_id"),
            (
                csi.controller.CreateSnapshot,
                pb.CreateSnapshotRequest(name="trav-s", source_volume_id=bad),
                "source_volume_id",
            ),
            (
                csi.controller.CreateVolume,
                create_req("trav-r", snapshot=bad),
                "volume_content_source.snapshot.snapshot_id",
            ),
            (
                csi.controller.CreateVolume,
                create_req("trav-c", volume=bad),
                "volume_content_source.volume.volume_id",
            ),
            (
                csi.controller.ControllerExpandVolume,
                pb.ControllerExpandVolumeRequest(volume_id=bad, capacity_range=RANGE),
                "volume_id",
            ),
            (
                csi.controller.ValidateVolumeCapabilities,
                pb.ValidateVolumeCapabilitiesRequest(volume_id=bad, volume_capabilities=[CAP]),
                "volume_id",
            ),
            (
                csi.node.NodeGetVolumeStats,
                pb.NodeGetVolumeStatsRequest(volume_id=bad, volume_path=os.path.join(outside, "t")),
                "volume_id",
            ),
            (
                csi.node.NodeStageVolume,
                pb.NodeStageVolumeRequest(
                    volume_id=bad, staging_target_path=os.path.join(outside, "st"), volume_capability=CAP
                ),
                "volume_id",
            ),
            (
                csi.node.NodePublishVolume,
                pb.NodePublishVolumeRequest(
                    volume_id=bad,
                    target_path=os.path.join(outside, "t"),
                    staging_target_path=os.path.join(outside, "st"),
                    volume_capability=CAP,
                ),
                "volume_id",
            ),
            (
                csi.node.NodeUnpublishVolume,
                pb.NodeUnpublishVolumeRequest(volume_id=bad, target_path=os.path.join(outside, "t")),
                "volume_id",
            ),
            (
                csi.group.CreateVolumeGroupSnapshot,
                pb.CreateVolumeGroupSnapshotRequest(name="trav-g", source_volume_ids=[kept.volume_id, bad]),
                "source_volume_ids[1]",
            ),
        ]
        for call, request, field in calls:
            expect(INVALID, call, request, field)
        assert os.listdir(outside) == []

    assert tree(env.root) == before_root
    assert tree(victim) == before_victim
    assert kept.volume_id in csi.list_volume_ids()


#: Ids csi-sanity sends for objects that do not exist: well-formed, so the
#: spec's NOT_FOUND (or OK for deletes), never INVALID_ARGUMENT.
UNKNOWN_IDS = ["some-vol-id", "reallyfakevolumeid", "vol with spaces", "a..b", ".hidden", "ünïcode"]


@pytest.mark.parametrize("unknown", UNKNOWN_IDS)
def test_well_formed_unknown_ids_are_not_found(env: Env, unknown: str) -> None:
    csi = env.csi
    notfound = grpc.StatusCode.NOT_FOUND
    csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=unknown))
    csi.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=unknown))
    expect(notfound, csi.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=unknown))
    expect(notfound, csi.controller.GetSnapshot, pb.GetSnapshotRequest(snapshot_id=unknown))
    snap = pb.CreateSnapshotRequest(name="unknown-s", source_volume_id=unknown)
    expect(notfound, csi.controller.CreateSnapshot, snap)
    expect(notfound, csi.controller.CreateVolume, create_req("unknown-r", snapshot=unknown))
    validate = pb.ValidateVolumeCapabilitiesRequest(volume_id=unknown, volume_capabilities=[CAP])
    expect(notfound, csi.controller.ValidateVolumeCapabilities, validate)


class RecordingBackend(Backend):
    """Serves every RPC and records each id any method receives, touching nothing."""

    access_modes = frozenset(AccessMode)
    seen: list[tuple[str, str]]

    def __init__(self, config: Any, context: BackendContext) -> None:
        super().__init__(config, context)
        self.seen = []

    def _saw(self, method: str, *ids: str) -> None:
        self.seen.extend((method, i) for i in ids)

    def volume_exists(self, volume_id: str) -> bool:
        self._saw("volume_exists", volume_id)
        return True

    def create_volume(self, volume_id: str, request: VolumeRequest) -> CreatedVolume:
        self._saw("create_volume", volume_id)
        return CreatedVolume(request.capacity_bytes)

    def delete_volume(self, volume_id: str) -> None:
        self._saw("delete_volume", volume_id)

    def restore_snapshot(self, volume_id: str, request: VolumeRequest, snapshot: Snapshot) -> CreatedVolume:
        self._saw("restore_snapshot", volume_id, snapshot.snapshot_id)
        return CreatedVolume(request.capacity_bytes)

    def clone_volume(self, volume_id: str, request: VolumeRequest, source: Volume) -> CreatedVolume:
        self._saw("clone_volume", volume_id, source.volume_id)
        return CreatedVolume(request.capacity_bytes)

    def expand_volume(self, volume: Volume, capacity_bytes: int) -> ExpandResult:
        self._saw("expand_volume", volume.volume_id)
        return ExpandResult(capacity_bytes, False)

    def modify_volume(self, volume: Volume, mutable_parameters: Mapping[str, str]) -> None:
        self._saw("modify_volume", volume.volume_id)

    def create_snapshot(
        self, snapshot_id: str, source: Volume, parameters: Mapping[str, str]
    ) -> CreatedSnapshot:
        self._saw("create_snapshot", snapshot_id, source.volume_id)
        return CreatedSnapshot(source.capacity_bytes)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._saw("delete_snapshot", snapshot_id)

    def create_group_snapshot(
        self, group_id: str, members: Sequence[tuple[str, Volume]], parameters: Mapping[str, str]
    ) -> list[CreatedSnapshot]:
        self._saw("create_group_snapshot", group_id, *(i for m in members for i in (m[0], m[1].volume_id)))
        return [CreatedSnapshot(v.capacity_bytes) for _, v in members]

    def controller_publish(
        self, volume: Volume, node_id: str, capability: VolumeCapability, readonly: bool
    ) -> Mapping[str, str]:
        self._saw("controller_publish", volume.volume_id)
        return {}

    def controller_unpublish(self, volume_id: str, node_id: str) -> None:
        self._saw("controller_unpublish", volume_id)

    def node_stage(self, request: StageRequest) -> None:
        self._saw("node_stage", request.volume_id)

    def node_unstage(self, volume_id: str, staging_path: str) -> None:
        self._saw("node_unstage", volume_id)

    def node_publish(self, request: PublishRequest) -> None:
        self._saw("node_publish", request.volume_id)

    def node_unpublish(self, volume_id: str, target_path: str) -> None:
        self._saw("node_unpublish", volume_id)

    def node_stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        self._saw("node_stats", volume_id)
        return VolumeStats(usage=())

    def node_expand(
        self, volume_id: str, volume_path: str, capacity_bytes: int, capability: VolumeCapability | None
    ) -> int:
        self._saw("node_expand", volume_id)
        return capacity_bytes


#: Malformed ids for the end-to-end check (the empty id is the REQUIRED test's).
MALFORMED_OVER_THE_WIRE = [
    "..",
    ".",
    "/",
    "/etc",
    "a/b",
    "../../victim",
    "a\nb",
    "a\x1b[2Jb",
    "a\x85b",
    "a\x00b",
    "x" * 129,
]


def _id_carrying_calls(csi: Csi, bad: str, paths: str) -> list[tuple[Any, Any, str]]:
    """Every RPC that carries a volume, snapshot or group id, with ``bad`` in it."""
    target, staging = os.path.join(paths, "target"), os.path.join(paths, "staging")
    return [
        (csi.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=bad), "volume_id"),
        (
            csi.controller.ControllerPublishVolume,
            pb.ControllerPublishVolumeRequest(volume_id=bad, node_id="node-1", volume_capability=CAP),
            "volume_id",
        ),
        (
            csi.controller.ControllerUnpublishVolume,
            pb.ControllerUnpublishVolumeRequest(volume_id=bad, node_id="node-1"),
            "volume_id",
        ),
        (
            csi.controller.ValidateVolumeCapabilities,
            pb.ValidateVolumeCapabilitiesRequest(volume_id=bad, volume_capabilities=[CAP]),
            "volume_id",
        ),
        (
            csi.controller.ControllerExpandVolume,
            pb.ControllerExpandVolumeRequest(volume_id=bad, capacity_range=RANGE),
            "volume_id",
        ),
        (csi.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=bad), "volume_id"),
        (
            csi.controller.ControllerModifyVolume,
            pb.ControllerModifyVolumeRequest(volume_id=bad, mutable_parameters={"a": "b"}),
            "volume_id",
        ),
        (
            csi.controller.CreateSnapshot,
            pb.CreateSnapshotRequest(name="rec-s", source_volume_id=bad),
            "source_volume_id",
        ),
        (csi.controller.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=bad), "snapshot_id"),
        (csi.controller.GetSnapshot, pb.GetSnapshotRequest(snapshot_id=bad), "snapshot_id"),
        (csi.controller.CreateVolume, create_req("rec-r", snapshot=bad), "snapshot_id"),
        (csi.controller.CreateVolume, create_req("rec-c", volume=bad), "volume.volume_id"),
        (
            csi.group.CreateVolumeGroupSnapshot,
            pb.CreateVolumeGroupSnapshotRequest(name="rec-g", source_volume_ids=[bad]),
            "source_volume_ids[0]",
        ),
        (
            csi.group.DeleteVolumeGroupSnapshot,
            pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=bad, snapshot_ids=["s"]),
            "group_snapshot_id",
        ),
        (
            csi.group.GetVolumeGroupSnapshot,
            pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=bad),
            "group_snapshot_id",
        ),
        (
            csi.node.NodeStageVolume,
            pb.NodeStageVolumeRequest(volume_id=bad, staging_target_path=staging, volume_capability=CAP),
            "volume_id",
        ),
        (
            csi.node.NodeUnstageVolume,
            pb.NodeUnstageVolumeRequest(volume_id=bad, staging_target_path=staging),
            "volume_id",
        ),
        (
            csi.node.NodePublishVolume,
            pb.NodePublishVolumeRequest(
                volume_id=bad, target_path=target, staging_target_path=staging, volume_capability=CAP
            ),
            "volume_id",
        ),
        (
            csi.node.NodeUnpublishVolume,
            pb.NodeUnpublishVolumeRequest(volume_id=bad, target_path=target),
            "volume_id",
        ),
        (
            csi.node.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(volume_id=bad, volume_path=target),
            "volume_id",
        ),
        (
            csi.node.NodeExpandVolume,
            pb.NodeExpandVolumeRequest(volume_id=bad, volume_path=target, capacity_range=RANGE),
            "volume_id",
        ),
    ]


def test_no_malformed_id_reaches_any_backend_method() -> None:
    """Finding 7 of issue #11: node RPCs handed `..`, `/` and absolute ids to
    the backend.  Every id-carrying RPC now stops at the one framework check."""
    with short_dir() as state, short_dir() as paths:
        backend = RecordingBackend(None, BackendContext("rec.csi-kit.io", "node-1", state))
        with running_driver(state, backend_object=backend) as ep, Csi(ep) as csi:
            made = csi.create("rec-ok").volume_id  # the recorder sees what does get through
            assert ("create_volume", made) in backend.seen
            for bad in MALFORMED_OVER_THE_WIRE:
                for call, request, field in _id_carrying_calls(csi, bad, paths):
                    expect(INVALID, call, request, field)
            assert os.listdir(paths) == []
        leaked = [(method, i) for method, i in backend.seen if i in MALFORMED_OVER_THE_WIRE]
        assert leaked == []
        for _, seen_id in backend.seen:
            v.check_id(seen_id, "volume_id")


@pytest.mark.parametrize(
    "path",
    ["relative/target", "/tmp/../etc/x", "/a/b/../../c", "/tmp//x", "/tmp/x/", "/tmp/./x", "/tmp/a\nb"],
)
def test_caller_paths_must_be_absolute_and_normal(env: Env, path: str) -> None:
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


# (value, words the message must hold): each form the id rule rejects.
MALFORMED_IDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "empty": ("", ("required",)),
    "slash": ("a/b", ("one path component", "'/'")),
    "absolute": ("/etc", ("one path component",)),
    "root": ("/", ("one path component",)),
    "escape": ("../../victim", ("one path component",)),
    "dot": (".", ("'.' or '..'",)),
    "dotdot": ("..", ("'.' or '..'",)),
    "nul": ("a\x00b", ("NUL",)),
    "newline": ("a\nb", ("control character", "U+000A")),
    "tab": ("a\tb", ("U+0009",)),
    "escape-char": ("a\x1b[31mb", ("U+001B",)),
    "del": ("a\x7fb", ("U+007F",)),
    "c1": ("a\x85b", ("U+0085",)),
    "c1-last": ("a\x9fb", ("U+009F",)),
    "129-bytes": ("x" * 129, ("129 bytes", "128")),
    "130-utf8-bytes": ("\u00e9" * 65, ("130 bytes",)),
    "10KiB": (LONG, ("10240 bytes",)),
}


@pytest.mark.parametrize("kind", MALFORMED_IDS)
def test_check_id_rejects_malformed_ids_naming_field_and_rule(kind: str) -> None:
    value, words = MALFORMED_IDS[kind]
    with pytest.raises(InvalidArgument) as caught:
        v.check_id(value, "source_volume_id")
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.message.startswith("source_volume_id")
    for word in words:
        assert word in caught.value.message


@pytest.mark.parametrize(
    "value",
    ["some-vol-id", "x" * 128, "\u00e9" * 64, "a..b", "...", ".hidden", "vol with space", "\u00a0nbsp"],
)
def test_check_id_accepts_one_component_up_to_128_bytes(value: str) -> None:
    v.check_id(value, "volume_id")


def test_check_id_quotes_at_most_64_characters_of_a_value() -> None:
    value = "a/" + "b" * 120
    with pytest.raises(InvalidArgument) as caught:
        v.check_id(value, "volume_id")
    message = caught.value.message
    assert repr(value[:64]) in message and "122 characters" in message
    assert "b" * 63 not in message
    with pytest.raises(InvalidArgument) as long_path:
        v.check_path("/" + "c" * 3000 + "/../x", "target_path")
    assert "c" * 64 not in long_path.value.message and "'..'" in long_path.value.message


def test_opaque_ids_keep_only_the_required_length_and_nul_rules() -> None:
    for value in ["a/b", "..", ".", "/", "a\nb", "a\x1bb"]:
        v.check_id(value, "volume_id", opaque=True)
    for value, word in [("", "required"), ("a\x00b", "NUL"), ("x" * 129, "129 bytes")]:
        with pytest.raises(InvalidArgument, match=word):
            v.check_id(value, "volume_id", opaque=True)


def test_ids_the_framework_generates_always_pass() -> None:
    for _ in range(1000):
        v.check_id(_new_id(), "volume_id")


def test_backend_ids_are_not_opaque_unless_declared() -> None:
    assert Backend.opaque_ids is False
    assert HostPathBackend.opaque_ids is False
    assert tuple(Backend(None, BackendContext("d", "n", "/s")).protected_paths()) == ()


# (path, words the message must hold): each form the lexical path rule rejects.
MALFORMED_PATHS: dict[str, tuple[str, tuple[str, ...]]] = {
    "empty": ("", ("required",)),
    "relative": ("relative/target", ("absolute",)),
    "dot-relative": ("./x", ("absolute",)),
    "root": ("/", ("root directory",)),
    "double-slash": ("/var//lib", ("normal form", "'//'")),
    "leading-double-slash": ("//var/lib", ("'//'",)),
    "trailing-slash": ("/var/lib/", ("normal form", "ends with '/'")),
    "dotdot": ("/var/lib/../etc", ("'..'",)),
    "dotdot-last": ("/var/lib/..", ("'..'",)),
    "dot": ("/var/./lib", ("normal form", "'.' component")),
    "dot-last": ("/var/lib/.", ("'.' component",)),
    "nul": ("/var/a\x00b", ("NUL",)),
    "newline": ("/var/a\nb", ("control character", "U+000A")),
    "c1": ("/var/a\x9bb", ("U+009B",)),
    "over-max": ("/" + "p" * 4096, ("4097 bytes", "4096")),
}


@pytest.mark.parametrize("kind", MALFORMED_PATHS)
def test_check_path_rejects_rather_than_normalises(kind: str) -> None:
    value, words = MALFORMED_PATHS[kind]
    with pytest.raises(InvalidArgument) as caught:
        v.check_path(value, "staging_target_path")
    assert caught.value.message.startswith("staging_target_path")
    for word in words:
        assert word in caught.value.message


@pytest.mark.parametrize(
    "value", ["/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount", "/a/..b", "/a/b..", "/a/.x", "/x"]
)
def test_check_path_returns_a_normal_path_unchanged(value: str) -> None:
    assert v.check_path(value, "target_path") == value


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
    # snapshot_ids is required to delete a group that exists; a group that does
    # not exist is deleted already, whatever snapshot_ids says (csi-sanity).
    no_members = pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
    expect(INVALID, csi.group.DeleteVolumeGroupSnapshot, no_members, "snapshot_ids", "required")
    csi.group.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="no-such-group")
    )
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


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1 << 20), ("16Mi", 16 << 20), ("1Gi", 1 << 30), ("2G", 2 * 10**9), (" 5k ", 5000)],
)
def test_parse_size_reads_bytes_and_quantities(text: str, size: int) -> None:
    assert v.parse_size(text, "size") == size


@pytest.mark.parametrize("text", ["", "lots", "1.5Gi", "-1", "10 Mi", "1gi"])
def test_parse_size_rejects_what_is_not_a_size(text: str) -> None:
    with pytest.raises(InvalidArgument, match="size"):
        v.parse_size(text, "size")
