"""The CSI SnapshotMetadata service: GetMetadataAllocated and GetMetadataDelta.

Served (and advertised as SNAPSHOT_METADATA_SERVICE) only when the backend
implements both `Backend.snapshot_allocated` and `Backend.snapshot_delta`
(`Capabilities.snapshot_metadata`), on controller endpoints.  Both methods
are server-streaming: each is an async generator wrapped by `rpc_stream`,
relaying the chunks of `csi_kit._core.snapmeta` converted to protobuf.  No
rule lives here; the streams are closed promptly when the client goes away
(``aclosing``), so the snapshots' locks are given back at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from csi_kit._core.engine import VolumeEngine
from csi_kit._core.snapmeta import SnapshotMetadataRoad
from csi_kit._grpc import convert
from csi_kit._grpc.errors import rpc_stream
from csi_kit._grpc.metrics import ServerMetrics
from csi_kit._pb import csi_pb2_grpc as pb_grpc

__all__ = ["SnapshotMetadataServicer"]


class SnapshotMetadataServicer(pb_grpc.SnapshotMetadataServicer):
    def __init__(self, engine: VolumeEngine, metrics: ServerMetrics | None) -> None:
        self.road = SnapshotMetadataRoad(engine)
        self.metrics = metrics

    @rpc_stream("GetMetadataAllocated")
    async def GetMetadataAllocated(self, request: Any, context: Any) -> AsyncGenerator[Any, None]:
        chunks = self.road.allocated(request.snapshot_id, request.starting_offset, request.max_results)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield convert.metadata_allocated_pb(chunk)

    @rpc_stream("GetMetadataDelta")
    async def GetMetadataDelta(self, request: Any, context: Any) -> AsyncGenerator[Any, None]:
        chunks = self.road.delta(
            request.base_snapshot_id, request.target_snapshot_id, request.starting_offset, request.max_results
        )
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield convert.metadata_delta_pb(chunk)
