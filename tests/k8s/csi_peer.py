"""A scriptable CSI driver served over real gRPC, for fault injection.

The loops talk to it through `CSIClient` exactly as to a real driver; tests
script its answers (errors, slow or not-yet-ready snapshots) to reach the
interleavings a real backend produces only by chance.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg


class ScriptedCSI(pbg.IdentityServicer, pbg.ControllerServicer):
    def __init__(self, name: str = "scripted.csi-kit.io") -> None:
        self.name = name
        self.snapshots: dict[str, pb.Snapshot] = {}  # by name
        self.calls: Counter[str] = Counter()
        self.create_errors: list[tuple[grpc.StatusCode, str]] = []
        self.delete_errors: list[tuple[grpc.StatusCode, str]] = []
        self.create_gate: asyncio.Event | None = None
        self.create_started = asyncio.Event()
        self.not_ready_polls = 0  # CreateSnapshot answers ready_to_use=False this many times per snapshot
        self._polls: Counter[str] = Counter()
        self.secrets_seen: list[dict[str, str]] = []
        self.params_seen: list[dict[str, str]] = []
        self.deleted: list[str] = []
        self.names: set[str] = set()  # every CreateSnapshot name ever asked for

    # Identity
    async def GetPluginInfo(self, request: Any, context: Any) -> Any:
        return pb.GetPluginInfoResponse(name=self.name, vendor_version="0.1")

    async def GetPluginCapabilities(self, request: Any, context: Any) -> Any:
        cap = pb.PluginCapability(
            service=pb.PluginCapability.Service(type=pb.PluginCapability.Service.CONTROLLER_SERVICE)
        )
        return pb.GetPluginCapabilitiesResponse(capabilities=[cap])

    async def Probe(self, request: Any, context: Any) -> Any:
        return pb.ProbeResponse()

    # Controller
    async def ControllerGetCapabilities(self, request: Any, context: Any) -> Any:
        T = pb.ControllerServiceCapability.RPC
        caps = [
            pb.ControllerServiceCapability(rpc=T(type=t))
            for t in (T.CREATE_DELETE_VOLUME, T.CREATE_DELETE_SNAPSHOT, T.LIST_SNAPSHOTS)
        ]
        return pb.ControllerGetCapabilitiesResponse(capabilities=caps)

    async def CreateSnapshot(self, request: Any, context: Any) -> Any:
        self.calls["CreateSnapshot"] += 1
        self.names.add(request.name)
        self.secrets_seen.append(dict(request.secrets))
        self.params_seen.append(dict(request.parameters))
        self.create_started.set()
        if self.create_gate is not None:
            await self.create_gate.wait()
        if self.create_errors:
            code, msg = self.create_errors.pop(0)
            await context.abort(code, msg)
        snap = self.snapshots.get(request.name)
        if snap is None:
            ts = timestamp_pb2.Timestamp()
            ts.FromNanoseconds(time.time_ns())
            snap = pb.Snapshot(
                size_bytes=1 << 30,
                snapshot_id="snap-" + request.name,
                source_volume_id=request.source_volume_id,
                creation_time=ts,
                ready_to_use=False,
            )
            self.snapshots[request.name] = snap
        self._polls[request.name] += 1
        if self._polls[request.name] > self.not_ready_polls:
            snap.ready_to_use = True
        return pb.CreateSnapshotResponse(snapshot=snap)

    async def DeleteSnapshot(self, request: Any, context: Any) -> Any:
        self.calls["DeleteSnapshot"] += 1
        if self.delete_errors:
            code, msg = self.delete_errors.pop(0)
            await context.abort(code, msg)
        for name, s in list(self.snapshots.items()):
            if s.snapshot_id == request.snapshot_id:
                del self.snapshots[name]
        self.deleted.append(request.snapshot_id)
        return pb.DeleteSnapshotResponse()

    async def ListSnapshots(self, request: Any, context: Any) -> Any:
        self.calls["ListSnapshots"] += 1
        entries = [
            pb.ListSnapshotsResponse.Entry(snapshot=s)
            for s in self.snapshots.values()
            if not request.snapshot_id or s.snapshot_id == request.snapshot_id
        ]
        return pb.ListSnapshotsResponse(entries=entries)

    def add_existing(self, snapshot_id: str, size: int = 5 << 20, ready: bool = True) -> None:
        """A snapshot that exists on the 'backend' already (for pre-provisioned contents)."""
        ts = timestamp_pb2.Timestamp()
        ts.FromNanoseconds(time.time_ns())
        self.snapshots["pre-" + snapshot_id] = pb.Snapshot(
            size_bytes=size,
            snapshot_id=snapshot_id,
            source_volume_id="vol-x",
            creation_time=ts,
            ready_to_use=ready,
        )


async def serve(peer: ScriptedCSI, socket_path: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    pbg.add_IdentityServicer_to_server(peer, server)
    pbg.add_ControllerServicer_to_server(peer, server)
    server.add_insecure_port("unix://" + socket_path)
    await server.start()
    return server
