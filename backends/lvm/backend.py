"""The lvm backend: each volume is a logical volume in one volume group on the
node — a thin LV in a thin pool by default, a linear (thick) LV on request.

* **Configuration** (``--backend-option``): ``volume_group`` and
  ``thin_pool`` (both must exist: `start` refuses to serve otherwise),
  ``extra_pools`` (a comma list of further thin pools a StorageClass may pick
  with ``pool: NAME``), ``overprovision_ratio`` and ``nearly_full_percent``.
* **Parameters.**  ``type: thin`` (default) or ``type: linear``; ``pool``
  chooses among the configured thin pools.
* **Names and ownership.**  A volume id maps to the LV ``csi-v-<escaped id>``,
  a snapshot id to ``csi-s-<escaped id>`` (`csi_kit.linux.lvm.lv_name_for`,
  reversible).  Every LV this backend makes carries the tag
  ``csi-kit.volume`` or ``csi-kit.snapshot``; `inventory` lists only tagged
  LVs, so reconciliation finds orphans and nothing untagged is ever touched.
* **Snapshots** are thin snapshots (metadata only, O(1) whatever the data),
  kept inactive with LVM's activation-skip flag so they hold no device.
  Restore and clone are thin snapshots of the snapshot / source volume,
  activated with the skip flag cleared: no copy either.  A staged volume is
  flushed, then lvcreate's own suspend freezes its filesystem for the
  instant of the snapshot (see `_flush`).  Linear
  volumes have no O(1) snapshots: snapshotting or cloning one is
  FAILED_PRECONDITION, restoring into ``type: linear`` INVALID_ARGUMENT.
* **Capacity.**  Thin: the pool's free data space times ``overprovision_ratio``
  (a single thin volume may not exceed that either); linear: the VG's free
  space.  CreateVolume beyond it is RESOURCE_EXHAUSTED before any lvm call;
  a failed lvcreate leaves nothing behind.  A pool above
  ``nearly_full_percent`` (data or metadata) is reported in every thin
  volume's condition.
* **Node side** is `csi_kit.block.BlockDeviceBackend` with the LV's
  device-mapper node as the device.  LVs stay active between uses, as LVM
  itself leaves them: `attach` activates an inactive LV (with the
  activation-skip override), `detach` has nothing to undo.
* **Snapshot metadata** (changed-block tracking, docs/snapshot-metadata.md):
  a thin snapshot's allocated ranges are its mappings in the pool's
  metadata (``thin_dump``), the delta between two thin snapshots the
  blocks whose mappings differ (``thin_delta``), both read from a metadata
  snapshot of the live pool.  VARIABLE_LENGTH ranges in units of the pool's
  chunk size (64 KiB by default).  Snapshots in different pools have no
  common metadata: FAILED_PRECONDITION.
* **Expansion**: ``lvextend`` on the controller; the node grows the
  filesystem online; raw block volumes need no node step.
* **Modification** (ControllerModifyVolume, MODIFY_VOLUME): one mutable
  parameter, ``readahead`` -- ``auto`` (LVM's default), ``none``, or a
  number of 512-byte sectors, a multiple of 8 (LVM would round anything
  else to whole 4 KiB pages, and a value that changes on the way is not
  idempotent) from 8 to 2097152 (1 GiB).  ``lvchange --readahead`` keeps it
  in the VG metadata and applies it to an active LV at once, in use or not.
  Zeroing of new blocks is not offered: LVM has it per thin *pool*
  (``lvchange --zero`` refuses a thin LV), so it would change every volume
  of the pool.  Other keys are INVALID_ARGUMENT.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import attrs

from csi_kit.backend import BackendContext, GiB, MiB
from csi_kit.block import BlockDeviceBackend
from csi_kit.errors import (
    CommandFailed,
    CSIError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi_kit.linux import lvm
from csi_kit.types import (
    BlockMetadata,
    BlockMetadataType,
    BlockRange,
    CreatedSnapshot,
    CreatedVolume,
    ExpandResult,
    Inventory,
    Snapshot,
    Volume,
    VolumeCapability,
    VolumeCondition,
    VolumeRequest,
)

__all__ = ["LvmBackend", "LvmConfig", "BACKEND", "CONFIG"]

log = logging.getLogger("csi_kit.lvm")

TYPE_KEY = "type"
READ_AHEAD_KEY = "readahead"
#: Read-ahead bounds in 512-byte sectors: one 4 KiB page to 1 GiB, whole pages only.
READ_AHEAD_SECTORS = (8, 1 << 21)
#: Mutable parameters under this prefix are the CO's information, never settings: ignored.
CO_PREFIX = "csi.storage.k8s.io/"
POOL_KEY = "pool"
TYPES = ("thin", "linear")
VOLUME_PREFIX = "csi-v-"
SNAPSHOT_PREFIX = "csi-s-"
VOLUME_TAG = f"{lvm.TAG_PREFIX}volume"
SNAPSHOT_TAG = f"{lvm.TAG_PREFIX}snapshot"
CONTEXT_TYPE = "csi-kit.io/lvm-type"
CONTEXT_POOL = "csi-kit.io/lvm-pool"


def _positive_ratio(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _percent(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 < value <= 100:
        raise ValueError(f"{attribute.name} must be in (0, 100], got {value}")


@attrs.frozen
class LvmConfig:
    """Options (``--backend-option key=value``)."""

    #: The volume group holding every volume (required).
    volume_group: str = ""
    #: The default thin pool in it (required).
    thin_pool: str = ""
    #: Further thin pools, comma separated, that the ``pool`` parameter may choose.
    extra_pools: str = ""
    #: Thin volumes may promise this multiple of a pool's free data space.
    overprovision_ratio: float = attrs.field(default=1.0, validator=_positive_ratio)
    #: A pool filled beyond this (data or metadata) marks its volumes' condition abnormal.
    nearly_full_percent: float = attrs.field(default=90.0, validator=_percent)

    @property
    def pools(self) -> tuple[str, ...]:
        extra = [p.strip() for p in self.extra_pools.split(",") if p.strip()]
        return tuple(dict.fromkeys([self.thin_pool, *extra]))


@attrs.frozen
class _Placement:
    """Where a volume goes: ``thin`` in `pool`, or ``linear`` (pool empty)."""

    kind: str
    pool: str


def _read_ahead(mutable_parameters: Mapping[str, str]) -> str | None:
    """The read-ahead a ControllerModifyVolume asks for (None: nothing to change); other keys are refused."""
    unknown = sorted(k for k in mutable_parameters if k != READ_AHEAD_KEY and not k.startswith(CO_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"unsupported mutable_parameters {', '.join(unknown)}; this backend accepts: {READ_AHEAD_KEY}"
        )
    value = mutable_parameters.get(READ_AHEAD_KEY)
    if value is None or value in ("auto", "none"):
        return value
    low, high = READ_AHEAD_SECTORS
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high or int(value) % 8:
        raise InvalidArgument(
            f"mutable parameter {READ_AHEAD_KEY}={value!r}: use auto, none, or a number of 512-byte "
            f"sectors from {low} to {high} that is a multiple of 8"
        )
    return str(int(value))


class LvmBackend(BlockDeviceBackend):
    """Logical volumes in one volume group: thin (default) or linear.

    StorageClass parameters: ``type`` (``thin``, ``linear``) and ``pool``.
    Mutable parameters (VolumeAttributesClass, ControllerModifyVolume):
    ``readahead`` -- ``auto``, ``none`` or 512-byte sectors (a multiple of 8,
    8 to 2097152), applied at once.  Other keys are INVALID_ARGUMENT.
    """

    parameter_keys = frozenset({TYPE_KEY, POOL_KEY})
    default_volume_bytes = GiB
    min_volume_bytes = MiB
    max_volume_bytes = 1 << 50

    def __init__(self, config: LvmConfig | None, context: BackendContext) -> None:
        config = config or LvmConfig()
        super().__init__(config, context)
        self.vg = config.volume_group
        self.pools = config.pools
        self.ratio = config.overprovision_ratio
        self.nearly_full = config.nearly_full_percent
        self.extent_size = 4 * MiB

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        """Refuse to start without the volume group and every configured pool."""
        if not self.vg or not self.config.thin_pool:
            raise InvalidArgument("the lvm backend needs volume_group=VG and thin_pool=POOL options")
        lvm.validate_vg_name(self.vg)
        try:
            info = lvm.vg_info(self.vg)
        except CommandFailed as e:
            raise FailedPrecondition(f"cannot read LVM volume groups: {e.message}") from e
        self.extent_size = info.extent_size
        report = lvm.report(self.vg)
        for pool in self.pools:
            try:
                report.pool(pool)
            except NotFound:
                raise FailedPrecondition(
                    f"thin pool {self.vg}/{pool} does not exist; create it (lvcreate --type thin-pool) "
                    "or fix the thin_pool/extra_pools options"
                ) from None
        log.info("lvm: volume group %s, thin pools %s", self.vg, ", ".join(self.pools))

    def describe(self) -> Mapping[str, str]:
        return {
            "volume-group": self.vg,
            "thin-pools": ", ".join(self.pools),
            "overprovision-ratio": str(self.ratio),
        }

    def probe(self) -> bool:
        try:
            lvm.vg_info(self.vg)
        except CSIError:
            return False
        return True

    def inventory(self) -> Inventory:
        volumes: set[str] = set()
        snapshots: set[str] = set()
        for lv in lvm.list_lvs(self.vg):
            if VOLUME_TAG in lv.tags:
                found = lvm.csi_id_from_lv_name(lv.name, VOLUME_PREFIX)
                if found is not None:
                    volumes.add(found)
            elif SNAPSHOT_TAG in lv.tags:
                found = lvm.csi_id_from_lv_name(lv.name, SNAPSHOT_PREFIX)
                if found is not None:
                    snapshots.add(found)
        return Inventory(frozenset(volumes), frozenset(snapshots))

    # -- names ---------------------------------------------------------------------

    def volume_lv(self, volume_id: str) -> str:
        return lvm.lv_name_for(volume_id, VOLUME_PREFIX, self.vg)

    def snapshot_lv(self, snapshot_id: str) -> str:
        return lvm.lv_name_for(snapshot_id, SNAPSHOT_PREFIX, self.vg)

    def _owned(self, name: str, tag: str, report: lvm.VgReport | None = None) -> lvm.LogicalVolume | None:
        """The LV if it exists and carries our tag; an untagged LV of that name is not ours."""
        lv = (report or lvm.report(self.vg)).lv(name)
        if lv is None:
            return None
        if tag not in lv.tags:
            raise FailedPrecondition(
                f"{self.vg}/{name} exists but was not made by csi_kit (no {tag} tag); refusing to touch it"
            )
        return lv

    # -- placement and sizes ----------------------------------------------------------

    def _placement(self, parameters: Mapping[str, str]) -> _Placement:
        kind = parameters.get(TYPE_KEY, "thin")
        if kind not in TYPES:
            raise InvalidArgument(f"parameter {TYPE_KEY}={kind!r}: use one of {', '.join(TYPES)}")
        pool = parameters.get(POOL_KEY, "")
        if kind == "linear":
            if pool:
                raise InvalidArgument(
                    f"parameter {POOL_KEY} applies to thin volumes only, not {TYPE_KEY}=linear"
                )
            return _Placement("linear", "")
        pool = pool or self.pools[0]
        if pool not in self.pools:
            raise InvalidArgument(
                f"parameter {POOL_KEY}={pool!r} is not a configured thin pool ({', '.join(self.pools)})"
            )
        return _Placement("thin", pool)

    def round_capacity(self, capacity_bytes: int) -> int:
        return -(-capacity_bytes // self.extent_size) * self.extent_size

    def _size_for(self, request: VolumeRequest) -> int:
        """`size_for` in whole extents."""
        return self.round_capacity(self.size_for(request))

    def _available(self, placement: _Placement, report: lvm.VgReport | None = None) -> int:
        if placement.kind == "linear":
            return lvm.vg_info(self.vg).free
        pool = (report or lvm.report(self.vg)).pool(placement.pool)
        return int(max(0, pool.size - pool.used_bytes) * self.ratio)

    def _check_space(self, size: int, placement: _Placement, report: lvm.VgReport | None = None) -> None:
        available = self._available(placement, report)
        if size > available:
            where = (
                f"volume group {self.vg} has {available} bytes free"
                if placement.kind == "linear"
                else f"thin pool {self.vg}/{placement.pool} offers {available} bytes "
                f"(free data space times overprovision ratio {self.ratio})"
            )
            raise ResourceExhausted(f"{size} bytes requested for a {placement.kind} volume; {where}")

    def get_capacity(self, parameters: Mapping[str, str], capabilities: Sequence[VolumeCapability]) -> int:
        return self._available(self._placement(parameters))

    # -- volumes ------------------------------------------------------------------------

    def _context(self, placement: _Placement) -> dict[str, str]:
        context = {CONTEXT_TYPE: placement.kind}
        if placement.pool:
            context[CONTEXT_POOL] = placement.pool
        return context

    @contextlib.contextmanager
    def _making(self, name: str, tag: str) -> Iterator[None]:
        """Remove what a failed creation left under `name` (only if it carries our tag)."""
        try:
            yield
        except BaseException:
            try:
                left = lvm.get_lv(self.vg, name)
                if left is not None and tag in left.tags:
                    lvm.remove_lv(self.vg, name)
            except Exception:
                log.exception("removing the half-made %s/%s failed", self.vg, name)
            raise

    def _fresh(self, name: str, tag: str, report: lvm.VgReport) -> None:
        """Clear the way for a new LV: a tagged leftover of ours (an interrupted try) goes."""
        if self._owned(name, tag, report) is not None:
            lvm.remove_lv(self.vg, name, seen=True)

    def create_volume(self, volume_id: str, request: VolumeRequest) -> CreatedVolume:
        placement = self._placement(request.parameters)
        size = self._size_for(request)
        report = lvm.report(self.vg)
        self._check_space(size, placement, report)
        name = self.volume_lv(volume_id)
        self._fresh(name, VOLUME_TAG, report)
        with self._making(name, VOLUME_TAG):
            if placement.kind == "linear":
                lv = lvm.create_linear_lv(self.vg, name, size, tags=[VOLUME_TAG])
            else:
                lv = lvm.create_thin_lv(self.vg, placement.pool, name, size, tags=[VOLUME_TAG])
        return CreatedVolume(lv.size, self._context(placement))

    def _thin_copy(
        self,
        volume_id: str,
        request: VolumeRequest,
        origin: str,
        origin_size: int,
        report: lvm.VgReport | None = None,
    ) -> CreatedVolume:
        """A new volume as a thin snapshot of `origin` (a snapshot or a volume), grown to the request."""
        placement = self._placement(request.parameters)
        if placement.kind == "linear":
            raise InvalidArgument(
                f"{TYPE_KEY}=linear cannot hold a restore or clone: those are thin snapshots (no copy); "
                f"use {TYPE_KEY}=thin"
            )
        report = report or lvm.report(self.vg)
        origin_lv = report.lv(origin)
        if origin_lv is None:
            raise NotFound(f"the logical volume {self.vg}/{origin} is missing")
        if origin_lv.pool != placement.pool and POOL_KEY in request.parameters:
            raise InvalidArgument(
                f"the source lives in thin pool {origin_lv.pool}; a thin snapshot cannot be placed in "
                f"{placement.pool}"
            )
        placement = _Placement("thin", origin_lv.pool or placement.pool)
        size = max(self._size_for(request), origin_size)
        self._check_space(size, placement, report)
        name = self.volume_lv(volume_id)
        self._fresh(name, VOLUME_TAG, report)
        with self._making(name, VOLUME_TAG):
            lvm.create_thin_snapshot(self.vg, origin, name, tags=[VOLUME_TAG], activate=True)
            made = origin_lv.size  # a thin snapshot has its origin's size
            if size > made:
                made = lvm.extend_lv(self.vg, name, size).size
        return CreatedVolume(made, self._context(placement))

    def restore_snapshot(self, volume_id: str, request: VolumeRequest, snapshot: Snapshot) -> CreatedVolume:
        origin = self.snapshot_lv(snapshot.snapshot_id)
        return self._thin_copy(volume_id, request, origin, snapshot.size_bytes)

    def clone_volume(self, volume_id: str, request: VolumeRequest, source: Volume) -> CreatedVolume:
        report = lvm.report(self.vg)
        origin = self._thin_source(source, "cloned", report)
        self._flush(source.volume_id)
        return self._thin_copy(volume_id, request, origin.name, origin.size, report)

    def _thin_source(self, volume: Volume, verb: str, report: lvm.VgReport) -> lvm.LogicalVolume:
        lv = self._owned(self.volume_lv(volume.volume_id), VOLUME_TAG, report)
        if lv is None:
            raise NotFound(f"volume {volume.volume_id!r}: its logical volume is missing")
        if not lv.is_thin:
            raise FailedPrecondition(
                f"volume {volume.volume_id!r} is a {lv.segtype} (thick) LV: only thin volumes can be {verb} "
                "without a full copy"
            )
        return lv

    def delete_volume(self, volume_id: str) -> None:
        name = self.volume_lv(volume_id)
        lv = self._owned(name, VOLUME_TAG)
        if lv is None:
            return
        users = self.device_users(volume_id, lv.device_path) if os.path.exists(lv.device_path) else []
        if users:
            raise FailedPrecondition(f"volume {volume_id!r} is still in use at {', '.join(users)}")
        lvm.remove_lv(self.vg, name, seen=True)

    def expand_volume(self, volume: Volume, capacity_bytes: int) -> ExpandResult:
        name = self.volume_lv(volume.volume_id)
        lv = self._owned(name, VOLUME_TAG)
        if lv is None:
            raise NotFound(f"volume {volume.volume_id!r}: its logical volume is missing")
        size = self.round_capacity(capacity_bytes)
        if size > lv.size:
            placement = _Placement("thin", lv.pool) if lv.is_thin and lv.pool else _Placement("linear", "")
            self._check_space(size - lv.size, placement)
            lv = lvm.extend_lv(self.vg, name, size, current=lv)
        return ExpandResult(lv.size, node_expansion_required=volume.access_type == "mount")

    def volume_condition(self, volume: Volume) -> VolumeCondition:
        return self.device_condition(volume.volume_id) or VolumeCondition(False, "")

    def modify_volume(self, volume: Volume, mutable_parameters: Mapping[str, str]) -> None:
        """``readahead`` (see the module docstring); validated before LVM is asked anything."""
        read_ahead = _read_ahead(mutable_parameters)
        if read_ahead is None:
            return
        name = self.volume_lv(volume.volume_id)
        if self._owned(name, VOLUME_TAG) is None:
            raise NotFound(f"volume {volume.volume_id!r}: its logical volume {self.vg}/{name} is missing")
        lvm.set_read_ahead(self.vg, name, read_ahead)

    # -- snapshots ---------------------------------------------------------------------------

    def _flush(self, volume_id: str) -> None:
        """Make a volume's data reach its LV before a thin snapshot of it is taken.

        No FIFREEZE here, unlike the loopfile backend: lvcreate suspends the
        origin with device-mapper's lockfs, which freezes the filesystem on it
        (freeze_bdev: sync, then block writers) for the instant of the
        snapshot, the consistency a freeze gives.  A filesystem frozen by us
        beforehand makes that suspend fail with EBUSY (measured in the VM:
        "Unable to suspend ... Device or resource busy").  A raw volume's
        page cache is flushed here as well, though the suspend syncs it too.
        """
        device = self.device_of(volume_id)
        if device is None or self.filesystem_mounts(device):
            return
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def create_snapshot(
        self, snapshot_id: str, source: Volume, parameters: Mapping[str, str]
    ) -> CreatedSnapshot:
        report = lvm.report(self.vg)
        origin = self._thin_source(source, "snapshotted", report)
        name = self.snapshot_lv(snapshot_id)
        self._fresh(name, SNAPSHOT_TAG, report)  # an interrupted try: never acknowledged
        self._flush(source.volume_id)
        with self._making(name, SNAPSHOT_TAG):
            lvm.create_thin_snapshot(self.vg, origin.name, name, tags=[SNAPSHOT_TAG], activate=False)
        return CreatedSnapshot(size_bytes=origin.size, ready_to_use=True)

    def delete_snapshot(self, snapshot_id: str) -> None:
        name = self.snapshot_lv(snapshot_id)
        if self._owned(name, SNAPSHOT_TAG) is not None:
            lvm.remove_lv(self.vg, name, seen=True)

    # -- snapshot metadata -------------------------------------------------------------------------

    def _thin_snapshot(self, snapshot: Snapshot) -> lvm.LogicalVolume:
        lv = self._owned(self.snapshot_lv(snapshot.snapshot_id), SNAPSHOT_TAG)
        if lv is None:
            raise NotFound(f"the LV of snapshot {snapshot.snapshot_id!r} is missing")
        if not lv.is_thin or not lv.pool:
            raise FailedPrecondition(f"snapshot {snapshot.snapshot_id!r} is not a thin LV")
        return lv

    @staticmethod
    def _byte_ranges(read: Callable[[], lvm.ThinRanges], size: int) -> Iterator[BlockRange]:
        """The pool's block ranges as byte ranges inside ``size``; the tool runs on the first pull."""
        found = read()
        for begin, length in found.ranges:
            offset = begin * found.block_bytes
            end = min((begin + length) * found.block_bytes, size)
            if end > offset:
                yield BlockRange(offset, end - offset)

    def snapshot_allocated(self, snapshot: Snapshot, starting_offset: int) -> BlockMetadata:
        lv = self._thin_snapshot(snapshot)
        pool = lv.pool or ""

        def read() -> lvm.ThinRanges:
            return lvm.thin_mappings(self.vg, pool, lvm.thin_id(self.vg, lv.name))

        size = snapshot.size_bytes
        return BlockMetadata(BlockMetadataType.VARIABLE_LENGTH, size, self._byte_ranges(read, size))

    def snapshot_delta(self, base: Snapshot, target: Snapshot, starting_offset: int) -> BlockMetadata:
        base_lv, target_lv = self._thin_snapshot(base), self._thin_snapshot(target)
        if base_lv.pool != target_lv.pool:
            raise FailedPrecondition(
                f"snapshots {base.snapshot_id!r} and {target.snapshot_id!r} are in different thin pools "
                f"({base_lv.pool}, {target_lv.pool}): no changed-block tracking between them"
            )
        pool = target_lv.pool or ""

        def read() -> lvm.ThinRanges:
            ids = lvm.thin_id(self.vg, base_lv.name), lvm.thin_id(self.vg, target_lv.name)
            return lvm.thin_delta(self.vg, pool, *ids)

        size = target.size_bytes
        return BlockMetadata(BlockMetadataType.VARIABLE_LENGTH, size, self._byte_ranges(read, size))

    # -- node hooks (csi_kit.block) --------------------------------------------------------------

    def _device_path(self, volume_id: str) -> str:
        return lvm.lv_device_path(self.vg, self.volume_lv(volume_id))

    def volume_exists(self, volume_id: str) -> bool:
        if os.path.exists(self._device_path(volume_id)):
            return True
        return lvm.get_lv(self.vg, self.volume_lv(volume_id)) is not None

    def device_of(self, volume_id: str) -> str | None:
        path = self._device_path(volume_id)
        return path if os.path.exists(path) else None

    def attach(self, volume_id: str) -> str:
        path = self._device_path(volume_id)
        if os.path.exists(path):
            return path
        name = self.volume_lv(volume_id)
        if self._owned(name, VOLUME_TAG) is None:
            raise NotFound(f"volume {volume_id!r}: its logical volume {self.vg}/{name} is missing")
        lvm.activate(self.vg, name)
        if not os.path.exists(path):
            raise FailedPrecondition(f"{self.vg}/{name} was activated but {path} did not appear")
        return path

    def is_prezeroed(self, volume_id: str) -> bool:
        """A thin LV reads as zeros (unprovisioned blocks); a linear one may hold an
        old filesystem's blocks (lvcreate zeroes only its start)."""
        lv = lvm.get_lv(self.vg, self.volume_lv(volume_id))
        return lv is not None and lv.is_thin

    def detach(self, volume_id: str) -> None:
        """Nothing: an LV stays active between uses, as LVM leaves it (see the module docstring)."""

    def device_condition(self, volume_id: str) -> VolumeCondition | None:
        report = lvm.report(self.vg)
        lv = report.lv(self.volume_lv(volume_id))
        if lv is None:
            return VolumeCondition(True, f"logical volume {self.vg}/{self.volume_lv(volume_id)} is missing")
        if not lv.active:
            return VolumeCondition(True, f"logical volume {self.vg}/{lv.name} is not active")
        if lv.is_thin and lv.pool:
            pool = report.pool(lv.pool)
            if pool.data_percent >= self.nearly_full or pool.metadata_percent >= self.nearly_full:
                return VolumeCondition(
                    True,
                    f"thin pool {self.vg}/{lv.pool} is nearly full (data {pool.data_percent:.1f}%, "
                    f"metadata {pool.metadata_percent:.1f}%): writes may fail; extend the pool",
                )
        return None


BACKEND = LvmBackend
CONFIG = LvmConfig
