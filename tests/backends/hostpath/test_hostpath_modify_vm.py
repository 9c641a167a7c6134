"""ControllerModifyVolume on hostPath: the ``capacity`` mutable parameter.

Without project quotas (this machine's kernel) every volume is advisory:
``advisory`` succeeds, ``enforced`` is refused with the reason.  With them
(XFS ``prjquota``, in the VM harness: marked `vm`) the quota of one volume
comes off and back on, and writes, stats and expansion follow.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import grpc
import pytest
from helpers import Csi, expect, mount_cap, short_dir
from hp_helpers import HostPath

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.driver import running_driver

pytestmark = pytest.mark.privileged

FS_TYPE = "xfs"
FS_OPTIONS = ("prjquota",)
MiB = 1 << 20


def _modify(csi: Csi, volume_id: str, **params: str) -> None:
    csi.controller.ControllerModifyVolume(
        pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=params)
    )


def _request(volume_id: str, **params: str) -> pb.ControllerModifyVolumeRequest:
    return pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=params)


def _write(path: str, size: int) -> None:
    with open(path, "ab") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())


def _bytes_total(csi: Csi, volume_id: str, path: str) -> int:
    stats = csi.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path))
    return next(u.total for u in stats.usage if u.unit == pb.VolumeUsage.BYTES)


@pytest.fixture
def advisory() -> Iterator[tuple[Csi, str]]:
    """A hostPath driver on plain /tmp: no quotas, every size advisory."""
    with short_dir() as state, running_driver(state) as endpoint, Csi(endpoint) as csi:
        yield csi, state


def test_without_quotas_advisory_is_accepted_and_enforced_refused(advisory: tuple[Csi, str]) -> None:
    csi, _ = advisory
    vol = csi.create("plain", required=4 * MiB)
    _modify(csi, vol.volume_id, capacity="advisory")
    _modify(csi, vol.volume_id, capacity="advisory")
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        csi.controller.ControllerModifyVolume,
        _request(vol.volume_id, capacity="enforced"),
        "prjquota",
    )
    for params in ({"capacity": "off"}, {"quota": "on"}):
        expect(grpc.StatusCode.INVALID_ARGUMENT, csi.controller.ControllerModifyVolume,
               _request(vol.volume_id, **params))  # fmt: skip
    expect(
        grpc.StatusCode.NOT_FOUND,
        csi.controller.ControllerModifyVolume,
        _request("no-such-volume", capacity="advisory"),
    )
    # Keys the CO adds for information (external-resizer --extra-modify-metadata) change nothing.
    _modify(csi, vol.volume_id, **{"csi.storage.k8s.io/pvc/name": "data"})


def test_create_volume_refuses_an_unsupported_mutable_value(advisory: tuple[Csi, str]) -> None:
    csi, state = advisory
    req = pb.CreateVolumeRequest(
        name="wants-quota",
        capacity_range=pb.CapacityRange(required_bytes=MiB),
        volume_capabilities=[mount_cap()],
        mutable_parameters={"capacity": "enforced"},
    )
    expect(grpc.StatusCode.INVALID_ARGUMENT, csi.controller.CreateVolume, req, "prjquota")
    assert os.listdir(os.path.join(state, "hostpath", "volumes")) == []


def _over_quota(error: OSError) -> None:
    assert error.errno in (errno.EDQUOT, errno.ENOSPC), error


@pytest.mark.vm
def test_quota_comes_off_and_back_on(hostpath: HostPath, targets: str) -> None:
    csi = hostpath.csi
    vol = csi.create("switch", required=4 * MiB)
    directory = hostpath.volume_dir(vol.volume_id)
    target = os.path.join(targets, "switch")
    csi.node.NodePublishVolume(
        pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, target_path=target, volume_capability=mount_cap()
        )
    )
    try:
        with pytest.raises(OSError) as info:
            _write(os.path.join(target, "fill"), 8 * MiB)
        _over_quota(info.value)
        os.remove(os.path.join(target, "fill"))

        _modify(csi, vol.volume_id, capacity="advisory")
        _write(os.path.join(target, "big"), 8 * MiB)  # no limit any more, while published
        assert _bytes_total(csi, vol.volume_id, target) == 4 * MiB  # stats keep the requested size

        # Back on while it holds more than its size: refused, nothing changes.
        expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            csi.controller.ControllerModifyVolume,
            _request(vol.volume_id, capacity="enforced"),
            "holds",
        )
        os.remove(os.path.join(target, "big"))
        _modify(csi, vol.volume_id, capacity="enforced")
        _modify(csi, vol.volume_id, capacity="enforced")
        with pytest.raises(OSError) as info:
            _write(os.path.join(directory, "again"), 8 * MiB)
        _over_quota(info.value)
        assert 2 * MiB <= os.path.getsize(os.path.join(directory, "again")) <= 4 * MiB
    finally:
        csi.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
        )


@pytest.mark.vm
def test_an_advisory_volume_grows_without_a_limit(hostpath: HostPath) -> None:
    csi = hostpath.csi
    vol = csi.create("grow-free", required=4 * MiB)
    _modify(csi, vol.volume_id, capacity="advisory")
    csi.controller.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=8 * MiB)
        )
    )
    _write(os.path.join(hostpath.volume_dir(vol.volume_id), "data"), 12 * MiB)  # still no limit
    os.remove(os.path.join(hostpath.volume_dir(vol.volume_id), "data"))
    _modify(csi, vol.volume_id, capacity="enforced")  # the limit comes back at the new size
    with pytest.raises(OSError) as info:
        _write(os.path.join(hostpath.volume_dir(vol.volume_id), "data"), 12 * MiB)
    _over_quota(info.value)
    assert 6 * MiB <= os.path.getsize(os.path.join(hostpath.volume_dir(vol.volume_id), "data")) <= 8 * MiB
