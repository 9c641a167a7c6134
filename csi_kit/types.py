"""Value types that cross the boundary between csi_kit and a backend.

Backends never see protobuf: the gRPC layer converts every request into these
frozen attrs values and every backend answer back.  They are deliberately
tolerant when built (an unknown access mode number is kept as an int) so that
*validation* — one module, `csi_kit._core.validate` — decides what is wrong and
says so with the spec's status code.

Fields that hold secrets are excluded from ``repr`` so that logging a value can
never print one.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from typing import Literal

import attrs

__all__ = [
    "AccessMode",
    "AccessType",
    "MountAccess",
    "VolumeCapability",
    "CapacityRange",
    "Topology",
    "TopologyRequirement",
    "ContentSource",
    "VolumeRequest",
    "Volume",
    "Snapshot",
    "GroupSnapshot",
    "CreatedVolume",
    "CreatedSnapshot",
    "ExpandResult",
    "VolumeCondition",
    "VolumeUsage",
    "VolumeStats",
    "StageRequest",
    "PublishRequest",
    "Inventory",
    "BlockMetadataType",
    "BlockRange",
    "BlockMetadata",
]


def _frozen_map(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return dict(value or {})


class AccessMode(enum.IntEnum):
    """`VolumeCapability.AccessMode.Mode`, with the spec's numbers."""

    UNKNOWN = 0
    SINGLE_NODE_WRITER = 1
    SINGLE_NODE_READER_ONLY = 2
    MULTI_NODE_READER_ONLY = 3
    MULTI_NODE_SINGLE_WRITER = 4
    MULTI_NODE_MULTI_WRITER = 5
    SINGLE_NODE_SINGLE_WRITER = 6
    SINGLE_NODE_MULTI_WRITER = 7

    @property
    def single_node(self) -> bool:
        return self in (
            AccessMode.SINGLE_NODE_WRITER,
            AccessMode.SINGLE_NODE_READER_ONLY,
            AccessMode.SINGLE_NODE_SINGLE_WRITER,
            AccessMode.SINGLE_NODE_MULTI_WRITER,
        )

    @property
    def read_only(self) -> bool:
        return self in (AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY)


AccessType = Literal["mount", "block"]


@attrs.frozen
class MountAccess:
    """`VolumeCapability.MountVolume`: how a filesystem volume is mounted."""

    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()
    volume_mount_group: str = ""


@attrs.frozen
class VolumeCapability:
    """One requested capability: an access type (mount or block) and a mode.

    ``access_type`` is None when the caller set neither; ``access_mode`` is the
    raw number sent, which may be outside `AccessMode` (validation rejects it).
    """

    access_type: AccessType | None
    access_mode: int
    mount: MountAccess | None = None

    @property
    def mode(self) -> AccessMode:
        try:
            return AccessMode(self.access_mode)
        except ValueError:
            return AccessMode.UNKNOWN

    @property
    def is_block(self) -> bool:
        return self.access_type == "block"

    @property
    def fs_type(self) -> str:
        return self.mount.fs_type if self.mount else ""


@attrs.frozen
class CapacityRange:
    """Requested size bounds; 0 means "not set" for either bound."""

    required_bytes: int = 0
    limit_bytes: int = 0


@attrs.frozen
class Topology:
    """One topology segment set, e.g. ``{"topology.example.io/node": "n1"}``."""

    segments: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)


@attrs.frozen
class TopologyRequirement:
    requisite: tuple[Topology, ...] = ()
    preferred: tuple[Topology, ...] = ()


@attrs.frozen
class ContentSource:
    """Where a new volume's data comes from: a snapshot or another volume."""

    kind: Literal["snapshot", "volume"]
    id: str


