"""Helpers for the loopfile tests: a small CSI client, a driver to serve,
leak checks, and file I/O that reaches the disk."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit.errors import CSIError
from csi_kit.linux import loop
from csi_kit.linux.mounts import mounts_under, unmount
from csi_kit.testing.driver import running_driver

MiB = 1 << 20
DRIVER = "loopfile.csi-kit.io"
Mode = pb.VolumeCapability.AccessMode


def cleanup_leaks(root: Path, work: Path) -> list[str]:
    """Undo every mount below `work` and every loop device on an image below `root`; say what was found."""
    found = []
    for m in reversed(mounts_under(str(work))):
        found.append(f"mount {m.mount_point}")
        try:
            unmount(m.mount_point)
        except CSIError:
            unmount(m.mount_point, lazy=True)
    below = str(root) + "/"
    for device in loop.list_devices():
        if device.backing_file.startswith(below):
            found.append(f"{device.path} on {device.backing_file}")
            loop.detach(device)
    return found


class Csi:
    """A thin client for the RPCs the tests use; errors stay grpc.RpcError."""

    def __init__(self, channel: grpc.Channel, work: Path) -> None:
        self.controller = pbg.ControllerStub(channel)
        self.node = pbg.NodeStub(channel)
        self.identity = pbg.IdentityStub(channel)
        self.group = pbg.GroupControllerStub(channel)
        self.work = work

    @staticmethod
    def cap(block: bool = False, fs_type: str = "", mode: int = Mode.SINGLE_NODE_WRITER) -> Any:
        if block:
            return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode))
        return pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(fs_type=fs_type), access_mode=Mode(mode=mode)
        )

    def create(
        self,
        size: int = 64 * MiB,
        *,
        block: bool = False,
        fs_type: str = "",
        snapshot: str = "",
        volume: str = "",
        parameters: dict[str, str] | None = None,
        name: str = "",
    ) -> Any:
        req = pb.CreateVolumeRequest(
            name=name or f"vol-{uuid.uuid4().hex[:10]}",
            capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[self.cap(block, fs_type)],
            parameters=parameters or {},
        )
        if snapshot:
            req.volume_content_source.snapshot.snapshot_id = snapshot
        if volume:
            req.volume_content_source.volume.volume_id = volume
        return self.controller.CreateVolume(req).volume

    def delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))

    def snapshot(self, volume_id: str) -> Any:
        req = pb.CreateSnapshotRequest(name=f"snap-{uuid.uuid4().hex[:10]}", source_volume_id=volume_id)
        return self.controller.CreateSnapshot(req).snapshot

    def group_snapshot(self, *volume_ids: str) -> Any:
        req = pb.CreateVolumeGroupSnapshotRequest(
            name=f"group-{uuid.uuid4().hex[:10]}", source_volume_ids=list(volume_ids)
        )
        return self.group.CreateVolumeGroupSnapshot(req).group_snapshot

    def delete_group_snapshot(self, group: Any) -> None:
        self.group.DeleteVolumeGroupSnapshot(
            pb.DeleteVolumeGroupSnapshotRequest(
                group_snapshot_id=group.group_snapshot_id,
                snapshot_ids=[s.snapshot_id for s in group.snapshots],
            )
        )

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id))

    def staging_path(self, volume_id: str) -> str:
        path = self.work / f"staging-{volume_id}"
        path.mkdir(exist_ok=True)
        return str(path)

    def target_path(self, volume_id: str, tag: str = "target") -> str:
        parent = self.work / f"pods-{volume_id}"
        parent.mkdir(exist_ok=True)
        return str(parent / tag)

    def stage(
        self, volume_id: str, *, block: bool = False, fs_type: str = "", flags: tuple[str, ...] = ()
    ) -> str:
        cap = self.cap(block, fs_type)
        if not block:
            cap.mount.mount_flags.extend(flags)
        staging = self.staging_path(volume_id)
        self.node.NodeStageVolume(
            pb.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=staging, volume_capability=cap)
        )
        return staging

    def unstage(self, volume_id: str) -> None:
        self.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=self.staging_path(volume_id))
        )

    def publish(
        self,
        volume_id: str,
        *,
        block: bool = False,
        fs_type: str = "",
        readonly: bool = False,
        tag: str = "target",
    ) -> str:
        target = self.target_path(volume_id, tag)
        self.node.NodePublishVolume(
            pb.NodePublishVolumeRequest(
                volume_id=volume_id,
                staging_target_path=self.staging_path(volume_id),
                target_path=target,
                volume_capability=self.cap(block, fs_type),
                readonly=readonly,
            )
        )
        return target

    def unpublish(self, volume_id: str, tag: str = "target") -> None:
        self.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=self.target_path(volume_id, tag))
        )

    def mount(self, volume_id: str, **kw: Any) -> str:
        """Stage and publish; the published path."""
        self.stage(volume_id, **kw)
        return self.publish(volume_id, **kw)

    def umount(self, volume_id: str) -> None:
        self.unpublish(volume_id)
        self.unstage(volume_id)

    def expand(self, volume_id: str, size: int, *, block: bool = False) -> Any:
        return self.controller.ControllerExpandVolume(
            pb.ControllerExpandVolumeRequest(
                volume_id=volume_id,
                capacity_range=pb.CapacityRange(required_bytes=size),
                volume_capability=self.cap(block),
            )
        )

    def node_expand(self, volume_id: str, path: str, size: int, *, block: bool = False) -> Any:
        return self.node.NodeExpandVolume(
            pb.NodeExpandVolumeRequest(
                volume_id=volume_id,
                volume_path=path,
                staging_target_path=self.staging_path(volume_id),
                capacity_range=pb.CapacityRange(required_bytes=size),
                volume_capability=self.cap(block),
            )
        )

    def stats(self, volume_id: str, path: str) -> Any:
        return self.node.NodeGetVolumeStats(
            pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path)
        )

    def capacity(self, parameters: dict[str, str] | None = None) -> int:
        reply = self.controller.GetCapacity(pb.GetCapacityRequest(parameters=parameters or {}))
        return int(reply.available_capacity)

    def get_volume(self, volume_id: str) -> Any:
        return self.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume_id))


@contextlib.contextmanager
def serve(root: Path, work: Path, **options: str) -> Iterator[Csi]:
    state = work / "state"
    state.mkdir(exist_ok=True)
    with (
        running_driver(
            str(state),
            backend="loopfile",
            backend_options={"root": str(root), **options},
            driver_name=DRIVER,
            socket_path=str(work / "csi.sock"),
        ) as endpoint,
        grpc.insecure_channel(endpoint) as channel,
    ):
        yield Csi(channel, work)


def no_leaks(root: Path, work: Path) -> list[str]:
    """Mounts below `work` and loop devices on images below `root`, without touching them."""
    below = str(root) + "/"
    found = [m.mount_point for m in mounts_under(str(work))]
    found += [d.path for d in loop.list_devices() if d.backing_file.startswith(below)]
    return found


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
