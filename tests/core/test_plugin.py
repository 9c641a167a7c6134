"""The backend contract: registry, entry-point discovery, option building, and
capabilities derived from what a backend overrides (checked over gRPC)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import grpc
import pytest
from helpers import Csi, create_req, expect, short_dir

from csi_kit import hookimpl
from csi_kit._pb import csi_pb2 as pb
from csi_kit.backend import Backend, BackendContext, capabilities_of
from csi_kit.errors import InvalidArgument
from csi_kit.plugin.manager import BackendEntry, BackendRegistry, build_config, load_registry
from csi_kit.testing.driver import running_driver
from csi_kit.types import CreatedVolume, PublishRequest, VolumeRequest
from csi_kit_backends.hostpath.backend import HostPathBackend, HostPathConfig

CCap = pb.ControllerServiceCapability.RPC
NCap = pb.NodeServiceCapability.RPC
PCap = pb.PluginCapability.Service


class VolumesOnly(Backend):
    """The smallest useful backend: volumes as directories, nothing else."""

    def _dir(self, volume_id: str) -> str:
        return os.path.join(self.context.state_dir, "vols", volume_id)

    def create_volume(self, volume_id: str, request: VolumeRequest) -> CreatedVolume:
        os.makedirs(self._dir(volume_id))
        return CreatedVolume(request.capacity_bytes)

    def delete_volume(self, volume_id: str) -> None:
        if os.path.isdir(self._dir(volume_id)):
            os.rmdir(self._dir(volume_id))

    def node_publish(self, request: PublishRequest) -> None:
        pass

    def node_unpublish(self, volume_id: str, target_path: str) -> None:
        pass


@attrs.frozen
class Options:
    path: str = ""
    size: int = 10
    ratio: float = 0.5
    fast: bool = False


# -- registry ------------------------------------------------------------------------------


def test_installed_backends_include_hostpath() -> None:
    registry = load_registry()
    entry = registry.get("hostpath")
    assert entry.backend is HostPathBackend
    assert entry.config is HostPathConfig
    assert entry.plugin == "csi_kit_backends.hostpath.plugin"
    assert "hostpath" in registry.names()


def test_registry_refuses_what_is_not_a_backend() -> None:
    registry = BackendRegistry()
    with pytest.raises(TypeError, match=r"subclass of csi_kit\.Backend"):
        registry.add("bad", object)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="subclass"):
        registry.add("bad", VolumesOnly(None, BackendContext("d", "n", "/x")))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="attrs class"):
        registry.add("bad", VolumesOnly, config=dict)
    assert registry.names() == []


def test_registry_refuses_a_name_twice_and_names_unknown_ones() -> None:
    registry = BackendRegistry()
    registry.add("mine", VolumesOnly)
    with pytest.raises(ValueError, match="twice"):
        registry.add("mine", HostPathBackend)
    with pytest.raises(InvalidArgument, match=r"unknown backend 'nope'.*mine"):
        registry.get("nope")


def test_a_plugin_object_registers_through_the_hook() -> None:
    class Plugin:
        @hookimpl
        def csi_kit_register_backends(self, registry: BackendRegistry) -> None:
            registry.add("volumes-only", VolumesOnly, config=Options)

    registry = load_registry([Plugin()], entry_points=False)
    assert registry.names() == ["volumes-only"]
    assert registry.get("volumes-only").config is Options


def test_a_plugin_registering_a_non_backend_fails_loading() -> None:
    class Broken:
        @hookimpl
        def csi_kit_register_backends(self, registry: BackendRegistry) -> None:
            registry.add("broken", dict)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="broken"):
        load_registry([Broken()], entry_points=False)


# -- options ----------------------------------------------------------------------------------

ENTRY = BackendEntry("mine", VolumesOnly, Options, "test")


def test_build_config_converts_types() -> None:
    config = build_config(ENTRY, {"path": "/srv", "size": "42", "ratio": "0.25", "fast": "yes"})
    assert config == Options("/srv", 42, 0.25, True)
    assert build_config(ENTRY, {"fast": "off"}).fast is False
    assert build_config(ENTRY, {}) == Options()


def test_build_config_accepts_dashes_for_underscores() -> None:
    @attrs.frozen
    class Dashed:
        max_size: int = 0

    assert build_config(BackendEntry("d", VolumesOnly, Dashed, "t"), {"max-size": "7"}) == Dashed(7)


def test_build_config_rejects_unknown_keys_naming_them_and_the_known_ones() -> None:
    with pytest.raises(InvalidArgument, match=r"no option 'colour'.*fast, path, ratio, size"):
        build_config(ENTRY, {"colour": "red"})


@pytest.mark.parametrize(("key", "value"), [("size", "big"), ("ratio", "half"), ("fast", "maybe")])
def test_build_config_rejects_bad_values(key: str, value: str) -> None:
    with pytest.raises(InvalidArgument, match=f"'{key}'.*'{value}'"):
        build_config(ENTRY, {key: value})


def test_backend_without_config_takes_no_options() -> None:
    entry = BackendEntry("plain", VolumesOnly, None, "t")
    assert build_config(entry, {}) is None
    with pytest.raises(InvalidArgument, match="takes no options"):
        build_config(entry, {"x": "1"})


def test_hostpath_options_build() -> None:
    entry = load_registry().get("hostpath")
    assert build_config(entry, {"root": "/srv/hp", "quota": "off", "reflink": "off"}) == HostPathConfig(
        "/srv/hp", "off", "off"
    )


def test_hostpath_option_outside_its_choices_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="quota"):
        build_config(load_registry().get("hostpath"), {"quota": "maybe"})


# -- capabilities ----------------------------------------------------------------------------------


def test_capabilities_follow_overrides() -> None:
    mini = capabilities_of(VolumesOnly)
    assert mini.create_delete_volume and mini.node_publish
    assert not any(
        (mini.snapshots, mini.restore, mini.clone, mini.expand, mini.group_snapshots, mini.node_stage)
    )
    full = capabilities_of(HostPathBackend)
    assert full.snapshots and full.restore and full.clone and full.group_snapshots and full.expand
    assert full.modify  # the capacity mutable parameter
    assert not full.node_stage and not full.controller_publish

    class HalfSnapshots(VolumesOnly):
        def create_snapshot(self, snapshot_id: str, source: Any, parameters: Mapping[str, str]) -> Any:
            raise NotImplementedError

    # Taking snapshots without deleting them is not the capability.
    assert not capabilities_of(HalfSnapshots).snapshots
    assert capabilities_of(VolumesOnly(None, BackendContext("d", "n", "/x"))) == mini


@pytest.fixture(scope="module")
def mini() -> Iterator[Csi]:
    with short_dir() as state:
        backend = VolumesOnly(None, BackendContext("mini.example.io", "node-1", state))
        with running_driver(state, backend_object=backend, driver_name="mini.example.io") as ep, Csi(ep) as c:
            yield c


@pytest.fixture(scope="module")
def hostpath() -> Iterator[Csi]:
    with short_dir() as state, running_driver(state) as ep, Csi(ep) as c:
        yield c


def _controller_caps(csi: Csi) -> set[int]:
    resp = csi.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
    return {c.rpc.type for c in resp.capabilities}


def _node_caps(csi: Csi) -> set[int]:
    return {c.rpc.type for c in csi.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities}


def _plugin_caps(csi: Csi) -> set[int]:
    resp = csi.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    return {c.service.type for c in resp.capabilities if c.HasField("service")}


def test_backend_without_snapshots_advertises_none(mini: Csi) -> None:
    caps = _controller_caps(mini)
    assert caps >= {CCap.CREATE_DELETE_VOLUME, CCap.LIST_VOLUMES, CCap.GET_VOLUME}
    assert not caps & {
        CCap.CREATE_DELETE_SNAPSHOT,
        CCap.LIST_SNAPSHOTS,
        CCap.GET_SNAPSHOT,
        CCap.CLONE_VOLUME,
        CCap.EXPAND_VOLUME,
        CCap.GET_CAPACITY,
        CCap.PUBLISH_UNPUBLISH_VOLUME,
    }
    assert PCap.GROUP_CONTROLLER_SERVICE not in _plugin_caps(mini)
    assert PCap.CONTROLLER_SERVICE in _plugin_caps(mini)
    assert not _node_caps(mini) & {NCap.STAGE_UNSTAGE_VOLUME, NCap.GET_VOLUME_STATS, NCap.EXPAND_VOLUME}
    vol = mini.create("v")
    req = pb.CreateSnapshotRequest(name="s", source_volume_id=vol.volume_id)
    expect(grpc.StatusCode.UNIMPLEMENTED, mini.controller.CreateSnapshot, req, "CreateSnapshot")
    expect(grpc.StatusCode.UNIMPLEMENTED, mini.controller.ListSnapshots, pb.ListSnapshotsRequest())
    expect(
        grpc.StatusCode.INVALID_ARGUMENT, mini.controller.CreateVolume, create_req("c", volume=vol.volume_id)
    )
    # No group snapshots: the GroupController service is not served at all.
    expect(
        grpc.StatusCode.UNIMPLEMENTED,
        mini.group.GroupControllerGetCapabilities,
        pb.GroupControllerGetCapabilitiesRequest(),
    )


def test_hostpath_advertises_what_it_implements(hostpath: Csi) -> None:
    assert _controller_caps(hostpath) == {
        CCap.CREATE_DELETE_VOLUME,
        CCap.LIST_VOLUMES,
        CCap.GET_VOLUME,
        CCap.GET_CAPACITY,
        CCap.CREATE_DELETE_SNAPSHOT,
        CCap.LIST_SNAPSHOTS,
        CCap.GET_SNAPSHOT,
        CCap.CLONE_VOLUME,
        CCap.EXPAND_VOLUME,
        CCap.VOLUME_CONDITION,
        CCap.SINGLE_NODE_MULTI_WRITER,
        CCap.MODIFY_VOLUME,
    }
    assert _node_caps(hostpath) == {
        NCap.GET_VOLUME_STATS,
        NCap.EXPAND_VOLUME,
        NCap.VOLUME_CONDITION,
        NCap.SINGLE_NODE_MULTI_WRITER,
    }
    assert _plugin_caps(hostpath) == {
        PCap.CONTROLLER_SERVICE,
        PCap.GROUP_CONTROLLER_SERVICE,
        PCap.VOLUME_ACCESSIBILITY_CONSTRAINTS,
    }
    group = hostpath.group.GroupControllerGetCapabilities(pb.GroupControllerGetCapabilitiesRequest())
    gcap = pb.GroupControllerServiceCapability.RPC
    assert [c.rpc.type for c in group.capabilities] == [gcap.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]
    # hostPath has no stage step: NodeStageVolume is not supported.
    stage = pb.NodeStageVolumeRequest(volume_id="v", staging_target_path="/tmp/s")
    expect(grpc.StatusCode.UNIMPLEMENTED, hostpath.node.NodeStageVolume, stage)
