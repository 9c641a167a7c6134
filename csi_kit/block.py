"""The node side of backends whose volumes are block devices.

`BlockDeviceBackend` implements NodeStage/Unstage/Publish/Unpublish,
NodeGetVolumeStats and NodeExpandVolume once, for any storage that turns a
volume id into a block device: loop devices over image files (the loopfile
backend), LVM logical volumes, iSCSI or NBD sessions...  A subclass says how
to find, attach and detach its device; everything a node does with a block
device is here:

=================  ==========================================================
NodeStage (mount)  attach → ``blkid -p`` → mkfs *only if the device is blank*
                   → e2fsck -p (ext4) → mount at the staging path with the
                   capability's mount flags; a filesystem smaller than its
                   device (a restore into a bigger volume, an expansion the
                   node never finished) is grown: ext4 before the mount,
                   XFS right after it
NodeStage (block)  attach, and mark the staging path with a tiny read-only
                   tmpfs whose source names the volume
                   (``csi-kit-block:<volume_id>``), so that "is it staged?"
                   is answered from mountinfo like for a filesystem
NodePublish        mount: bind the staged mount onto the target directory;
                   block: create the target file and bind the device node
                   onto it; read-only honoured with a read-only bind
NodeUnpublish      unmount everything at the target, remove the target
NodeUnstage        unmount everything at the staging path, then `detach`
NodeGetVolumeStats mount: statvfs (bytes and inodes); block: the device size
                   (BLKGETSIZE64); plus the volume condition
NodeExpandVolume   `refresh_capacity`, then resize2fs / xfs_growfs online;
                   a block volume needs nothing more than the refresh
=================  ==========================================================

**No state in memory.**  Every method works out what is there from
/proc/self/mountinfo and whatever the subclass's `device_of` reads (sysfs for
loop devices, /dev for LVM), so a driver restarted at any point — between
attach and mount, between unmount and detach — finishes or undoes the job
when the CO retries, and every method is idempotent.

**Subclass hooks** (see each method): `device_of`, `attach`, `detach`
(required); `attached`, `refresh_capacity`, `device_condition`,
`mount_options` and `is_prezeroed` (optional).  The controller side (create, delete,
snapshots...) stays the subclass's own business; `device_users` helps its
`delete_volume` refuse a volume still in use.

A note on read-only block publishes: the kernel ignores a read-only *mount*
flag when a device node is opened for writing, so a read-only bind of a
device node marks intent (and stops writes through the file's filesystem
path, e.g. truncation) but does not make the device read-only.  Backends
needing a hard guarantee should hand out a read-only device (e.g. a second,
read-only loop device) from `attach`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator

from csi_kit.backend import Backend
from csi_kit.errors import AlreadyExists, FailedPrecondition, Internal, NotFound, OutOfRange
from csi_kit.linux import blockfs, mounts
from csi_kit.types import (
    AccessMode,
    AccessType,
    PublishRequest,
    StageRequest,
    VolumeCapability,
    VolumeCondition,
    VolumeRequest,
    VolumeStats,
    VolumeUsage,
)

__all__ = ["BlockDeviceBackend", "BLOCK_STAGE_SOURCE"]


def _errno_name(err: int | None) -> str:
    return errno.errorcode.get(err, str(err)) if err is not None else "unknown error"


log = logging.getLogger("csi_kit.block")

#: Prefix of the source of the tmpfs that marks a staged raw block volume.
BLOCK_STAGE_SOURCE = "csi-kit-block:"

#: A device larger than its filesystem by at least this much gets the filesystem grown at stage.
_GROW_SLACK = blockfs.GROW_SLACK  # the same rule NodeExpandVolume's grow_filesystem applies


def _rdev(path: str) -> int | None:
    """st_rdev of a block device node, or None if `path` is not one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


