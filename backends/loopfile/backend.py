"""The loopfile backend: each volume is an image file under a root, served
through a loop device, holding a real filesystem (ext4, xfs) or used raw.

* **Layout.**  ``ROOT/volumes/<id>.img`` and ``ROOT/snapshots/<id>.img``.
  Images are made or copied under ``ROOT/.incoming/`` and renamed into
  place, so a crash never leaves a half-written image under a real name;
  `start` empties ``.incoming``.  Deletes rename out of the way first.
* **Allocation.**  Images are sparse unless the StorageClass parameter
  ``allocation: preallocated`` asks for every block up front (fallocate),
  so a thick volume can never hit ENOSPC on the root later.  GetCapacity
  follows the same parameter: thin volumes are offered the root's free
  space, thick ones the free space minus what existing sparse volumes may
  still claim.
* **Modification** (ControllerModifyVolume, MODIFY_VOLUME): ``allocation``
  is also a mutable parameter (a VolumeAttributesClass, or CreateVolume's
  ``mutable_parameters``, which take precedence over ``parameters``).
  ``preallocated`` fallocates the whole image now -- unwritten extents,
  metadata only, data untouched, safe while the volume is in use -- after
  the same thick-space check as a new volume (RESOURCE_EXHAUSTED when the
  root cannot promise it); ``sparse`` changes only the policy for future
  growth: blocks already allocated stay (punching holes where the image
  reads as zeros would race with writes through an attached device; the
  filesystem's own discard -- ``fstrim`` in the pod -- gives space back
  through the loop device instead).  The policy in force is kept with the
  image, in its ``user.csi-kit.allocation`` xattr, and followed by
  expansion; the volume context keeps the allocation it was created with.
  Any other key, or another value, is INVALID_ARGUMENT.
* **Node side** is `csi_kit.block.BlockDeviceBackend`: attach, blkid, mkfs
  only on a blank device, fsck, mount; binds for publish.  Loop devices are
  attached with ioctls (`csi_kit.linux.loop`), found again from sysfs after a
  restart, and a device attached for a filesystem is autoclear: unmounting
  the staging path frees it even without the driver.
* **Snapshots, restores, clones** are reflinks (FICLONE) of the image where
  the root's filesystem has them (XFS reflink=1, btrfs): metadata only,
  independent of the data size.  Elsewhere an in-kernel sparse-aware copy.
  A staged volume is made consistent first: its filesystem is frozen
  (FIFREEZE) around the copy, a raw device is flushed (fsync).  Group
  snapshots freeze every member, copy them all, then thaw: consistent
  across the volumes of an application.
* **Expansion.**  The controller grows the image (and the loop device, if
  attached); the node grows the filesystem online.  Raw block volumes need
  no node step and say so.
* **Leaks.**  A volume still in use (mounted, bound, or block-staged) is
  never deleted; deleting it detaches its idle loop devices.  At start-up,
  loop devices whose image under the root is gone (or is in .incoming), and
  devices left attached but used by nothing (a stage a crash interrupted),
  are detached and reported (`describe()["detached-at-start"]`).
* **Snapshot metadata** (changed-block tracking, docs/snapshot-metadata.md).
  Allocated ranges of a snapshot image come from SEEK_DATA/SEEK_HOLE; the
  delta between two snapshots compares the images' physical extents
  (FIEMAP): reflinked images share every block neither wrote since, so only
  remapped ranges are reported, without reading data.  Images that share no
  extent (a root without reflinks) are compared block by block, reading only
  where either holds data.  Both answers are VARIABLE_LENGTH ranges aligned
  to the loop devices' 4 KiB block.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import attrs

from csi_kit.backend import BackendContext, GiB, MiB
from csi_kit.block import BlockDeviceBackend
from csi_kit.errors import (
    Aborted,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi_kit.linux import copy, extents, fs, loop
from csi_kit.types import (
    AccessType,
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

__all__ = ["LoopfileBackend", "LoopfileConfig"]


def _errno_name(err: int | None) -> str:
    return errno.errorcode.get(err, str(err)) if err is not None else "unknown error"


log = logging.getLogger("csi_kit.loopfile")

ALLOCATION_KEY = "allocation"
ALLOCATIONS = ("sparse", "preallocated")
CONTEXT_ALLOCATION = "csi-kit.io/allocation"
#: The allocation policy in force for an image (set at creation and by ControllerModifyVolume).
ALLOCATION_XATTR = "user.csi-kit.allocation"
#: Mutable parameters under this prefix are the CO's information (external-resizer's
#: --extra-modify-metadata), never settings: accepted and ignored.
CO_PREFIX = "csi.storage.k8s.io/"
SUFFIX = ".img"
#: Logical block size of every loop device: fixed, so the geometry a volume's
#: filesystem was made for never changes with the backing file's direct-I/O alignment.
BLOCK_SIZE = 4096


@attrs.frozen
class LoopfileConfig:
    """Options (``--backend-option key=value``)."""

    #: Directory holding the images; default ``STATE_DIR/loopfile``.
    root: str = ""
    #: Use reflinks for snapshots and clones when the filesystem has them (``auto``), never (``off``).
    reflink: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "off")))
    #: Ask the loop driver for direct I/O (``auto``: where the root's filesystem allows it) or not (``off``).
    direct_io: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "off")))


def _allocation(parameters: Mapping[str, str], mutable: Mapping[str, str] | None = None) -> str:
    """The allocation a request asks for: its mutable parameter if given (it takes
    precedence, as the spec says), else its parameter, else sparse."""
    field, chosen = "parameter", parameters
    if mutable and ALLOCATION_KEY in mutable:
        field, chosen = "mutable parameter", mutable
    value = chosen.get(ALLOCATION_KEY, "sparse")
    if value not in ALLOCATIONS:
        raise InvalidArgument(f"{field} {ALLOCATION_KEY}={value!r}: use one of {', '.join(ALLOCATIONS)}")
    return value


def _mutable_allocation(mutable_parameters: Mapping[str, str]) -> str | None:
    """The allocation a ControllerModifyVolume asks for (None: nothing to change); other keys are refused."""
    unknown = sorted(k for k in mutable_parameters if k != ALLOCATION_KEY and not k.startswith(CO_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"unsupported mutable_parameters {', '.join(unknown)}; this backend accepts: {ALLOCATION_KEY}"
        )
    if ALLOCATION_KEY not in mutable_parameters:
        return None
    return _allocation({}, mutable_parameters)


def _recorded_allocation(fd: int) -> str | None:
    try:
        value = os.getxattr(fd, ALLOCATION_XATTR).decode(errors="replace")
    except OSError:
        return None
    return value if value in ALLOCATIONS else None


def _record_allocation(fd: int, allocation: str, *, strict: bool) -> None:
    """Keep the policy with the image.  At creation a root without user xattrs only
    loses the record (the StorageClass parameter stands in); a modification must keep it."""
    try:
        os.setxattr(fd, ALLOCATION_XATTR, allocation.encode())
    except OSError as e:
        if strict:
            raise FailedPrecondition(
                f"cannot record the allocation policy on the image ({_errno_name(e.errno)}): "
                "the root's filesystem must support user xattrs to change it"
            ) from e
        log.debug("cannot record the allocation of an image: %s", e.strerror)


def _space_error(e: OSError, what: str) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: not enough space under the root ({_errno_name(e.errno)})")
    return Internal(f"{what}: {_errno_name(e.errno)} ({e.strerror})")


class LoopfileBackend(BlockDeviceBackend):
    """Image files on loop devices.

    StorageClass parameters: ``allocation`` (``sparse``, the default, or
    ``preallocated``).  Mutable parameters (VolumeAttributesClass,
    ControllerModifyVolume): ``allocation`` -- ``preallocated`` allocates the
    whole image now (RESOURCE_EXHAUSTED when the root cannot promise it),
    ``sparse`` makes future growth sparse and keeps the blocks already
    allocated.  Other keys are INVALID_ARGUMENT.
    """

    parameter_keys = frozenset({ALLOCATION_KEY})
    default_volume_bytes = GiB
    min_volume_bytes = MiB
    max_volume_bytes = 1 << 50
    cheap_probe = True  # probe: stat + access(2) of a local directory

    def __init__(self, config: LoopfileConfig | None, context: BackendContext) -> None:
        config = config or LoopfileConfig()
        super().__init__(config, context)
        self.root = os.path.realpath(config.root or os.path.join(context.state_dir, "loopfile"))
        self.volumes_dir = os.path.join(self.root, "volumes")
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        self.incoming_dir = os.path.join(self.root, ".incoming")
        self.reflink: bool | None = False if config.reflink == "off" else None
        self.direct_io = config.direct_io == "auto"
        self.detached_at_start: tuple[str, ...] = ()
        self.ordered_log = False  # set by start(): the root is XFS

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        for d in (self.root, self.volumes_dir, self.snapshots_dir, self.incoming_dir):
            os.makedirs(d, mode=0o700 if d == self.root else 0o755, exist_ok=True)
        self.detached_at_start = tuple(self._detach_strays())
        # Anything left in .incoming is a copy or delete a crash interrupted:
        # never acknowledged, never named — safe to remove.
        for name in os.listdir(self.incoming_dir):
            leftover = os.path.join(self.incoming_dir, name)
            log.warning("removing interrupted work %s", leftover)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        if self.reflink is None:
            self.reflink = copy.reflink_supported(self.root)
        self.ordered_log = fs.filesystem_of(self.root).fs_type == "xfs"
        log.info("loopfile root %s: copies by %s", self.root, "reflink" if self.reflink else "in-kernel copy")

    def _detach_strays(self) -> list[str]:
        """Detach loop devices serving images under the root that are gone or unfinished."""
        below = self.root + "/"
        incoming = self.incoming_dir + "/"
        found = []
        for device in loop.list_devices():
            backing = device.backing_file
            if not backing.startswith(below):
                continue
            if device.deleted or backing.startswith(incoming) or not os.path.exists(backing):
                gone = loop.detach(device)
                what = f"{device.path} ({backing}{' (deleted)' if device.deleted else ''})"
                log.warning(
                    "start-up: %s serves an image that is gone; %s",
                    what,
                    "detached" if gone else "it is in use and will detach when its last user closes it",
                )
                found.append(what)
            elif os.path.dirname(backing) == self.volumes_dir and backing.endswith(SUFFIX):
                # Attached for a stage that a crash interrupted before anything used it.
                volume_id = os.path.basename(backing)[: -len(SUFFIX)]
                if not device.autoclear and not self.device_users(volume_id, device.path):
                    loop.detach(device)
                    what = f"{device.path} ({backing}, idle)"
                    log.warning("start-up: %s was attached but used by nothing; detached", what)
                    found.append(what)
        return found

    def protected_paths(self) -> Sequence[str]:
        return (self.root,)

    def describe(self) -> Mapping[str, str]:
        facts = {
            "root": self.root,
            "copy": "reflink" if self.reflink else "copy_file_range",
            "direct-io": "auto" if self.direct_io else "off",
        }
        if self.detached_at_start:
            facts["detached-at-start"] = ", ".join(self.detached_at_start)
        return facts

    def probe(self) -> bool:
        return os.path.isdir(self.volumes_dir) and os.access(self.volumes_dir, os.W_OK)

    def inventory(self) -> Inventory:
        def ids(directory: str) -> frozenset[str]:
            return frozenset(n[: -len(SUFFIX)] for n in os.listdir(directory) if n.endswith(SUFFIX))

        return Inventory(ids(self.volumes_dir), ids(self.snapshots_dir))

    # -- paths ----------------------------------------------------------------------

    @staticmethod
    def _path(base: str, object_id: str) -> str:
        if (
            not object_id
            or "/" in object_id
            or "\x00" in object_id
            or object_id.startswith(".")
            or len(object_id) > 128
        ):
            raise InvalidArgument(f"{object_id!r} is not a valid id")
        return os.path.join(base, object_id + SUFFIX)

    def image_path(self, volume_id: str) -> str:
        return self._path(self.volumes_dir, volume_id)

    def snapshot_path(self, snapshot_id: str) -> str:
        return self._path(self.snapshots_dir, snapshot_id)

    def _incoming(self, kind: str, object_id: str) -> str:
        return self._path(self.incoming_dir, f"{kind}-{object_id}")

    # -- sizes ------------------------------------------------------------------------

    def round_capacity(self, capacity_bytes: int) -> int:
        # Loop devices count 512-byte sectors; whole MiB keep filesystems aligned too.
        return -(-capacity_bytes // MiB) * MiB

    # -- images -------------------------------------------------------------------------

    def _install(self, fd: int, staged: str, final: str, *, metadata_only: bool) -> None:
        """Give a finished image (open as `fd`) its real name, durably.

        One log force is enough on XFS when the image holds no data of its
        own (a reflink, holes, unwritten extents): XFS commits metadata to
        its log in order, so the force that makes the rename durable carries
        the clone and the size change made before it.  Anything else is
        flushed before the rename, so a name never points at lost data.
        """
        if not (metadata_only and self.ordered_log):
            os.fsync(fd)
        os.rename(staged, final)
        fs.fsync_dir(os.path.dirname(final))

    def _finish_image(
        self, staged: str, capacity_bytes: int, allocation: str, final: str, *, metadata_only: bool
    ) -> None:
        """Size a prepared image, allocate it if thick, and give it its name, durably."""
        try:
            fd = os.open(staged, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_size < capacity_bytes:
                    os.ftruncate(fd, capacity_bytes)
                if allocation == "preallocated":
                    os.posix_fallocate(fd, 0, capacity_bytes)  # unwritten extents: metadata only
                _record_allocation(fd, allocation, strict=False)
                self._install(fd, staged, final, metadata_only=metadata_only)
            finally:
                os.close(fd)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
            if isinstance(e, OSError):
                raise _space_error(e, f"preparing {final}") from e
            raise

    def _check_space(self, size: int, allocation: str) -> None:
        """Refuse a volume larger than GetCapacity offers for its allocation.

        That figure is also GetCapacity's maximum_volume_size.  Thin volumes
        may overcommit the root together, but not one by one: a sparse
        volume bigger than all the free space could never be filled.
        """
        available = self._available(allocation)
        if size > available:
            raise ResourceExhausted(
                f"{size} bytes requested; {available} bytes are available for {allocation} volumes "
                f"under {self.root}"
            )

    def _context(self, allocation: str) -> dict[str, str]:
        return {CONTEXT_ALLOCATION: allocation}

    def create_volume(self, volume_id: str, request: VolumeRequest) -> CreatedVolume:
        allocation = _allocation(request.parameters, request.mutable_parameters)
        size = self.size_for(request)
        self._check_space(size, allocation)
        staged = self._incoming("vol", volume_id)
        try:
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            os.unlink(staged)
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self._finish_image(staged, size, allocation, self.image_path(volume_id), metadata_only=True)
        return CreatedVolume(size, self._context(allocation))

    @contextlib.contextmanager
    def _quiesced(self, volume_id: str) -> Iterator[None]:
        """Hold the volume still for a copy: freeze its filesystem if mounted,
        flush its device if attached raw; nothing if it is not attached."""
        device = loop.device_for(self.image_path(volume_id))
        if device is None:
            yield
            return
        every = self.filesystem_mounts(device.path)
        mounted = [m for m in every if m.root == "/"] or every
        if mounted:
            with fs.frozen(mounted[0].mount_point):
                yield
            return
        if device.autoclear:
            # Attached for a filesystem that is not mounted yet: a stage (maybe mkfs) is running.
            raise Aborted(f"volume {volume_id!r} is being staged; retry the copy when it is done")
        fd = os.open(device.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # a raw volume's writes may still sit in the device's page cache
        finally:
            os.close(fd)
        yield

    def _copy_image(self, source: str, staged: str, what: str) -> str:
        if not os.path.isfile(source):
            raise NotFound(f"the image of {what} is missing: {source}")
        try:
            return copy.copy_file(source, staged, reflink=self.reflink)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
            raise

    def restore_snapshot(self, volume_id: str, request: VolumeRequest, snapshot: Snapshot) -> CreatedVolume:
        allocation = _allocation(request.parameters, request.mutable_parameters)
        size = max(self.size_for(request), snapshot.size_bytes)
        self._check_space(size, allocation)
        staged = self._incoming("vol", volume_id)
        method = self._copy_image(
            self.snapshot_path(snapshot.snapshot_id), staged, f"snapshot {snapshot.snapshot_id!r}"
        )
        self._finish_image(
            staged, size, allocation, self.image_path(volume_id), metadata_only=method == "reflink"
        )
        return CreatedVolume(size, self._context(allocation))

    def clone_volume(self, volume_id: str, request: VolumeRequest, source: Volume) -> CreatedVolume:
        allocation = _allocation(request.parameters, request.mutable_parameters)
        size = max(self.size_for(request), source.capacity_bytes)
        self._check_space(size, allocation)
        staged = self._incoming("vol", volume_id)
        with self._quiesced(source.volume_id):
            method = self._copy_image(
                self.image_path(source.volume_id), staged, f"volume {source.volume_id!r}"
            )
        self._finish_image(
            staged, size, allocation, self.image_path(volume_id), metadata_only=method == "reflink"
        )
        return CreatedVolume(size, self._context(allocation))

    def _discard(self, path: str, kind: str, object_id: str) -> None:
        """Remove an image so that it disappears at once: rename away, then unlink."""
        if not os.path.lexists(path):
            return
        doomed = self._incoming(f"del-{kind}", object_id)
        os.rename(path, doomed)
        os.unlink(doomed)

    def delete_volume(self, volume_id: str) -> None:
        image = self.image_path(volume_id)
        devices = loop.devices_of(image, include_deleted=True)
        for device in devices:
            users = self.device_users(volume_id, device.path)
            if users:
                raise FailedPrecondition(f"volume {volume_id!r} is still in use at {', '.join(users)}")
        for device in devices:
            if not loop.detach(device):
                raise FailedPrecondition(f"volume {volume_id!r}: {device.path} is held open by a process")
        self._discard(image, "volume", volume_id)

    def _open_image(self, volume_id: str) -> tuple[str, int]:
        """A volume's image path and a read-write descriptor on it (never through a
        symlink); NotFound when the image is gone."""
        image = self.image_path(volume_id)
        try:
            return image, os.open(image, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NotFound(f"volume {volume_id!r}: image {image} is missing") from None

    def expand_volume(self, volume: Volume, capacity_bytes: int) -> ExpandResult:
        image, fd = self._open_image(volume.volume_id)
        try:
            allocation = _recorded_allocation(fd) or _allocation(volume.parameters)
            current = os.fstat(fd).st_size
            if capacity_bytes > current:
                if allocation == "preallocated":
                    os.posix_fallocate(fd, current, capacity_bytes - current)
                os.ftruncate(fd, capacity_bytes)
                os.fsync(fd)
        except OSError as e:
            raise _space_error(e, f"growing {image}") from e
        finally:
            os.close(fd)
        device = loop.device_for(image)
        if device is not None:
            loop.set_capacity(device)  # node-local: the device is on this machine
        return ExpandResult(
            max(capacity_bytes, current), node_expansion_required=volume.access_type == "mount"
        )

    def get_capacity(self, parameters: Mapping[str, str], capabilities: Sequence[VolumeCapability]) -> int:
        return self._available(_allocation(parameters))

    def _available(self, allocation: str) -> int:
        free = fs.statvfs_usage(self.root).available_bytes
        if allocation == "sparse":
            return free
        # Thick accounting: space sparse volumes may still claim is not free to promise.
        return max(0, free - self._claimable())

    def _claimable(self) -> int:
        """Bytes the images under the root may still claim: their holes."""
        claimable = 0
        for name in os.listdir(self.volumes_dir):
            try:
                st = os.stat(os.path.join(self.volumes_dir, name))
            except FileNotFoundError:
                continue
            claimable += max(0, st.st_size - st.st_blocks * 512)
        return claimable

    def modify_volume(self, volume: Volume, mutable_parameters: Mapping[str, str]) -> None:
        """``allocation``: ``preallocated`` fallocates the image now, ``sparse`` changes
        the policy for future growth only (see the module docstring)."""
        allocation = _mutable_allocation(mutable_parameters)
        if allocation is None:
            return
        image, fd = self._open_image(volume.volume_id)
        try:
            if allocation == "preallocated":
                self._thicken(fd, image)
            _record_allocation(fd, allocation, strict=True)
        finally:
            os.close(fd)

    def _thicken(self, fd: int, image: str) -> None:
        """Allocate every block of an image (idempotent: allocated blocks stay as they are).

        The same promise as a new thick volume: the image's holes must fit in
        the free space that other sparse images may not still claim.
        """
        st = os.fstat(fd)
        missing = max(0, st.st_size - st.st_blocks * 512)
        if missing:
            free = fs.statvfs_usage(self.root).available_bytes
            promised = free - (self._claimable() - missing)
            if missing > promised:
                raise ResourceExhausted(
                    f"preallocating {image} needs {missing} more bytes; {max(0, promised)} bytes "
                    f"under {self.root} are not already claimable by sparse volumes"
                )
        try:
            os.posix_fallocate(fd, 0, st.st_size)  # unwritten extents over the holes: data untouched
            os.fsync(fd)
        except OSError as e:
            raise _space_error(e, f"preallocating {image}") from e

    def volume_condition(self, volume: Volume) -> VolumeCondition:
        return self.device_condition(volume.volume_id) or VolumeCondition(False, "")

    # -- snapshots ---------------------------------------------------------------------------

    def _publish_snapshot(self, staged: str, snapshot_id: str, method: str) -> None:
        """Give a copied image its snapshot name, durably (durable when acknowledged)."""
        try:
            fd = os.open(staged, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                self._install(fd, staged, self.snapshot_path(snapshot_id), metadata_only=method == "reflink")
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
            raise

    def create_snapshot(
        self, snapshot_id: str, source: Volume, parameters: Mapping[str, str]
    ) -> CreatedSnapshot:
        staged = self._incoming("snap", snapshot_id)
        with self._quiesced(source.volume_id):
            method = self._copy_image(
                self.image_path(source.volume_id), staged, f"volume {source.volume_id!r}"
            )
        self._publish_snapshot(staged, snapshot_id, method)
        return CreatedSnapshot(size_bytes=source.capacity_bytes, ready_to_use=True)

    def create_group_snapshot(
        self, group_id: str, members: Sequence[tuple[str, Volume]], parameters: Mapping[str, str]
    ) -> list[CreatedSnapshot]:
        # Crash-consistent across the group: every member is frozen (or
        # flushed) first, all images are copied, then all are thawed.  With
        # reflinks the whole group is frozen for milliseconds.  Freezes are
        # taken in volume-id order, so two groups sharing members never wait
        # on each other in a circle.
        staged = [(snapshot_id, self._incoming("snap", snapshot_id)) for snapshot_id, _ in members]
        try:
            with contextlib.ExitStack() as frozen:
                for _, volume in sorted(members, key=lambda m: m[1].volume_id):
                    frozen.enter_context(self._quiesced(volume.volume_id))
                methods = [
                    self._copy_image(self.image_path(volume.volume_id), path, f"volume {volume.volume_id!r}")
                    for (_, volume), (_, path) in zip(members, staged, strict=True)
                ]
            done: list[str] = []
            try:
                for (snapshot_id, path), method in zip(staged, methods, strict=True):
                    self._publish_snapshot(path, snapshot_id, method)
                    done.append(snapshot_id)
            except BaseException:
                for snapshot_id in done:
                    self.delete_snapshot(snapshot_id)
                raise
        finally:
            for _, path in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return [CreatedSnapshot(size_bytes=volume.capacity_bytes, ready_to_use=True) for _, volume in members]

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._discard(self.snapshot_path(snapshot_id), "snapshot", snapshot_id)

    # -- snapshot metadata -------------------------------------------------------------------------

    def _snapshot_image(self, snapshot: Snapshot) -> str:
        path = self.snapshot_path(snapshot.snapshot_id)
        if not os.path.isfile(path):
            raise NotFound(f"the image of snapshot {snapshot.snapshot_id!r} is missing: {path}")
        return path

    @staticmethod
    def _ranges(
        paths: Sequence[str], find: Callable[[list[int]], Iterator[tuple[int, int]]]
    ) -> Iterator[BlockRange]:
        """``find``'s ranges over the images opened read-only.  A generator: the
        images are opened on the first pull, inside the ``try`` that closes
        them (a generator closed before it starts runs no ``finally``)."""
        fds: list[int] = []
        try:
            for path in paths:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW))
            for offset, length in find(fds):
                yield BlockRange(offset, length)
        finally:
            for fd in fds:
                os.close(fd)

    def snapshot_allocated(self, snapshot: Snapshot, starting_offset: int) -> BlockMetadata:
        size = snapshot.size_bytes

        def find(fds: list[int]) -> Iterator[tuple[int, int]]:
            return extents.align_ranges(extents.data_ranges(fds[0], starting_offset, size), BLOCK_SIZE, size)

        ranges = self._ranges([self._snapshot_image(snapshot)], find)
        return BlockMetadata(BlockMetadataType.VARIABLE_LENGTH, size, ranges)

    def snapshot_delta(self, base: Snapshot, target: Snapshot, starting_offset: int) -> BlockMetadata:
        size = target.size_bytes
        # Without reflinks no two images share an extent: skip the probe, compare content.
        by_content = True if self.reflink is False else None

        def find(fds: list[int]) -> Iterator[tuple[int, int]]:
            return extents.changed_ranges(
                fds[0], fds[1], starting_offset, size, BLOCK_SIZE, by_content=by_content
            )

        ranges = self._ranges([self._snapshot_image(base), self._snapshot_image(target)], find)
        return BlockMetadata(BlockMetadataType.VARIABLE_LENGTH, size, ranges)

    # -- node hooks (csi_kit.block) --------------------------------------------------------------

    def volume_exists(self, volume_id: str) -> bool:
        # An image unlinked while attached still serves its data: the volume is
        # there (and reported abnormal), so stats and clean-up keep working.
        image = self.image_path(volume_id)
        return os.path.isfile(image) or loop.device_for(image, include_deleted=True) is not None

    def device_of(self, volume_id: str) -> str | None:
        # Volume ids are never reused, so a device whose image was unlinked is still this volume's.
        device = loop.device_for(self.image_path(volume_id), include_deleted=True)
        return device.path if device is not None else None

    def attach(self, volume_id: str) -> str:
        image = self.image_path(volume_id)
        device = loop.device_for(image)
        if device is not None:
            return device.path
        with loop.attach(image, direct_io=self.direct_io, block_size=BLOCK_SIZE) as handle:
            return handle.path

    @contextlib.contextmanager
    def attached(self, volume_id: str, access_type: AccessType) -> Iterator[str]:
        image = self.image_path(volume_id)
        if not os.path.isfile(image):
            raise NotFound(f"volume {volume_id!r}: image {image} is missing")
        if access_type == "block":
            yield self.attach(volume_id)
            return
        device = loop.device_for(image)
        if device is not None:
            yield device.path
            return
        # For a filesystem: autoclear, held by us until the mount holds it.
        with loop.attach(image, autoclear=True, direct_io=self.direct_io, block_size=BLOCK_SIZE) as handle:
            yield handle.path

    def detach(self, volume_id: str) -> None:
        for device in loop.devices_of(self.image_path(volume_id), include_deleted=True):
            loop.detach(device)

    def is_prezeroed(self, volume_id: str) -> bool:
        return True  # images are made as holes or unwritten extents: they read as zeros

    def refresh_capacity(self, volume_id: str, device: str) -> None:
        found = loop.device_for(self.image_path(volume_id), include_deleted=True)
        if found is None or found.path != device:
            raise FailedPrecondition(f"volume {volume_id!r} is not attached at {device}")
        loop.set_capacity(found)

    def device_condition(self, volume_id: str) -> VolumeCondition | None:
        image = self.image_path(volume_id)
        if not os.path.isfile(image):
            return VolumeCondition(True, f"image file {image} is missing")
        return None