@attrs.frozen
class VolumeRequest:
    """A validated CreateVolume request as a backend sees it.

    ``capacity_bytes`` is the size the engine settled on from the requested
    range and the backend's limits; a backend may round it up (within
    ``capacity.limit_bytes``) and reports the size it made.
    """

    name: str
    capacity_bytes: int
    capacity: CapacityRange
    capabilities: tuple[VolumeCapability, ...]
    parameters: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    mutable_parameters: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    source: ContentSource | None = None
    accessibility: TopologyRequirement | None = None
    secrets: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map, repr=False)

    @property
    def access_type(self) -> AccessType:
        return "block" if any(c.is_block for c in self.capabilities) else "mount"


@attrs.frozen
class Volume:
    """A volume csi_kit has made and recorded."""

    volume_id: str
    name: str
    capacity_bytes: int
    access_type: AccessType = "mount"
    parameters: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    context: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    source: ContentSource | None = None
    topology: tuple[Topology, ...] = ()
    created_ns: int = 0


@attrs.frozen
class Snapshot:
    """A snapshot csi_kit has made and recorded."""

    snapshot_id: str
    name: str
    source_volume_id: str
    size_bytes: int
    created_ns: int
    ready_to_use: bool = True
    group_snapshot_id: str = ""
    parameters: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)


@attrs.frozen
class GroupSnapshot:
    group_snapshot_id: str
    name: str
    snapshots: tuple[Snapshot, ...]
    created_ns: int
    ready_to_use: bool = True


@attrs.frozen
class CreatedVolume:
    """What a backend reports after making a volume."""

    capacity_bytes: int
    context: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)


@attrs.frozen
class CreatedSnapshot:
    """What a backend reports after taking a snapshot."""

    size_bytes: int
    ready_to_use: bool = True


@attrs.frozen
class ExpandResult:
    capacity_bytes: int
    node_expansion_required: bool = False


@attrs.frozen
class VolumeCondition:
    abnormal: bool = False
    message: str = ""


@attrs.frozen
class VolumeUsage:
    unit: Literal["BYTES", "INODES"]
    total: int
    available: int
    used: int


@attrs.frozen
class VolumeStats:
    usage: tuple[VolumeUsage, ...]
    condition: VolumeCondition | None = None


@attrs.frozen
class StageRequest:
    """A validated NodeStageVolume request."""

    volume_id: str
    staging_path: str
    capability: VolumeCapability | None
    publish_context: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    volume_context: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    secrets: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map, repr=False)


@attrs.frozen
class PublishRequest:
    """A validated NodePublishVolume request."""

    volume_id: str
    target_path: str
    capability: VolumeCapability | None
    readonly: bool = False
    staging_path: str = ""
    publish_context: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    volume_context: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    secrets: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map, repr=False)


@attrs.frozen
class Inventory:
    """What a backend holds, for the start-up reconciliation with the store."""

    volume_ids: frozenset[str] = frozenset()
    snapshot_ids: frozenset[str] = frozenset()


class BlockMetadataType(enum.IntEnum):
    """How the ranges of a SnapshotMetadata answer are sized (the spec's numbers)."""

    UNKNOWN = 0
    #: Every range has the same length: the backend's block size.
    FIXED_LENGTH = 1
    #: Ranges are extents of any length.
    VARIABLE_LENGTH = 2


@attrs.frozen
class BlockRange:
    """A byte range of a snapshot: ``length`` bytes from ``offset``."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@attrs.frozen
class BlockMetadata:
    """A backend's answer to a SnapshotMetadata hook.

    ``ranges`` is produced lazily (usually a generator) and consumed by
    csi_kit from a worker thread, a chunk at a time, in ascending order;
    csi_kit closes it when the stream ends or the client goes away, so a
    generator's ``finally`` is where a backend releases what it holds.
    ``capacity_bytes`` is the snapshot's volume size and ``block_type`` the
    style of every range in the answer.
    """

    block_type: BlockMetadataType
    capacity_bytes: int
    ranges: Iterator[BlockRange] = attrs.field(eq=False, repr=False)
