"""protobuf ⇄ attrs conversion: the only code that reads or builds CSI messages.

Conversion is tolerant: it never rejects a request (validation does that, in
one place, with the spec's codes); it only maps wire shapes to value types.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from csi_kit._core.snapmeta import MetadataChunk
from csi_kit._pb import csi_pb2 as pb
from csi_kit.types import (
    CapacityRange,
    ContentSource,
    GroupSnapshot,
    MountAccess,
    Snapshot,
    Topology,
    TopologyRequirement,
    Volume,
    VolumeCapability,
    VolumeCondition,
    VolumeRequest,
    VolumeStats,
)

__all__ = [
    "capability",
    "capabilities",
    "capacity_range",
    "topology",
    "volume_request",
    "volume_pb",
    "snapshot_pb",
    "group_snapshot_pb",
    "condition_pb",
    "stats_pb",
    "capability_pb",
    "metadata_allocated_pb",
    "metadata_delta_pb",
]


def capability(msg: Any) -> VolumeCapability:
    kind = msg.WhichOneof("access_type")
    mount = None
    if kind == "mount":
        m = msg.mount
        mount = MountAccess(m.fs_type, tuple(m.mount_flags), m.volume_mount_group)
    return VolumeCapability(
        access_type=kind,
        access_mode=msg.access_mode.mode if msg.HasField("access_mode") else 0,
        mount=mount,
    )


def capabilities(msgs: Iterable[Any]) -> tuple[VolumeCapability, ...]:
    return tuple(capability(m) for m in msgs)


def optional_capability(parent: Any, field: str) -> VolumeCapability | None:
    return capability(getattr(parent, field)) if parent.HasField(field) else None


def capacity_range(parent: Any, field: str = "capacity_range") -> CapacityRange:
    if not parent.HasField(field):
        return CapacityRange()
    msg = getattr(parent, field)
    return CapacityRange(msg.required_bytes, msg.limit_bytes)


def topology(msg: Any) -> Topology:
    return Topology(dict(msg.segments))


def topology_requirement(parent: Any) -> TopologyRequirement | None:
    if not parent.HasField("accessibility_requirements"):
        return None
    req = parent.accessibility_requirements
    return TopologyRequirement(
        tuple(topology(t) for t in req.requisite), tuple(topology(t) for t in req.preferred)
    )


def content_source(parent: Any) -> ContentSource | None:
    if not parent.HasField("volume_content_source"):
        return None
    src = parent.volume_content_source
    kind = src.WhichOneof("type")
    if kind == "snapshot":
        return ContentSource("snapshot", src.snapshot.snapshot_id)
    if kind == "volume":
        return ContentSource("volume", src.volume.volume_id)
    # An empty source message: treat as a source with no id (validation rejects it).
    return ContentSource("snapshot", "")


def volume_request(req: Any) -> VolumeRequest:
    return VolumeRequest(
        name=req.name,
        capacity_bytes=0,
        capacity=capacity_range(req),
        capabilities=capabilities(req.volume_capabilities),
        parameters=dict(req.parameters),
        mutable_parameters=dict(req.mutable_parameters),
        source=content_source(req),
        accessibility=topology_requirement(req),
        secrets=dict(req.secrets),
    )


def _source_pb(source: ContentSource | None) -> Any:
    if source is None:
        return None
    if source.kind == "snapshot":
        return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=source.id))
    return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=source.id))


def volume_pb(vol: Volume) -> Any:
    msg = pb.Volume(
        volume_id=vol.volume_id,
        capacity_bytes=vol.capacity_bytes,
        volume_context=dict(vol.context),
        accessible_topology=[pb.Topology(segments=dict(t.segments)) for t in vol.topology],
    )
    src = _source_pb(vol.source)
    if src is not None:
        msg.content_source.CopyFrom(src)
    return msg


def timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def snapshot_pb(snap: Snapshot) -> Any:
    return pb.Snapshot(
        snapshot_id=snap.snapshot_id,
        source_volume_id=snap.source_volume_id,
        size_bytes=snap.size_bytes,
        creation_time=timestamp(snap.created_ns),
        ready_to_use=snap.ready_to_use,
        group_snapshot_id=snap.group_snapshot_id,
    )


def group_snapshot_pb(group: GroupSnapshot) -> Any:
    return pb.VolumeGroupSnapshot(
        group_snapshot_id=group.group_snapshot_id,
        snapshots=[snapshot_pb(s) for s in group.snapshots],
        creation_time=timestamp(group.created_ns),
        ready_to_use=group.ready_to_use,
    )


def condition_pb(cond: VolumeCondition) -> Any:
    return pb.VolumeCondition(abnormal=cond.abnormal, message=cond.message)


def stats_pb(stats: VolumeStats) -> Any:
    resp = pb.NodeGetVolumeStatsResponse(
        usage=[
            pb.VolumeUsage(
                unit=pb.VolumeUsage.BYTES if u.unit == "BYTES" else pb.VolumeUsage.INODES,
                total=u.total,
                available=u.available,
                used=u.used,
            )
            for u in stats.usage
        ]
    )
    if stats.condition is not None:
        resp.volume_condition.CopyFrom(condition_pb(stats.condition))
    return resp


def capability_pb(cap: VolumeCapability) -> Any:
    msg = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=cap.access_mode))  # type: ignore[arg-type]
    if cap.access_type == "block":
        msg.block.SetInParent()
    elif cap.access_type == "mount":
        m = cap.mount or MountAccess()
        msg.mount.fs_type = m.fs_type
        msg.mount.mount_flags.extend(m.mount_flags)
        msg.mount.volume_mount_group = m.volume_mount_group
    return msg


def _block_metadata(chunk: MetadataChunk) -> dict[str, Any]:
    return {
        "block_metadata_type": int(chunk.block_type),
        "volume_capacity_bytes": chunk.capacity_bytes,
        "block_metadata": [pb.BlockMetadata(byte_offset=r.offset, size_bytes=r.length) for r in chunk.ranges],
    }


def metadata_allocated_pb(chunk: MetadataChunk) -> Any:
    return pb.GetMetadataAllocatedResponse(**_block_metadata(chunk))


def metadata_delta_pb(chunk: MetadataChunk) -> Any:
    return pb.GetMetadataDeltaResponse(**_block_metadata(chunk))