class BlockDeviceBackend(Backend):
    """Base class for backends whose volumes are block devices on the node.

    Serves both access types: ``mount`` (ext4 or xfs, ext4 by default) and
    ``block``.  Override the hooks below; the node RPCs are done.
    """

    access_types = frozenset({"mount", "block"})
    fs_types = frozenset({"", *blockfs.FILESYSTEMS})
    default_fs_type = "ext4"
    access_modes = frozenset(
        {
            AccessMode.SINGLE_NODE_WRITER,
            AccessMode.SINGLE_NODE_READER_ONLY,
            AccessMode.SINGLE_NODE_SINGLE_WRITER,
            AccessMode.SINGLE_NODE_MULTI_WRITER,
        }
    )

    # -- hooks ------------------------------------------------------------------

    def device_of(self, volume_id: str) -> str | None:
        """The path of the volume's block device if it is attached now, else None.

        Must read the system (sysfs, /dev), never a cache: it is how a
        restarted driver finds its devices again.
        """
        raise NotImplementedError

    def attach(self, volume_id: str) -> str:
        """Make the volume's device exist on this node and return its path.

        Idempotent: return the device already attached if there is one.  The
        device must stay attached until `detach`, even with nobody holding it
        open (a staged raw block volume).
        """
        raise NotImplementedError

    def detach(self, volume_id: str) -> None:
        """Undo `attach`.  Called after everything on the device was unmounted;
        must succeed when the device is already gone."""
        raise NotImplementedError

    @contextlib.contextmanager
    def attached(self, volume_id: str, access_type: AccessType) -> Iterator[str]:
        """The device, attached for the duration of the stage step.

        The default is `attach`.  Override it when the device can be tied to
        what uses it: the loopfile backend attaches a device for a filesystem
        with autoclear and holds it open only until the mount holds it, so
        unmounting frees the device even without the driver.  A device
        attached here for ``block`` access must outlive the block.
        """
        yield self.attach(volume_id)

    def size_for(self, request: VolumeRequest) -> int:
        """The request's size, raised to what its filesystem needs (XFS: 300 MiB);
        OutOfRange when that is above limit_bytes.  For `create_volume` and friends."""
        size = request.capacity_bytes
        if request.access_type == "mount":
            fs_types = {c.fs_type or self.default_fs_type for c in request.capabilities}
            floor = max(blockfs.min_size(t) for t in fs_types) if fs_types else 0
            if size < floor:
                limit = request.capacity.limit_bytes
                if limit and floor > limit:
                    raise OutOfRange(
                        f"{', '.join(sorted(fs_types))} needs at least {floor} bytes; limit_bytes is {limit}"
                    )
                size = floor
        return size

    def is_prezeroed(self, volume_id: str) -> bool:
        """Whether every block of the volume reads as zeros until written (a new
        sparse file, a thin LV); then mkfs skips zeroing inode tables and journal
        (see blockfs.make_filesystem).  Asked only before a blank device is
        formatted.  Default: False (zeroing is safe, only slower)."""
        return False

    def refresh_capacity(self, volume_id: str, device: str) -> None:
        """Make the device show its new size after the controller grew the volume.

        Default: nothing (LVM and most network devices resize themselves).
        """

    def device_condition(self, volume_id: str) -> VolumeCondition | None:
        """A problem the backend sees with the volume's storage (e.g. a missing
        image file), reported by NodeGetVolumeStats; None if all is well."""
        return None

    def mount_options(self, fs_type: str) -> list[str]:
        """Options always used to mount `fs_type`, before the capability's mount flags.

        XFS gets ``nouuid``: a restored or cloned volume carries its source's
        UUID, and XFS refuses to mount a second filesystem with the same one.
        """
        return ["nouuid"] if fs_type == "xfs" else []

    # -- helpers ------------------------------------------------------------------

    def device_users(self, volume_id: str, device: str | None = None) -> list[str]:
        """Mount points using the volume now: filesystem mounts of its device,
        binds of its device node, and its block-stage marker.

        For a controller-side `delete_volume` to refuse a volume in use even
        when the store's records are gone.
        """
        device = device or self.device_of(volume_id)
        rdev = _rdev(device) if device else None
        name = os.path.basename(device) if device else None
        marker = BLOCK_STAGE_SOURCE + volume_id
        users = []
        for m in mounts.read_mountinfo():
            ours = m.source == marker
            if not ours and rdev is not None:
                # A filesystem on the device, or a bind of its node (stat only those binds).
                ours = os.makedev(m.major, m.minor) == rdev or (
                    os.path.basename(m.root) == name and _rdev(m.mount_point) == rdev
                )
            if ours:
                users.append(m.mount_point)
        return users

    def _fs_type(self, capability: VolumeCapability | None) -> str:
        return (capability.fs_type if capability else "") or self.default_fs_type

    def _device(self, volume_id: str) -> str:
        device = self.device_of(volume_id)
        if device is None:
            raise FailedPrecondition(f"volume {volume_id!r} has no device on this node; stage it first")
        return device

    # -- stage ---------------------------------------------------------------------

    def node_stage(self, request: StageRequest) -> None:
        if request.capability is not None and request.capability.is_block:
            self._stage_block(request.volume_id, request.staging_path)
        else:
            self._stage_mount(request)

    def _stage_block(self, volume_id: str, staging: str) -> None:
        marker = BLOCK_STAGE_SOURCE + volume_id
        here = mounts.mounts_at(staging)
        if here and here[-1].source == marker:
            if self.device_of(volume_id) is None:
                self.attach(volume_id)  # marker survived a lost device: attach again
            return
        if here:
            raise AlreadyExists(f"staging path {staging} already has something else mounted")
        if not os.path.isdir(staging):
            raise NotFound(f"staging path {staging} does not exist")
        with self.attached(volume_id, "block") as device:
            try:
                mounts.mount(marker, staging, "tmpfs", ["size=4k", "mode=0700"], readonly=True)
            except BaseException:
                self._undo_detach(volume_id)
                raise
        log.info("staged block volume %s (%s) at %s", volume_id, device, staging)

    def _stage_mount(self, request: StageRequest) -> None:
        volume_id, staging = request.volume_id, request.staging_path
        cap = request.capability
        wanted = cap.fs_type if cap else ""
        here = mounts.mounts_at(staging)
        if here:
            current = self.device_of(volume_id)
            top = here[-1]
            if current is not None and os.makedev(top.major, top.minor) == _rdev(current):
                return  # staged already (a retry, or a restart after the mount)
            raise AlreadyExists(f"staging path {staging} already has another filesystem mounted")
        if not os.path.isdir(staging):
            raise NotFound(f"staging path {staging} does not exist")
        flags = list(cap.mount.mount_flags) if cap and cap.mount else []
        with self.attached(volume_id, "mount") as device:
            try:
                fs_type, grow = self._prepare_filesystem(volume_id, device, wanted)
                if grow and blockfs.grow_unmounted(device, fs_type):
                    grow = False
                mounts.mount(device, staging, fs_type, [*self.mount_options(fs_type), *flags])
            except BaseException:
                self._undo_detach(volume_id)
                raise
        if grow:  # XFS grows only while mounted
            blockfs.grow_filesystem(device, staging, fs_type)
        log.info("staged %s volume %s (%s) at %s", fs_type, volume_id, device, staging)

    def _prepare_filesystem(self, volume_id: str, device: str, wanted: str) -> tuple[str, bool]:
        """Format a blank device or check an existing filesystem; return (fs type, needs growing)."""
        signature = blockfs.probe(device)
        if signature is None:
            fs_type = wanted or self.default_fs_type
            blockfs.make_filesystem(device, fs_type, prezeroed=self.is_prezeroed(volume_id))
            return fs_type, False
        if not signature.is_filesystem:
            raise FailedPrecondition(
                f"{device} holds a {signature.type} ({signature.usage}), not a filesystem; "
                "refusing to format it"
            )
        if wanted and signature.type != wanted:
            raise FailedPrecondition(f"the volume holds an {signature.type} filesystem, not {wanted}")
        if signature.type not in blockfs.FILESYSTEMS:
            raise FailedPrecondition(f"the volume holds an unsupported {signature.type} filesystem")
        blockfs.check_filesystem(device, signature.type)
        size = blockfs.filesystem_size(device, signature.type) or 0
        return signature.type, blockfs.device_size(device) - size >= _GROW_SLACK

    def _undo_detach(self, volume_id: str) -> None:
        try:
            self.detach(volume_id)
        except Exception:
            log.exception("detaching volume %s after a failed stage failed", volume_id)

    def node_unstage(self, volume_id: str, staging_path: str) -> None:
        mounts.unmount_stack(staging_path)
        self.detach(volume_id)

    # -- publish --------------------------------------------------------------------
    # The framework has made the target (a directory, or a file for raw block)
    # with no symlink in its path, and checked that nothing but this volume is
    # mounted there; it removes the target again after unpublish if it made it.

    def node_publish(self, request: PublishRequest) -> None:
        target = request.target_path
        if request.capability is not None and request.capability.is_block:
            self._publish_block(request.volume_id, target, request.readonly)
            return
        staging = request.staging_path
        staged = mounts.mounts_at(staging) if staging else []
        if not staged:
            raise FailedPrecondition(f"volume {request.volume_id!r} is not staged at {staging!r}")
        here = mounts.mounts_at(target)
        if here:
            top, source = here[-1], staged[-1]
            if (top.major, top.minor) == (source.major, source.minor):
                return  # published already (a retry, or a restart after the bind)
            raise AlreadyExists(f"target path {target} already has another filesystem mounted")
        mounts.bind_mount(staging, target, readonly=request.readonly, source_nofollow=True)

    def _publish_block(self, volume_id: str, target: str, readonly: bool) -> None:
        device = self._device(volume_id)
        if mounts.is_mounted(target):
            if _rdev(target) == _rdev(device):
                return
            raise AlreadyExists(f"target path {target} already has another device bound")
        mounts.bind_mount(device, target, readonly=readonly)

    def node_unpublish(self, volume_id: str, target_path: str) -> None:
        mounts.unmount_stack(target_path)

    # -- stats and expansion ---------------------------------------------------------------

    def _condition(self, volume_id: str, path: str, device: str | None) -> VolumeCondition:
        problem = self.device_condition(volume_id)
        if problem is not None and problem.abnormal:
            return problem
        if device is None:
            return VolumeCondition(True, "the volume's device is detached")
        here = mounts.mounts_at(path)
        rdev = _rdev(device)
        if here and rdev is not None:
            top = here[-1]
            if os.makedev(top.major, top.minor) != rdev and _rdev(path) != rdev:
                return VolumeCondition(True, f"{path} no longer shows the volume's device {device}")
        return VolumeCondition(False, "")

    def node_stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        device = self.device_of(volume_id)
        here = mounts.mounts_at(volume_path)
        if here and here[-1].source == BLOCK_STAGE_SOURCE + volume_id:
            # The staging path of a raw block volume: the numbers are the device's.
            if device is None:
                return VolumeStats(
                    usage=(), condition=VolumeCondition(True, "the volume's device is detached")
                )
            size = blockfs.device_size(device)
            condition = self.device_condition(volume_id) or VolumeCondition(False, "")
            return VolumeStats(usage=(VolumeUsage("BYTES", size, 0, 0),), condition=condition)
        condition = self._condition(volume_id, volume_path, device)
        if _rdev(volume_path) is not None:
            size = blockfs.device_size(volume_path)
            return VolumeStats(usage=(VolumeUsage("BYTES", size, 0, 0),), condition=condition)
        try:
            usage = os.statvfs(volume_path)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise NotFound(f"{volume_path} does not exist") from None
            # An I/O error from a filesystem whose device went away is a condition, not a failure.
            return VolumeStats(
                usage=(), condition=VolumeCondition(True, f"statvfs {volume_path}: {_errno_name(e.errno)}")
            )
        return VolumeStats(
            usage=(
                VolumeUsage(
                    "BYTES",
                    usage.f_blocks * usage.f_frsize,
                    usage.f_bavail * usage.f_frsize,
                    (usage.f_blocks - usage.f_bfree) * usage.f_frsize,
                ),
                VolumeUsage("INODES", usage.f_files, usage.f_ffree, max(usage.f_files - usage.f_ffree, 0)),
            ),
            condition=condition,
        )

    def node_expand(
        self, volume_id: str, volume_path: str, capacity_bytes: int, capability: VolumeCapability | None
    ) -> int:
        device = self._device(volume_id)
        self.refresh_capacity(volume_id, device)
        size = blockfs.device_size(device)
        if (capability is not None and capability.is_block) or _rdev(volume_path) is not None:
            return size
        here = mounts.mounts_at(volume_path)
        if not here:
            raise FailedPrecondition(f"{volume_path} is not mounted")
        fs_type = here[-1].fs_type
        if fs_type not in blockfs.FILESYSTEMS:
            raise Internal(f"{volume_path} holds {fs_type}, which csi_kit cannot grow")
        blockfs.grow_filesystem(device, volume_path, fs_type)
        return size

    @staticmethod
    def filesystem_mounts(device: str) -> list[mounts.MountInfo]:
        """Mounts of the filesystem on `device` (the staging mount and its binds), in mount order."""
        rdev = _rdev(device)
        if rdev is None:
            return []
        return [m for m in mounts.read_mountinfo() if os.makedev(m.major, m.minor) == rdev]
