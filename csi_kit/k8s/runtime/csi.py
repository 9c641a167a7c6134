"""The one async CSI client: the only way the loops reach a driver.

The loops never import the driver's internals; they speak CSI over gRPC like
the upstream sidecars, so they work against any CSI driver.  A process makes
one `CSIClient` -- one channel, one stub per CSI service, one call wrapper
that observes every call (csi_sidecar_operations_seconds) -- and hands it to
every loop; each loop declares the narrow `*Driver` Protocol of the calls it
makes next to itself, so tests can hand it any CSI peer.

Calls carry a per-call deadline (upstream sidecars default to one minute); a
gRPC failure surfaces as `CSICallError` with its status code, which the loops
classify into "final" (the driver answered) and "may still be in progress".
The calls return the attrs value types below, never protobuf messages.
(`csi_kit.errors.CSIError` is the *driver's* error, raised inside a driver;
`CSICallError` is a call that failed as seen from the outside.)
"""

from __future__ import annotations

from typing import Any, Self

import attrs
import grpc
import grpc.aio

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as _pbg
from csi_kit.k8s.runtime.metrics import csi_call_interceptors

pbg: Any = _pbg  # generated, untyped


class CSICallError(Exception):
    """A CSI call that did not succeed; `code` is the gRPC status code."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


# Codes after which the operation may still complete on the storage side, so
# the caller must keep asking with the same name rather than give up
# (external-snapshotter's isCSIFinalError, same list).
NON_FINAL_CODES = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


def is_final_error(e: BaseException) -> bool:
    """True when the driver definitely did not (and will not) complete the operation."""
    return isinstance(e, CSICallError) and e.code not in NON_FINAL_CODES


def grpc_target(endpoint: str) -> str:
    """`unix:///path`, `unix:/path`, a bare `/path` or `host:port` → a gRPC target."""
    if endpoint.startswith("/"):
        return "unix://" + endpoint
    if endpoint.startswith("tcp://"):
        return endpoint[len("tcp://") :]
    return endpoint


# ------------------------------------------------------------ value types


@attrs.frozen
class DriverInfo:
    name: str
    vendor_version: str
    plugin_capabilities: frozenset[str]
    controller_capabilities: frozenset[str]
    group_capabilities: frozenset[str]


@attrs.frozen
class Capability:
    """One CSI VolumeCapability, built from a PV/PVC."""

    access_mode: str  # csi.v1 VolumeCapability.AccessMode.Mode name
    block: bool = False
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()

    def to_pb(self) -> Any:
        mode = pb.VolumeCapability.AccessMode(mode=self.access_mode)
        if self.block:
            return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=mode)
        return pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(fs_type=self.fs_type, mount_flags=list(self.mount_flags)),
            access_mode=mode,
        )


@attrs.frozen
class TopologyRequirement:
    requisite: tuple[dict[str, str], ...]
    preferred: tuple[dict[str, str], ...]


@attrs.frozen
class CreatedVolume:
    volume_id: str
    capacity_bytes: int
    volume_context: dict[str, str]
    accessible_topology: tuple[dict[str, str], ...]
    content_source: tuple[str, str] | None = None


@attrs.frozen
class VolumeCondition:
    """A volume's condition as the driver reports it (CSI VolumeCondition)."""

    abnormal: bool
    message: str


@attrs.frozen
class SnapshotInfo:
    snapshot_id: str
    source_volume_id: str
    size_bytes: int
    creation_time_ns: int
    ready_to_use: bool
    group_snapshot_id: str = ""


@attrs.frozen
class GroupSnapshotInfo:
    group_snapshot_id: str
    snapshots: tuple[SnapshotInfo, ...]
    creation_time_ns: int
    ready_to_use: bool


def _ns(m: Any) -> int:
    """A message's `creation_time` in nanoseconds (0 when unset)."""
    if not m.HasField("creation_time"):
        return 0
    return int(m.creation_time.seconds) * 1_000_000_000 + int(m.creation_time.nanos)


def _snapshot(s: Any) -> SnapshotInfo:
    return SnapshotInfo(
        snapshot_id=s.snapshot_id,
        source_volume_id=s.source_volume_id,
        size_bytes=int(s.size_bytes),
        creation_time_ns=_ns(s),
        ready_to_use=bool(s.ready_to_use),
        group_snapshot_id=s.group_snapshot_id,
    )


