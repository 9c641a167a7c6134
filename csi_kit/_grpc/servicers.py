"""The CSI services: each method converts its request, calls the engine, converts back.

No rule lives here — validation is in `csi_kit._core.validate`, behaviour in
the engine, status codes in `csi_kit._grpc.errors`.  Capabilities advertised
are derived from the backend (`csi_kit.backend.capabilities_of`).

The services are registered from the schema's service descriptors rather than
the generated ``add_*_to_server`` functions, so that every request body is
decoded by `csi_kit._grpc.errors.decoder`: a body that does not decode is
answered INVALID_ARGUMENT by `rpc` instead of raising inside grpc.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from google.protobuf import message_factory

from csi_kit._core.engine import ListedVolume, VolumeEngine
from csi_kit._grpc import convert
from csi_kit._grpc.errors import decoder, rpc
from csi_kit._grpc.metrics import ServerMetrics
from csi_kit._grpc.snapshot_metadata import SnapshotMetadataServicer
from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pb_grpc
from csi_kit._version import __version__
from csi_kit.types import PublishRequest, StageRequest

__all__ = [
    "IdentityServicer",
    "ControllerServicer",
    "NodeServicer",
    "GroupControllerServicer",
    "add_services",
]

Ctx: TypeAlias = Any  # grpc.aio.ServicerContext (grpcio ships no type stubs)
CCap = pb.ControllerServiceCapability.RPC
NCap = pb.NodeServiceCapability.RPC


class _Base:
    def __init__(self, engine: VolumeEngine, metrics: ServerMetrics | None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.caps = engine.capabilities


class IdentityServicer(_Base, pb_grpc.IdentityServicer):
    def __init__(
        self, engine: VolumeEngine, metrics: ServerMetrics | None, driver_name: str, controller: bool
    ) -> None:
        super().__init__(engine, metrics)
        self.driver_name = driver_name
        self.controller = controller

    @rpc("GetPluginInfo")
    async def GetPluginInfo(self, request: Any, context: Ctx) -> Any:
        return pb.GetPluginInfoResponse(
            name=self.driver_name,
            vendor_version=__version__,
            manifest={
                "backend": self.engine.backend_type.__name__,
                **self.engine.backend.describe(),
                "durability": self.engine.store.durability,
            },
        )

    @rpc("GetPluginCapabilities")
    async def GetPluginCapabilities(self, request: Any, context: Ctx) -> Any:
        svc = pb.PluginCapability.Service
        caps = []
        if self.controller:
            caps.append(pb.PluginCapability(service=svc(type=svc.CONTROLLER_SERVICE)))
            if self.caps.group_snapshots:
                caps.append(pb.PluginCapability(service=svc(type=svc.GROUP_CONTROLLER_SERVICE)))
            if self.caps.snapshot_metadata:
                caps.append(pb.PluginCapability(service=svc(type=svc.SNAPSHOT_METADATA_SERVICE)))
        if self.engine.backend_type.node_local:
            caps.append(pb.PluginCapability(service=svc(type=svc.VOLUME_ACCESSIBILITY_CONSTRAINTS)))
        if self.caps.expand:
            exp = pb.PluginCapability.VolumeExpansion
            caps.append(pb.PluginCapability(volume_expansion=exp(type=exp.ONLINE)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    @rpc("Probe")
    async def Probe(self, request: Any, context: Ctx) -> Any:
        resp = pb.ProbeResponse()
        resp.ready.value = await self.engine.probe()
        return resp


class ControllerServicer(_Base, pb_grpc.ControllerServicer):
    def _capabilities(self) -> list[Any]:
        c = self.caps
        wanted = [
            (c.create_delete_volume, CCap.CREATE_DELETE_VOLUME),
            (c.create_delete_volume, CCap.LIST_VOLUMES),
            (c.create_delete_volume, CCap.GET_VOLUME),
            (c.controller_publish, CCap.PUBLISH_UNPUBLISH_VOLUME),
            (c.controller_publish, CCap.PUBLISH_READONLY),
            (c.controller_publish, CCap.LIST_VOLUMES_PUBLISHED_NODES),
            (c.get_capacity, CCap.GET_CAPACITY),
            (c.snapshots, CCap.CREATE_DELETE_SNAPSHOT),
            (c.snapshots, CCap.LIST_SNAPSHOTS),
            (c.snapshots, CCap.GET_SNAPSHOT),
            (c.clone, CCap.CLONE_VOLUME),
            (c.expand, CCap.EXPAND_VOLUME),
            (c.volume_condition, CCap.VOLUME_CONDITION),
            (c.modify, CCap.MODIFY_VOLUME),
        ]
        kinds = [kind for ok, kind in wanted if ok]
        if any(m.name == "SINGLE_NODE_MULTI_WRITER" for m in self.engine.backend_type.access_modes):
            kinds.append(CCap.SINGLE_NODE_MULTI_WRITER)
        return kinds

    @rpc("ControllerGetCapabilities")
    async def ControllerGetCapabilities(self, request: Any, context: Ctx) -> Any:
        return pb.ControllerGetCapabilitiesResponse(
            capabilities=[pb.ControllerServiceCapability(rpc=CCap(type=k)) for k in self._capabilities()]
        )

    @rpc("CreateVolume")
    async def CreateVolume(self, request: Any, context: Ctx) -> Any:
        volume = await self.engine.create_volume(convert.volume_request(request))
        return pb.CreateVolumeResponse(volume=convert.volume_pb(volume))

    @rpc("DeleteVolume")
    async def DeleteVolume(self, request: Any, context: Ctx) -> Any:
        await self.engine.delete_volume(request.volume_id)
        return pb.DeleteVolumeResponse()

    @rpc("ControllerPublishVolume")
    async def ControllerPublishVolume(self, request: Any, context: Ctx) -> Any:
        cap = convert.optional_capability(request, "volume_capability")
        ctx = await self.engine.controller_publish(request.volume_id, request.node_id, cap, request.readonly)
        return pb.ControllerPublishVolumeResponse(publish_context=dict(ctx))

    @rpc("ControllerUnpublishVolume")
    async def ControllerUnpublishVolume(self, request: Any, context: Ctx) -> Any:
        await self.engine.controller_unpublish(request.volume_id, request.node_id)
        return pb.ControllerUnpublishVolumeResponse()

    @rpc("ValidateVolumeCapabilities")
    async def ValidateVolumeCapabilities(self, request: Any, context: Ctx) -> Any:
        caps = convert.capabilities(request.volume_capabilities)
        ok, message = await self.engine.validate_volume_capabilities(
            request.volume_id, caps, dict(request.parameters), dict(request.mutable_parameters)
        )
        resp = pb.ValidateVolumeCapabilitiesResponse(message=message)
        if ok:
            resp.confirmed.volume_context.update(request.volume_context)
            resp.confirmed.volume_capabilities.extend(request.volume_capabilities)
            resp.confirmed.parameters.update(request.parameters)
            resp.confirmed.mutable_parameters.update(request.mutable_parameters)
        return resp

    def _entry(self, listed: ListedVolume) -> Any:
        status = pb.ListVolumesResponse.VolumeStatus(published_node_ids=list(listed.published_node_ids))
        if listed.condition is not None:
            status.volume_condition.CopyFrom(convert.condition_pb(listed.condition))
        return pb.ListVolumesResponse.Entry(volume=convert.volume_pb(listed.volume), status=status)

    @rpc("ListVolumes")
    async def ListVolumes(self, request: Any, context: Ctx) -> Any:
        page = await self.engine.list_volumes(request.max_entries, request.starting_token)
        return pb.ListVolumesResponse(
            entries=[self._entry(e) for e in page.entries if isinstance(e, ListedVolume)],
            next_token=page.next_token,
        )

    @rpc("GetCapacity")
    async def GetCapacity(self, request: Any, context: Ctx) -> Any:
        topo = (
            convert.topology(request.accessible_topology) if request.HasField("accessible_topology") else None
        )
        info = await self.engine.get_capacity(
            convert.capabilities(request.volume_capabilities), dict(request.parameters), topo
        )
        resp = pb.GetCapacityResponse(available_capacity=info.available_bytes)
        if info.maximum_volume_bytes is not None:
            resp.maximum_volume_size.value = info.maximum_volume_bytes
        resp.minimum_volume_size.value = info.minimum_volume_bytes
        return resp

    @rpc("CreateSnapshot")
    async def CreateSnapshot(self, request: Any, context: Ctx) -> Any:
        snap = await self.engine.create_snapshot(
            request.name, request.source_volume_id, dict(request.parameters)
        )
        return pb.CreateSnapshotResponse(snapshot=convert.snapshot_pb(snap))

    @rpc("DeleteSnapshot")
    async def DeleteSnapshot(self, request: Any, context: Ctx) -> Any:
        await self.engine.delete_snapshot(request.snapshot_id)
        return pb.DeleteSnapshotResponse()

    @rpc("ListSnapshots")
    async def ListSnapshots(self, request: Any, context: Ctx) -> Any:
        page = await self.engine.list_snapshots(
            request.max_entries, request.starting_token, request.snapshot_id, request.source_volume_id
        )
        return pb.ListSnapshotsResponse(
            entries=[pb.ListSnapshotsResponse.Entry(snapshot=convert.snapshot_pb(s)) for s in page.entries],  # type: ignore[arg-type]
            next_token=page.next_token,
        )

    @rpc("GetSnapshot")
    async def GetSnapshot(self, request: Any, context: Ctx) -> Any:
        snap = await self.engine.get_snapshot(request.snapshot_id)
        return pb.GetSnapshotResponse(snapshot=convert.snapshot_pb(snap))

    @rpc("ControllerExpandVolume")
    async def ControllerExpandVolume(self, request: Any, context: Ctx) -> Any:
        size, node = await self.engine.expand_volume(
            request.volume_id,
            convert.capacity_range(request),
            convert.optional_capability(request, "volume_capability"),
        )
        return pb.ControllerExpandVolumeResponse(capacity_bytes=size, node_expansion_required=node)

    @rpc("ControllerGetVolume")
    async def ControllerGetVolume(self, request: Any, context: Ctx) -> Any:
        listed = await self.engine.controller_get_volume(request.volume_id)
        status = pb.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=list(listed.published_node_ids)
        )
        if listed.condition is not None:
            status.volume_condition.CopyFrom(convert.condition_pb(listed.condition))
        return pb.ControllerGetVolumeResponse(volume=convert.volume_pb(listed.volume), status=status)

    @rpc("ControllerModifyVolume")
    async def ControllerModifyVolume(self, request: Any, context: Ctx) -> Any:
        await self.engine.modify_volume(request.volume_id, dict(request.mutable_parameters))
        return pb.ControllerModifyVolumeResponse()


class GroupControllerServicer(_Base, pb_grpc.GroupControllerServicer):
    @rpc("GroupControllerGetCapabilities")
    async def GroupControllerGetCapabilities(self, request: Any, context: Ctx) -> Any:
        gcap = pb.GroupControllerServiceCapability.RPC
        caps = []
        if self.caps.group_snapshots:
            caps.append(
                pb.GroupControllerServiceCapability(
                    rpc=gcap(type=gcap.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT)
                )
            )
        return pb.GroupControllerGetCapabilitiesResponse(capabilities=caps)

    @rpc("CreateVolumeGroupSnapshot")
    async def CreateVolumeGroupSnapshot(self, request: Any, context: Ctx) -> Any:
        group = await self.engine.create_group_snapshot(
            request.name, list(request.source_volume_ids), dict(request.parameters)
        )
        return pb.CreateVolumeGroupSnapshotResponse(group_snapshot=convert.group_snapshot_pb(group))

    @rpc("DeleteVolumeGroupSnapshot")
    async def DeleteVolumeGroupSnapshot(self, request: Any, context: Ctx) -> Any:
        await self.engine.delete_group_snapshot(request.group_snapshot_id, list(request.snapshot_ids))
        return pb.DeleteVolumeGroupSnapshotResponse()

    @rpc("GetVolumeGroupSnapshot")
    async def GetVolumeGroupSnapshot(self, request: Any, context: Ctx) -> Any:
        group = await self.engine.get_group_snapshot(request.group_snapshot_id, list(request.snapshot_ids))
        return pb.GetVolumeGroupSnapshotResponse(group_snapshot=convert.group_snapshot_pb(group))


class NodeServicer(_Base, pb_grpc.NodeServicer):
    @rpc("NodeGetCapabilities")
    async def NodeGetCapabilities(self, request: Any, context: Ctx) -> Any:
        c = self.caps
        wanted = [
            (c.node_stage, NCap.STAGE_UNSTAGE_VOLUME),
            (c.node_stats, NCap.GET_VOLUME_STATS),
            (c.node_expand, NCap.EXPAND_VOLUME),
            (c.node_stats and c.volume_condition, NCap.VOLUME_CONDITION),
        ]
        kinds = [k for ok, k in wanted if ok]
        if any(m.name == "SINGLE_NODE_MULTI_WRITER" for m in self.engine.backend_type.access_modes):
            kinds.append(NCap.SINGLE_NODE_MULTI_WRITER)
        return pb.NodeGetCapabilitiesResponse(
            capabilities=[pb.NodeServiceCapability(rpc=NCap(type=k)) for k in kinds]
        )

    @rpc("NodeGetInfo")
    async def NodeGetInfo(self, request: Any, context: Ctx) -> Any:
        info = self.engine.node_info()
        resp = pb.NodeGetInfoResponse(node_id=info.node_id, max_volumes_per_node=info.max_volumes_per_node)
        if info.topology is not None:
            resp.accessible_topology.CopyFrom(pb.Topology(segments=dict(info.topology.segments)))
        return resp

    @rpc("NodeStageVolume")
    async def NodeStageVolume(self, request: Any, context: Ctx) -> Any:
        await self.engine.node_stage(
            StageRequest(
                volume_id=request.volume_id,
                staging_path=request.staging_target_path,
                capability=convert.optional_capability(request, "volume_capability"),
                publish_context=dict(request.publish_context),
                volume_context=dict(request.volume_context),
                secrets=dict(request.secrets),
            )
        )
        return pb.NodeStageVolumeResponse()

    @rpc("NodeUnstageVolume")
    async def NodeUnstageVolume(self, request: Any, context: Ctx) -> Any:
        await self.engine.node_unstage(request.volume_id, request.staging_target_path)
        return pb.NodeUnstageVolumeResponse()

    @rpc("NodePublishVolume")
    async def NodePublishVolume(self, request: Any, context: Ctx) -> Any:
        await self.engine.node_publish(
            PublishRequest(
                volume_id=request.volume_id,
                target_path=request.target_path,
                capability=convert.optional_capability(request, "volume_capability"),
                readonly=request.readonly,
                staging_path=request.staging_target_path,
                publish_context=dict(request.publish_context),
                volume_context=dict(request.volume_context),
                secrets=dict(request.secrets),
            )
        )
        return pb.NodePublishVolumeResponse()

    @rpc("NodeUnpublishVolume")
    async def NodeUnpublishVolume(self, request: Any, context: Ctx) -> Any:
        await self.engine.node_unpublish(request.volume_id, request.target_path)
        return pb.NodeUnpublishVolumeResponse()

    @rpc("NodeGetVolumeStats")
    async def NodeGetVolumeStats(self, request: Any, context: Ctx) -> Any:
        stats = await self.engine.node_stats(
            request.volume_id, request.volume_path, request.staging_target_path
        )
        return convert.stats_pb(stats)

    @rpc("NodeExpandVolume")
    async def NodeExpandVolume(self, request: Any, context: Ctx) -> Any:
        size = await self.engine.node_expand(
            request.volume_id,
            request.volume_path,
            convert.capacity_range(request),
            request.staging_target_path,
            convert.optional_capability(request, "volume_capability"),
        )
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)


def _register(server: grpc.aio.Server, servicer: Any, service: str) -> None:
    """Serve csi.v1.``service`` with ``servicer``; every request decoded by `decoder`."""
    desc = pb.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for m in desc.methods:
        if m.client_streaming:  # CSI has none; refuse to serve one wrongly
            raise TypeError(f"{desc.full_name}/{m.name} is a client-streaming method")
        # SnapshotMetadata's methods stream their answers (servicers wrapped by rpc_stream).
        make = (
            grpc.unary_stream_rpc_method_handler
            if m.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[m.name] = make(
            getattr(servicer, m.name),
            request_deserializer=decoder(message_factory.GetMessageClass(m.input_type)),
            response_serializer=message_factory.GetMessageClass(m.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))
    server.add_registered_method_handlers(desc.full_name, handlers)


def add_services(
    server: grpc.aio.Server,
    engine: VolumeEngine,
    *,
    driver_name: str,
    controller: bool = True,
    node: bool = True,
    metrics: ServerMetrics | None = None,
) -> None:
    """Register Identity and, as configured, Controller, GroupController, SnapshotMetadata and Node."""
    _register(server, IdentityServicer(engine, metrics, driver_name, controller), "Identity")
    if controller:
        _register(server, ControllerServicer(engine, metrics), "Controller")
        if engine.capabilities.group_snapshots:
            _register(server, GroupControllerServicer(engine, metrics), "GroupController")
        if engine.capabilities.snapshot_metadata:
            _register(server, SnapshotMetadataServicer(engine, metrics), "SnapshotMetadata")
    if node:
        _register(server, NodeServicer(engine, metrics), "Node")
