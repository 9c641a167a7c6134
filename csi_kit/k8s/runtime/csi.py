"""A small async CSI client: the only way the loops reach a driver.

The loops never import the driver's internals; they speak CSI over gRPC like
the upstream sidecars, so they work against any CSI driver.  Calls carry a
per-call deadline (upstream sidecars default to one minute); a gRPC failure
surfaces as `CSIError` with its status code, which the loops classify into
"final" (the driver answered) and "may still be in progress".
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


class CSIError(Exception):
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
    return isinstance(e, CSIError) and e.code not in NON_FINAL_CODES


@attrs.frozen
class SnapshotInfo:
    snapshot_id: str
    source_volume_id: str
    size_bytes: int
    creation_time_ns: int
    ready_to_use: bool
    group_snapshot_id: str = ""


@attrs.frozen
class DriverInfo:
    name: str
    vendor_version: str
    plugin_capabilities: frozenset[str]
    controller_capabilities: frozenset[str]
    group_capabilities: frozenset[str]


def _snapshot(s: Any) -> SnapshotInfo:
    ns = 0
    if s.HasField("creation_time"):
        ns = s.creation_time.seconds * 1_000_000_000 + s.creation_time.nanos
    return SnapshotInfo(
        snapshot_id=s.snapshot_id,
        source_volume_id=s.source_volume_id,
        size_bytes=int(s.size_bytes),
        creation_time_ns=ns,
        ready_to_use=bool(s.ready_to_use),
        group_snapshot_id=s.group_snapshot_id,
    )


def grpc_target(endpoint: str) -> str:
    """`unix:///path`, `unix:/path`, a bare `/path` or `host:port` → a gRPC target."""
    if endpoint.startswith("/"):
        return "unix://" + endpoint
    if endpoint.startswith("tcp://"):
        return endpoint[len("tcp://") :]
    return endpoint


class CSIClient:
    def __init__(self, endpoint: str, *, timeout: float = 60.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        # Each call observed as the sidecars do (csi_sidecar_operations_seconds).
        self._channel = grpc.aio.insecure_channel(grpc_target(endpoint), interceptors=csi_call_interceptors())
        self._identity = pbg.IdentityStub(self._channel)
        self._controller = pbg.ControllerStub(self._channel)
        self._group = pbg.GroupControllerStub(self._channel)

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
            raise CSIError(method, e.code(), e.details() or "") from None

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