def _group(g: Any) -> GroupSnapshotInfo:
    return GroupSnapshotInfo(
        group_snapshot_id=g.group_snapshot_id,
        snapshots=tuple(_snapshot(s) for s in g.snapshots),
        creation_time_ns=_ns(g),
        ready_to_use=bool(g.ready_to_use),
    )


def _condition(status: Any) -> VolumeCondition:
    """A ListVolumes entry's or ControllerGetVolume's status → condition (unset: normal, as upstream)."""
    if status is None or not status.HasField("volume_condition"):
        return VolumeCondition(False, "")
    return VolumeCondition(bool(status.volume_condition.abnormal), str(status.volume_condition.message))


# ----------------------------------------------------------------- client


class CSIClient:
    """Every CSI call the loops make, over one channel to the driver at `endpoint`."""

    def __init__(self, endpoint: str, *, timeout: float = 60.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        # Each call observed as the sidecars do (csi_sidecar_operations_seconds).
        self._channel = grpc.aio.insecure_channel(grpc_target(endpoint), interceptors=csi_call_interceptors())
        self._identity = pbg.IdentityStub(self._channel)
        self._controller = pbg.ControllerStub(self._channel)
        self._group = pbg.GroupControllerStub(self._channel)
        self._node = pbg.NodeStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, stub_method: Any, request: Any) -> Any:
        try:
            return await stub_method(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise CSICallError(method, e.code(), e.details() or "") from None

    # ------------------------------------------------------------ identity

    async def driver_info(self) -> DriverInfo:
        """GetPluginInfo + GetPluginCapabilities + ControllerGetCapabilities (+ group ones when offered)."""
        info = await self._call("GetPluginInfo", self._identity.GetPluginInfo, pb.GetPluginInfoRequest())
        caps = await self._call(
            "GetPluginCapabilities",
            self._identity.GetPluginCapabilities,
            pb.GetPluginCapabilitiesRequest(),
        )
        plugin: set[str] = set()
        for c in caps.capabilities:
            if c.HasField("service"):
                plugin.add(pb.PluginCapability.Service.Type.Name(c.service.type))
        controller: set[str] = set()
        if "CONTROLLER_SERVICE" in plugin:
            cc = await self._call(
                "ControllerGetCapabilities",
                self._controller.ControllerGetCapabilities,
                pb.ControllerGetCapabilitiesRequest(),
            )
            controller = {pb.ControllerServiceCapability.RPC.Type.Name(c.rpc.type) for c in cc.capabilities}
        group: set[str] = set()
        if "GROUP_CONTROLLER_SERVICE" in plugin:
            gc = await self._call(
                "GroupControllerGetCapabilities",
                self._group.GroupControllerGetCapabilities,
                pb.GroupControllerGetCapabilitiesRequest(),
            )
            group = {pb.GroupControllerServiceCapability.RPC.Type.Name(c.rpc.type) for c in gc.capabilities}
        return DriverInfo(
            info.name,
            info.vendor_version,
            frozenset(plugin),
            frozenset(controller),
            frozenset(group),
        )

    async def probe(self) -> bool:
        """Probe → ready (an unset `ready` means ready, per the spec)."""
        r = await self._call("Probe", self._identity.Probe, pb.ProbeRequest())
        return (not r.HasField("ready")) or bool(r.ready.value)

    async def node_info(self) -> tuple[str, dict[str, str]]:
        """NodeGetInfo → (node_id, accessible topology segments)."""
        r = await self._call("NodeGetInfo", self._node.NodeGetInfo, pb.NodeGetInfoRequest())
        topo = dict(r.accessible_topology.segments) if r.HasField("accessible_topology") else {}
        return r.node_id, topo

    # ------------------------------------------------------------- volumes

    async def create_volume(
        self,
        name: str,
        *,
        required_bytes: int,
        limit_bytes: int,
        capabilities: list[Capability],
        parameters: dict[str, str],
        secrets: dict[str, str],
        source: tuple[str, str] | None = None,
        topology: TopologyRequirement | None = None,
    ) -> CreatedVolume:
        req = pb.CreateVolumeRequest(
            name=name,
            capacity_range=pb.CapacityRange(required_bytes=required_bytes, limit_bytes=limit_bytes),
            volume_capabilities=[c.to_pb() for c in capabilities],
            parameters=parameters,
            secrets=secrets,
        )
        if source is not None:
            kind, ident = source
            if kind == "snapshot":
                req.volume_content_source.snapshot.snapshot_id = ident
            else:
                req.volume_content_source.volume.volume_id = ident
        if topology is not None:
            req.accessibility_requirements.requisite.extend(
                pb.Topology(segments=t) for t in topology.requisite
            )
            req.accessibility_requirements.preferred.extend(
                pb.Topology(segments=t) for t in topology.preferred
            )
        r = await self._call("CreateVolume", self._controller.CreateVolume, req)
        v = r.volume
        src: tuple[str, str] | None = None
        if v.HasField("content_source"):
            if v.content_source.HasField("snapshot"):
                src = ("snapshot", v.content_source.snapshot.snapshot_id)
            elif v.content_source.HasField("volume"):
                src = ("volume", v.content_source.volume.volume_id)
        return CreatedVolume(
            volume_id=v.volume_id,
            capacity_bytes=int(v.capacity_bytes),
            volume_context=dict(v.volume_context),
            accessible_topology=tuple(dict(t.segments) for t in v.accessible_topology),
            content_source=src,
        )

    async def delete_volume(self, volume_id: str, secrets: dict[str, str]) -> None:
        await self._call(
            "DeleteVolume",
            self._controller.DeleteVolume,
            pb.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets),
        )

    async def expand_volume(
        self, volume_id: str, required_bytes: int, capability: Capability | None, secrets: dict[str, str]
    ) -> tuple[int, bool]:
        """ControllerExpandVolume → (capacity_bytes, node_expansion_required)."""
        req = pb.ControllerExpandVolumeRequest(
            volume_id=volume_id,
            capacity_range=pb.CapacityRange(required_bytes=required_bytes),
            secrets=secrets,
        )
        if capability is not None:
            req.volume_capability.CopyFrom(capability.to_pb())
        r = await self._call("ControllerExpandVolume", self._controller.ControllerExpandVolume, req)
        return int(r.capacity_bytes), bool(r.node_expansion_required)

    async def modify_volume(self, volume_id: str, mutable_parameters: dict[str, str]) -> None:
        """ControllerModifyVolume (no secrets: upstream's resizer sends none either)."""
        await self._call(
            "ControllerModifyVolume",
            self._controller.ControllerModifyVolume,
            pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=mutable_parameters),
        )

    async def publish_volume(
        self,
        volume_id: str,
        node_id: str,
        capability: Capability,
        *,
        readonly: bool,
        secrets: dict[str, str],
        volume_context: dict[str, str],
    ) -> dict[str, str]:
        r = await self._call(
            "ControllerPublishVolume",
            self._controller.ControllerPublishVolume,
            pb.ControllerPublishVolumeRequest(
                volume_id=volume_id,
                node_id=node_id,
                volume_capability=capability.to_pb(),
                readonly=readonly,
                secrets=secrets,
                volume_context=volume_context,
            ),
        )
        return dict(r.publish_context)

    async def unpublish_volume(self, volume_id: str, node_id: str, secrets: dict[str, str]) -> None:
        await self._call(
            "ControllerUnpublishVolume",
            self._controller.ControllerUnpublishVolume,
            pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id, secrets=secrets),
        )

    async def get_capacity(
        self, parameters: dict[str, str], topology: dict[str, str] | None, capabilities: list[Capability]
    ) -> tuple[int, int | None]:
        """GetCapacity → (available_capacity, maximum_volume_size or None when not reported)."""
        req = pb.GetCapacityRequest(
            parameters=parameters, volume_capabilities=[c.to_pb() for c in capabilities]
        )
        if topology is not None:
            req.accessible_topology.CopyFrom(pb.Topology(segments=topology))
        r = await self._call("GetCapacity", self._controller.GetCapacity, req)
        maximum = int(r.maximum_volume_size.value) if r.HasField("maximum_volume_size") else None
        return int(r.available_capacity), maximum

    async def list_volume_conditions(self) -> dict[str, VolumeCondition]:
        """ListVolumes, every page → {volume_id: condition}."""
        out: dict[str, VolumeCondition] = {}
        token = ""
        seen: set[str] = set()
        while True:
            r = await self._call(
                "ListVolumes", self._controller.ListVolumes, pb.ListVolumesRequest(starting_token=token)
            )
            for e in r.entries:
                out[e.volume.volume_id] = _condition(e.status if e.HasField("status") else None)
            token = r.next_token
            if not token:
                return out
            if token in seen:  # a driver that pages in a circle would keep us here forever
                raise CSICallError("ListVolumes", grpc.StatusCode.INTERNAL, f"next_token {token!r} repeats")
            seen.add(token)

    async def get_volume_condition(self, volume_id: str) -> VolumeCondition:
        r = await self._call(
            "ControllerGetVolume",
            self._controller.ControllerGetVolume,
            pb.ControllerGetVolumeRequest(volume_id=volume_id),
        )
        return _condition(r.status if r.HasField("status") else None)

    # ----------------------------------------------------------- snapshots

    async def create_snapshot(
        self,
        source_volume_id: str,
        name: str,
        parameters: dict[str, str],
        secrets: dict[str, str],
    ) -> SnapshotInfo:
        r = await self._call(
            "CreateSnapshot",
            self._controller.CreateSnapshot,
            pb.CreateSnapshotRequest(
                source_volume_id=source_volume_id,
                name=name,
                parameters=parameters,
                secrets=secrets,
            ),
        )
        return _snapshot(r.snapshot)

    async def delete_snapshot(self, snapshot_id: str, secrets: dict[str, str]) -> None:
        await self._call(
            "DeleteSnapshot",
            self._controller.DeleteSnapshot,
            pb.DeleteSnapshotRequest(snapshot_id=snapshot_id, secrets=secrets),
        )

    async def list_snapshots(
        self, *, snapshot_id: str = "", secrets: dict[str, str] | None = None
    ) -> list[SnapshotInfo]:
        """ListSnapshots filtered by id (all pages)."""
        out: list[SnapshotInfo] = []
        token = ""
        while True:
            r = await self._call(
                "ListSnapshots",
                self._controller.ListSnapshots,
                pb.ListSnapshotsRequest(snapshot_id=snapshot_id, starting_token=token, secrets=secrets or {}),
            )
            out.extend(_snapshot(e.snapshot) for e in r.entries)
            token = r.next_token
            if not token:
                return out

    async def get_snapshot(self, snapshot_id: str, secrets: dict[str, str]) -> SnapshotInfo:
        r = await self._call(
            "GetSnapshot",
            self._controller.GetSnapshot,
            pb.GetSnapshotRequest(snapshot_id=snapshot_id, secrets=secrets),
        )
        return _snapshot(r.snapshot)

    # ----------------------------------------------------- group snapshots

    async def create_group_snapshot(
        self, name: str, volume_ids: list[str], parameters: dict[str, str], secrets: dict[str, str]
    ) -> GroupSnapshotInfo:
        r = await self._call(
            "CreateVolumeGroupSnapshot",
            self._group.CreateVolumeGroupSnapshot,
            pb.CreateVolumeGroupSnapshotRequest(
                name=name, source_volume_ids=volume_ids, parameters=parameters, secrets=secrets
            ),
        )
        return _group(r.group_snapshot)

    async def delete_group_snapshot(
        self, group_id: str, snapshot_ids: list[str], secrets: dict[str, str]
    ) -> None:
        await self._call(
            "DeleteVolumeGroupSnapshot",
            self._group.DeleteVolumeGroupSnapshot,
            pb.DeleteVolumeGroupSnapshotRequest(
                group_snapshot_id=group_id, snapshot_ids=snapshot_ids, secrets=secrets
            ),
        )

    async def get_group_snapshot(
        self, group_id: str, snapshot_ids: list[str], secrets: dict[str, str]
    ) -> GroupSnapshotInfo:
        r = await self._call(
            "GetVolumeGroupSnapshot",
            self._group.GetVolumeGroupSnapshot,
            pb.GetVolumeGroupSnapshotRequest(
                group_snapshot_id=group_id, snapshot_ids=snapshot_ids, secrets=secrets
            ),
        )
        return _group(r.group_snapshot)
