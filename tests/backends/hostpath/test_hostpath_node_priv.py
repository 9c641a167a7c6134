"""hostPath node side with real bind mounts: publish, read-only, unpublish,
idempotency, conflicts, stats, expansion."""

from __future__ import annotations

import errno
import os

import grpc
import pytest
from helpers import expect, mount_cap
from hp_helpers import HostPath

from csi_kit._pb import csi_pb2 as pb
from csi_kit.linux.fs import statvfs_usage
from csi_kit.linux.mounts import mounts_at, read_mountinfo, unmount
from csi_kit.types import AccessMode

pytestmark = pytest.mark.privileged

FS_TYPE = "ext4"  # a filesystem of its own: usage figures are not moved by other writers


def publish(hp: HostPath, volume_id: str, target: str, *, readonly: bool = False, mode: int = 1) -> None:
    hp.csi.node.NodePublishVolume(
        pb.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=target, volume_capability=mount_cap(mode=mode), readonly=readonly
        ),
        timeout=30,
    )


def unpublish(hp: HostPath, volume_id: str, target: str) -> None:
    hp.csi.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), timeout=30
    )


def test_publish_is_a_bind_mount_in_mountinfo(hostpath: HostPath, targets: str) -> None:
    vol = hostpath.csi.create("pub")
    target = os.path.join(targets, "mnt")
    publish(hostpath, vol.volume_id, target)
    entries = mounts_at(target)
    assert len(entries) == 1
    entry = entries[0]
    # The mount's root inside its filesystem is the volume directory.
    assert entry.root.endswith(f"/volumes/{vol.volume_id}")
    assert not entry.readonly
    assert any(m.mount_point == target for m in read_mountinfo("/proc/self/mountinfo"))
    with open(os.path.join(target, "hello"), "w") as f:
        f.write("through the mount")
    with open(os.path.join(hostpath.volume_dir(vol.volume_id), "hello")) as f:
        assert f.read() == "through the mount"
    unpublish(hostpath, vol.volume_id, target)
    assert mounts_at(target) == []
    assert not os.path.exists(target)
    hostpath.csi.delete(vol.volume_id)


def test_read_only_publish_rejects_writes(hostpath: HostPath, targets: str) -> None:
    vol = hostpath.csi.create("ro")
    with open(os.path.join(hostpath.volume_dir(vol.volume_id), "existing"), "w") as f:
        f.write("old")
    target = os.path.join(targets, "ro")
    publish(hostpath, vol.volume_id, target, readonly=True)
    assert mounts_at(target)[-1].readonly
    with pytest.raises(OSError) as info, open(os.path.join(target, "new"), "w"):
        pass
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info, open(os.path.join(target, "existing"), "a"):
        pass
    assert info.value.errno == errno.EROFS
    with open(os.path.join(target, "existing")) as f:
        assert f.read() == "old"
    # The volume itself stays writable.
    with open(os.path.join(hostpath.volume_dir(vol.volume_id), "other"), "w") as f:
        f.write("x")
    unpublish(hostpath, vol.volume_id, target)


def test_reader_only_mode_is_published_read_only(hostpath: HostPath, targets: str) -> None:
    vol = hostpath.csi.create("reader", caps=[mount_cap(mode=AccessMode.SINGLE_NODE_READER_ONLY)])
    target = os.path.join(targets, "reader")
    publish(hostpath, vol.volume_id, target, mode=AccessMode.SINGLE_NODE_READER_ONLY)
    assert mounts_at(target)[-1].readonly
    unpublish(hostpath, vol.volume_id, target)


def test_repeat_publish_is_idempotent_and_conflicts_are_already_exists(
    hostpath: HostPath, targets: str
) -> None:
    vol = hostpath.csi.create("repeat")
    target = os.path.join(targets, "rep")
    publish(hostpath, vol.volume_id, target)
    publish(hostpath, vol.volume_id, target)
    assert len(mounts_at(target)) == 1  # not stacked
    req = pb.NodePublishVolumeRequest(
        volume_id=vol.volume_id, target_path=target, volume_capability=mount_cap(), readonly=True
    )
    expect(grpc.StatusCode.ALREADY_EXISTS, hostpath.csi.node.NodePublishVolume, req, target)
    assert not mounts_at(target)[-1].readonly
    other = hostpath.csi.create("repeat-other")
    req = pb.NodePublishVolumeRequest(
        volume_id=other.volume_id, target_path=target, volume_capability=mount_cap()
    )
    expect(grpc.StatusCode.ALREADY_EXISTS, hostpath.csi.node.NodePublishVolume, req)
    # Unpublishing with the wrong volume id leaves the mount alone.
    wrong = pb.NodeUnpublishVolumeRequest(volume_id=other.volume_id, target_path=target)
    expect(grpc.StatusCode.FAILED_PRECONDITION, hostpath.csi.node.NodeUnpublishVolume, wrong)
    assert len(mounts_at(target)) == 1
    unpublish(hostpath, vol.volume_id, target)
    unpublish(hostpath, vol.volume_id, target)  # again: succeeds, nothing to do
    assert mounts_at(target) == []


