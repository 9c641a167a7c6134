"""The backend contract: what a storage engineer writes, and what csi_kit guarantees.

A backend is a plain class deriving from `Backend`.  csi_kit calls its methods
from worker threads, one call per RPC.  Before any method runs, csi_kit has

* validated the request against the spec (`csi_kit._core.validate`),
* taken the per-volume / per-snapshot lock (so two calls never work on the
  same object at once — a backend needs no locking of its own for that),
* resolved idempotency by name (a backend is asked to make an object only once
  per name, with an id csi_kit generated), and
* recorded its intent in the durable store (so a crash mid-call is cleaned up
  at the next start through `delete_volume` / `delete_snapshot`).

What a backend advertises is derived from what it overrides: a backend that
does not override `create_snapshot` is served without the snapshot
capabilities, one without `node_stage` without STAGE_UNSTAGE_VOLUME, and so on
(`capabilities_of`).  Each method documents the capability it stands for.

Errors: raise `csi_kit.errors` exceptions; anything else becomes INTERNAL.

Ids
---
Every id any method receives — volume, snapshot and group ids, on the
controller and the node side alike — is either one csi_kit generated (a UUID)
or a caller's id that passed one framework check
(`csi_kit._core.validate.check_id`): not empty, at most 128 bytes of UTF-8,
and one path component — no ``/``, not ``.`` or ``..``, no NUL and no control
character (U+0000-U+001F, U+007F-U+009F).  A backend may therefore join an id
into a path as a single component.  A malformed id is answered
INVALID_ARGUMENT before a backend sees it; a well-formed id that names nothing
still reaches read-only checks such as `volume_exists`, so answer those by
looking, not by assuming.  A backend whose ids are opaque to it (it never uses
one in a path or a command) may set `Backend.opaque_ids` to keep only the
required, length and NUL rules.

Paths
-----
``target_path``, ``staging_path`` and ``volume_path`` given to the node methods
are caller paths the framework has checked and resolved:

* absolute and already normal (no ``.`` or ``..`` component, no ``//``, no
  trailing ``/``, no control character), and never ``/`` itself;
* never inside the driver's state directory, nor inside any directory the
  backend declares in `Backend.protected_paths`;
* resolved by the framework with no symlink followed in any component;
* for `node_stage` / `node_publish`, the target exists when the method is
  called: the framework creates it when it did not exist (a directory for
  mount access, a file for block access);
* `node_unstage` / `node_unpublish` are called only for a path at which this
  driver recorded a stage / publish of that volume, under the volume's lock
  and with the intent recorded.

A backend mounts and unmounts through `csi_kit.linux.mounts` (``bind_mount``,
``mount``, ``unmount``), never by shelling out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs

from csi_kit.errors import Unimplemented
from csi_kit.types import (
    AccessMode,
    AccessType,
    BlockMetadata,
    CreatedSnapshot,
    CreatedVolume,
    ExpandResult,
    Inventory,
    PublishRequest,
    Snapshot,
    StageRequest,
    Topology,
    Volume,
    VolumeCapability,
    VolumeCondition,
    VolumeRequest,
    VolumeStats,
)

__all__ = ["Backend", "BackendContext", "Capabilities", "capabilities_of", "GiB", "MiB"]

MiB = 1 << 20
GiB = 1 << 30


@attrs.frozen
class BackendContext:
    """What the driver tells a backend about where it runs."""

    driver_name: str
    node_id: str
    state_dir: str

    @property
    def topology_key(self) -> str:
        """The segment key under which node-local volumes report their node."""
        return f"topology.{self.driver_name}/node"


class Backend:
    """Base class for storage backends.  Override what your storage can do.

    Class attributes describe the static limits csi_kit validates against
    before a call reaches the backend.  Every id and path a method receives
    has passed the framework's checks (see the module docstring): ids are one
    path component unless `opaque_ids` is set; node paths are absolute,
    normal, not ``/``, outside the state directory and `protected_paths`,
    resolved without following a symlink; node methods run under the
    volume's lock with their intent recorded, and unstage / unpublish only
    for paths this driver recorded.
    """

    #: Access modes this backend can serve.
    access_modes: ClassVar[frozenset[AccessMode]] = frozenset(
        {
            AccessMode.SINGLE_NODE_WRITER,
            AccessMode.SINGLE_NODE_READER_ONLY,
            AccessMode.SINGLE_NODE_SINGLE_WRITER,
            AccessMode.SINGLE_NODE_MULTI_WRITER,
        }
    )
    #: Access types: "mount", "block" or both.
    access_types: ClassVar[frozenset[AccessType]] = frozenset({"mount"})
    #: Filesystems accepted in a mount capability ("" means the default).
    fs_types: ClassVar[frozenset[str]] = frozenset({""})
    #: The default fs_type used when a mount capability names none.
    default_fs_type: ClassVar[str] = ""
    #: Size bounds; a request outside them gets OUT_OF_RANGE.
    min_volume_bytes: ClassVar[int] = 1
    max_volume_bytes: ClassVar[int] = 1 << 50
    default_volume_bytes: ClassVar[int] = GiB
    #: Volumes live on the node that made them (topology + same-node rules).
    node_local: ClassVar[bool] = True
    #: StorageClass parameter keys this backend understands; others get
    #: INVALID_ARGUMENT.  None accepts any key.
    parameter_keys: ClassVar[frozenset[str] | None] = frozenset()
    #: Node-side volume limit reported by NodeGetInfo (0 = no limit).
    max_volumes_per_node: ClassVar[int] = 0
    #: Ids are opaque to this backend.  By default every caller id is checked
    #: to be one path component (no ``/``, not ``.``/``..``, no control
    #: characters) before it reaches a method; True keeps only the required,
    #: length and NUL rules.  Set True only if your backend never uses an id
    #: in a path or command.
    opaque_ids: ClassVar[bool] = False
    #: `probe` is a few system calls that never block for long (no device
    #: or network I/O, no subprocess): csi_kit then calls it on the event
    #: loop instead of handing it to a worker thread, which makes Probe
    #: (called every few seconds by every sidecar) about 0.1 ms cheaper.
    #: Leave it False when in doubt: a slow probe here stalls every call.
    cheap_probe: ClassVar[bool] = False

    def __init__(self, config: Any, context: BackendContext) -> None:
        self.config = config
        self.context = context

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """Check the storage is usable; raise to refuse to serve a broken backend."""

    def stop(self) -> None:
        """Release resources at shutdown."""

    def probe(self) -> bool:
        """Readiness for the Probe RPC."""
        return True

    def inventory(self) -> Inventory | None:
        """Every volume and snapshot id the backend holds, for the start-up
        reconciliation with the store; None when the backend cannot list them."""
        return None

    def describe(self) -> Mapping[str, str]:
        """Facts about the backend shown at start-up and by `csi-kit backends`."""
        return {}

    def protected_paths(self) -> Sequence[str]:
        """Directories a caller path (target, staging, volume path) must never
        be inside: where this backend keeps its storage, e.g. its root.

        csi_kit refuses a node request whose path is one of these directories
        or lies below one, before any node method is called (the driver's
        state directory is always protected).  Absolute paths; the default
        protects nothing beyond the state directory.
        """
        return ()

    # -- sizes --------------------------------------------------------------

    def maximum_volume_size(self, available_bytes: int) -> int | None:
        """The largest ``required_bytes`` a CreateVolume would accept now, for
        GetCapacity; None when there is no such limit (the spec then leaves the
        field unset).  The default suits backends that refuse what they cannot
        hold: the smaller of the static maximum and the space available."""
        return min(type(self).max_volume_bytes, available_bytes)

    def round_capacity(self, capacity_bytes: int) -> int:
        """Round a size up to what the storage allocates (e.g. LVM extents)."""
        return capacity_bytes

    # -- controller: volumes (CREATE_DELETE_VOLUME) --------------------------

    def create_volume(self, volume_id: str, request: VolumeRequest) -> CreatedVolume:
        """Make an empty volume.  Required."""
        raise Unimplemented("this backend cannot create volumes")

    def delete_volume(self, volume_id: str) -> None:
        """Remove a volume and everything the backend holds for it.

        Must succeed when the volume is already gone (also used to clean up a
        volume whose creation a crash interrupted).
        """
        raise Unimplemented("this backend cannot delete volumes")

    def restore_snapshot(self, volume_id: str, request: VolumeRequest, snapshot: Snapshot) -> CreatedVolume:
        """Make a volume holding a snapshot's data (CREATE_DELETE_SNAPSHOT restore)."""
        raise Unimplemented("this backend cannot create a volume from a snapshot")

    def clone_volume(self, volume_id: str, request: VolumeRequest, source: Volume) -> CreatedVolume:
        """Make a volume holding a copy of another volume (CLONE_VOLUME)."""
        raise Unimplemented("this backend cannot clone volumes")

    def expand_volume(self, volume: Volume, capacity_bytes: int) -> ExpandResult:
        """Grow a volume (EXPAND_VOLUME); say whether the node must grow it too."""
        raise Unimplemented("this backend cannot expand volumes")

    def get_capacity(self, parameters: Mapping[str, str], capabilities: Sequence[VolumeCapability]) -> int:
        """Bytes available for new volumes with these parameters (GET_CAPACITY)."""
        raise Unimplemented("this backend does not report capacity")

    def volume_condition(self, volume: Volume) -> VolumeCondition:
        """Health of a volume (VOLUME_CONDITION on ControllerGetVolume / node stats)."""
        raise Unimplemented("this backend does not report volume condition")

    def modify_volume(self, volume: Volume, mutable_parameters: Mapping[str, str]) -> None:
        """Apply mutable parameters (MODIFY_VOLUME)."""
        raise Unimplemented("this backend cannot modify volumes")

    # -- controller: snapshots (CREATE_DELETE_SNAPSHOT) ----------------------

    def create_snapshot(
        self, snapshot_id: str, source: Volume, parameters: Mapping[str, str]
    ) -> CreatedSnapshot:
        """Take a snapshot of a volume."""
        raise Unimplemented("this backend cannot take snapshots")

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Remove a snapshot; must succeed when it is already gone."""
        raise Unimplemented("this backend cannot delete snapshots")

    def create_group_snapshot(
        self, group_id: str, members: Sequence[tuple[str, Volume]], parameters: Mapping[str, str]
    ) -> list[CreatedSnapshot]:
        """Snapshot several volumes together (GroupController).

        ``members`` pairs each new snapshot id with its source volume; return
        one result per member, in order.  Each member must be usable alone.
        """
        raise Unimplemented("this backend cannot take group snapshots")

    # -- snapshot metadata (the SnapshotMetadata service) --------------------

    def snapshot_allocated(self, snapshot: Snapshot, starting_offset: int) -> BlockMetadata:
        """The ranges of a snapshot that hold data (GetMetadataAllocated).

        Overriding this *and* `snapshot_delta` makes the driver serve the
        SnapshotMetadata service and advertise SNAPSHOT_METADATA_SERVICE.

        csi_kit guarantees: ``snapshot`` is a ready snapshot from the store
        (its id passed the id check); ``0 <= starting_offset <=
        snapshot.size_bytes``; the snapshot's key is held shared for the
        whole stream, so it cannot be deleted under the answer.  The
        returned `BlockMetadata.ranges` is consumed lazily from a worker
        thread and closed when the stream ends or the client cancels.

        The ranges must be in ascending order, not overlapping, of positive
        length, inside ``capacity_bytes``, all one length if the type is
        FIXED_LENGTH; a range may begin before ``starting_offset`` (csi_kit
        drops ranges that end at or before it), and an answer that breaks
        these rules ends the stream with INTERNAL.  A range need not be
        exact: naming a few blocks that hold zeros is allowed, missing a
        block that holds data is not.

        Errors: `NotFound` when the backend's copy of the snapshot is gone,
        anything else as for other methods.
        """
        raise Unimplemented("this backend does not serve snapshot metadata")

    def snapshot_delta(self, base: Snapshot, target: Snapshot, starting_offset: int) -> BlockMetadata:
        """The ranges that differ between two snapshots of one volume (GetMetadataDelta).

        Guarantees as for `snapshot_allocated`, and both snapshots are of the
        same source volume (``starting_offset`` is checked against the
        target's size).  Every byte whose content differs between ``base``
        and ``target`` must lie in a range; a range may also cover unchanged
        bytes (block granularity).

        Errors: `FailedPrecondition` when changes cannot be tracked between
        this pair (the spec's "changed block tracking is not enabled": the
        caller falls back to a full backup).
        """
        raise Unimplemented("this backend does not serve snapshot metadata")

    # -- controller publish (PUBLISH_UNPUBLISH_VOLUME) ------------------------

    def controller_publish(
        self, volume: Volume, node_id: str, capability: VolumeCapability, readonly: bool
    ) -> Mapping[str, str]:
        """Make a volume reachable from a node; return the publish context."""
        raise Unimplemented("this backend has no controller publish step")

    def controller_unpublish(self, volume_id: str, node_id: str) -> None:
        raise Unimplemented("this backend has no controller publish step")

    # -- node ---------------------------------------------------------------

    def node_topology(self) -> Topology | None:
        """This node's topology; node-local backends report their node key."""
        if self.node_local:
            return Topology({self.context.topology_key: self.context.node_id})
        return None

    def volume_exists(self, volume_id: str) -> bool:
        """Whether the node can see the volume's storage (NOT_FOUND checks)."""
        return True

    def node_stage(self, request: StageRequest) -> None:
        """Prepare a volume at a staging path (STAGE_UNSTAGE_VOLUME).

        ``request.staging_path`` is checked, resolved and exists (see the
        module docstring); the call may be a retry, so a volume already
        staged there is success.
        """
        raise Unimplemented("this backend has no stage step")

    def node_unstage(self, volume_id: str, staging_path: str) -> None:
        """Undo node_stage.  Called only for a path where this driver recorded
        a stage of this volume; must succeed when it is no longer mounted."""
        raise Unimplemented("this backend has no stage step")

    def node_publish(self, request: PublishRequest) -> None:
        """Make the volume appear at the target path.  Required on a node.

        ``request.target_path`` is checked, resolved and exists: a directory
        for mount access, a file for block access (see the module docstring).
        """
        raise Unimplemented("this backend cannot publish volumes")

    def node_unpublish(self, volume_id: str, target_path: str) -> None:
        """Undo node_publish.  Called only for a path where this driver
        recorded a publish of this volume; must succeed when the target is no
        longer mounted or already gone."""
        raise Unimplemented("this backend cannot unpublish volumes")

    def node_stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        """Usage of a published or staged volume (GET_VOLUME_STATS)."""
        raise Unimplemented("this backend does not report volume stats")

    def node_expand(
        self, volume_id: str, volume_path: str, capacity_bytes: int, capability: VolumeCapability | None
    ) -> int:
        """Grow the volume on the node, e.g. the filesystem (node EXPAND_VOLUME)."""
        raise Unimplemented("this backend has no node expansion step")


@attrs.frozen
class Capabilities:
    """What a backend can do, derived from the methods it overrides."""

    create_delete_volume: bool
    snapshots: bool
    restore: bool
    clone: bool
    expand: bool
    get_capacity: bool
    volume_condition: bool
    modify: bool
    group_snapshots: bool
    controller_publish: bool
    node_stage: bool
    node_stats: bool
    node_expand: bool
    node_publish: bool
    snapshot_metadata: bool


def _overrides(cls: type[Backend], *names: str) -> bool:
    return all(getattr(cls, n) is not getattr(Backend, n) for n in names)


def capabilities_of(backend: type[Backend] | Backend) -> Capabilities:
    """Derive the advertised capabilities from what the backend implements."""
    cls = backend if isinstance(backend, type) else type(backend)
    return Capabilities(
        create_delete_volume=_overrides(cls, "create_volume", "delete_volume"),
        snapshots=_overrides(cls, "create_snapshot", "delete_snapshot"),
        restore=_overrides(cls, "restore_snapshot"),
        clone=_overrides(cls, "clone_volume"),
        expand=_overrides(cls, "expand_volume"),
        get_capacity=_overrides(cls, "get_capacity"),
        volume_condition=_overrides(cls, "volume_condition"),
        modify=_overrides(cls, "modify_volume"),
        group_snapshots=_overrides(cls, "create_group_snapshot", "delete_snapshot"),
        controller_publish=_overrides(cls, "controller_publish", "controller_unpublish"),
        node_stage=_overrides(cls, "node_stage", "node_unstage"),
        node_stats=_overrides(cls, "node_stats"),
        node_expand=_overrides(cls, "node_expand"),
        node_publish=_overrides(cls, "node_publish", "node_unpublish"),
        snapshot_metadata=_overrides(cls, "snapshot_allocated", "snapshot_delta", "create_snapshot"),
    )
