"""hostPath capacity enforced with XFS project quotas.  This machine's kernel
has no quota support, so the enforcing tests are marked `vm` and run inside
the VM harness (a Debian kernel); the refusal without quotas runs anywhere."""

from __future__ import annotations

import errno
import os

import grpc
import pytest
from helpers import create_req, expect, mount_cap, short_dir
from hp_helpers import HostPath

from csi_kit._pb import csi_pb2 as pb
from csi_kit.errors import FailedPrecondition
from csi_kit.testing.driver import running_driver

pytestmark = pytest.mark.privileged

FS_TYPE = "xfs"
FS_OPTIONS = ("prjquota",)
MiB = 1 << 20


def test_quota_on_without_project_quotas_refuses_to_start() -> None:
    with (
        short_dir() as state,
        pytest.raises(FailedPrecondition, match="prjquota"),
        running_driver(state, backend_options={"quota": "on"}),
    ):
        pass  # pragma: no cover


def _over_quota(hostpath: HostPath, error: OSError) -> None:
    """The write failed because of the volume's limit, not a full disk.  XFS
    reports an exceeded project quota as ENOSPC (EDQUOT is for user and group
    quotas), so the disk is checked to have ample room."""
    assert error.errno in (errno.EDQUOT, errno.ENOSPC), error
    st = os.statvfs(hostpath.root)
    assert st.f_bavail * st.f_frsize > 64 * MiB


def _write(path: str, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())


@pytest.mark.vm
def test_capacity_is_enforced_and_reported(hostpath: HostPath) -> None:
    manifest = hostpath.csi.identity.GetPluginInfo(pb.GetPluginInfoRequest()).manifest
    assert manifest["capacity"] == "enforced"
    vol = hostpath.csi.create("limited", required=4 * MiB)
    assert vol.volume_context["csi-kit.io/capacity"] == "enforced"
    fill = os.path.join(hostpath.volume_dir(vol.volume_id), "fill")
    with pytest.raises(OSError) as info:
        _write(fill, 8 * MiB)
    _over_quota(hostpath, info.value)
    assert 2 * MiB <= os.path.getsize(fill) <= 4 * MiB  # stopped at the volume's size
    os.remove(fill)
    os.makedirs(os.path.join(hostpath.volume_dir(vol.volume_id), "sub"))
    with pytest.raises(OSError) as info:  # subdirectories inherit the project
        _write(os.path.join(hostpath.volume_dir(vol.volume_id), "sub", "more"), 8 * MiB)
    _over_quota(hostpath, info.value)
    cond = hostpath.csi.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert not cond.status.volume_condition.abnormal


@pytest.mark.vm
def test_expand_raises_the_limit(hostpath: HostPath) -> None:
    vol = hostpath.csi.create("growing", required=4 * MiB)
    path = os.path.join(hostpath.volume_dir(vol.volume_id), "fill")
    with pytest.raises(OSError) as info:
        _write(path, 8 * MiB)
    _over_quota(hostpath, info.value)
    os.remove(path)
    hostpath.csi.controller.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=16 * MiB)
        )
    )
    _write(path, 8 * MiB)  # fits now
    assert os.path.getsize(path) == 8 * MiB


@pytest.mark.vm
def test_published_volume_shows_its_size(hostpath: HostPath, targets: str) -> None:
    vol = hostpath.csi.create("df", required=8 * MiB)
    target = os.path.join(targets, "df")
    hostpath.csi.node.NodePublishVolume(
        pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, target_path=target, volume_capability=mount_cap()
        )
    )
    stats = hostpath.csi.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target)
    )
    total = next(u.total for u in stats.usage if u.unit == pb.VolumeUsage.BYTES)
    assert total == 8 * MiB
    hostpath.csi.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
    )


@pytest.mark.vm
def test_restored_volume_is_limited_too(hostpath: HostPath) -> None:
    src = hostpath.csi.create("q-src", required=4 * MiB)
    _write(os.path.join(hostpath.volume_dir(src.volume_id), "data"), 2 * MiB)
    snap = hostpath.csi.snapshot("q-snap", src.volume_id)
    restored = hostpath.csi.create("q-restored", required=4 * MiB, snapshot=snap.snapshot_id)
    with pytest.raises(OSError) as info:
        _write(os.path.join(hostpath.volume_dir(restored.volume_id), "more"), 4 * MiB)
    _over_quota(hostpath, info.value)


@pytest.mark.vm
def test_promises_beyond_the_disk_are_refused(hostpath: HostPath) -> None:
    free = os.statvfs(hostpath.root).f_bavail * os.statvfs(hostpath.root).f_frsize
    req = create_req("too-big", required=free + 64 * MiB)
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, hostpath.csi.controller.CreateVolume, req, "free")