def test_single_writer_modes(hostpath: HostPath, targets: str) -> None:
    sw = AccessMode.SINGLE_NODE_SINGLE_WRITER
    vol = hostpath.csi.create("single", caps=[mount_cap(mode=sw)])
    first, second = os.path.join(targets, "a"), os.path.join(targets, "b")
    publish(hostpath, vol.volume_id, first, mode=sw)
    req = pb.NodePublishVolumeRequest(
        volume_id=vol.volume_id, target_path=second, volume_capability=mount_cap(mode=sw)
    )
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        hostpath.csi.node.NodePublishVolume,
        req,
        "SINGLE_NODE_SINGLE_WRITER",
    )
    assert mounts_at(second) == []
    # SINGLE_NODE_MULTI_WRITER may be published at several targets of this node.
    mw = AccessMode.SINGLE_NODE_MULTI_WRITER
    multi = hostpath.csi.create("multi", caps=[mount_cap(mode=mw)])
    publish(hostpath, multi.volume_id, os.path.join(targets, "c"), mode=mw)
    publish(hostpath, multi.volume_id, os.path.join(targets, "d"), mode=mw)
    assert len(mounts_at(os.path.join(targets, "d"))) == 1
    for vid, t in ((vol.volume_id, first), (multi.volume_id, "c"), (multi.volume_id, "d")):
        unpublish(hostpath, vid, os.path.join(targets, t))


def test_published_volume_cannot_be_deleted(hostpath: HostPath, targets: str) -> None:
    vol = hostpath.csi.create("busy")
    target = os.path.join(targets, "busy")
    publish(hostpath, vol.volume_id, target)
    req = pb.DeleteVolumeRequest(volume_id=vol.volume_id)
    expect(grpc.StatusCode.FAILED_PRECONDITION, hostpath.csi.controller.DeleteVolume, req, target)
    assert os.path.isdir(hostpath.volume_dir(vol.volume_id))
    unpublish(hostpath, vol.volume_id, target)
    hostpath.csi.delete(vol.volume_id)
    assert not os.path.exists(hostpath.volume_dir(vol.volume_id))


def test_volume_stats_bytes_and_inodes(hostpath: HostPath, targets: str) -> None:
    vol = hostpath.csi.create("stats", required=16 << 20)
    target = os.path.join(targets, "stats")
    publish(hostpath, vol.volume_id, target)
    with open(os.path.join(target, "data"), "wb") as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    resp = hostpath.csi.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target)
    )
    expected = statvfs_usage(target)
    units = {u.unit: u for u in resp.usage}
    b, i = units[pb.VolumeUsage.BYTES], units[pb.VolumeUsage.INODES]
    # Advisory capacity (ext4, no quota): the directory's usage against its requested
    # size, not the whole filesystem's figures (issue #13, finding 4).
    assert b.total == vol.capacity_bytes < expected.total_bytes
    assert 1 << 20 <= b.used < 2 << 20
    assert b.available == min(b.total - b.used, expected.available_bytes)
    assert i.total == expected.total_inodes
    assert i.used == 2  # the volume directory and its one file
    assert i.available <= i.total
    assert not resp.volume_condition.abnormal
    # Not published there: NOT_FOUND.
    elsewhere = pb.NodeGetVolumeStatsRequest(
        volume_id=vol.volume_id, volume_path=os.path.join(targets, "none")
    )
    expect(grpc.StatusCode.NOT_FOUND, hostpath.csi.node.NodeGetVolumeStats, elsewhere)
    unpublish(hostpath, vol.volume_id, target)
    expect(
        grpc.StatusCode.NOT_FOUND,
        hostpath.csi.node.NodeGetVolumeStats,
        pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target),
    )


def test_node_expand_of_a_published_volume(hostpath: HostPath, targets: str) -> None:
    vol = hostpath.csi.create("nexp", required=8 << 20)
    target = os.path.join(targets, "nexp")
    publish(hostpath, vol.volume_id, target)
    hostpath.csi.controller.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=16 << 20)
        )
    )
    resp = hostpath.csi.node.NodeExpandVolume(
        pb.NodeExpandVolumeRequest(
            volume_id=vol.volume_id,
            volume_path=target,
            capacity_range=pb.CapacityRange(required_bytes=16 << 20),
        )
    )
    assert resp.capacity_bytes == 16 << 20
    unpublish(hostpath, vol.volume_id, target)


def test_stale_publish_record_does_not_block_delete(hostpath: HostPath, targets: str) -> None:
    """A publish record whose mount went away outside the driver (a node reboot)
    is dropped: the volume can be deleted."""
    vol = hostpath.csi.create("stale-record")
    target = os.path.join(targets, "stale")
    publish(hostpath, vol.volume_id, target)
    unmount(target)
    hostpath.csi.delete(vol.volume_id)
    assert not os.path.exists(hostpath.volume_dir(vol.volume_id))
