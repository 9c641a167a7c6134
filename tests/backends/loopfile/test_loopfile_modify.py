"""ControllerModifyVolume on the loopfile backend: the ``allocation`` mutable
parameter, against a real driver on XFS and ext4 roots.

What is checked is the image itself: ``st_blocks`` says how much of it is
allocated, its bytes say the data survived, and expansion afterwards shows
which policy the image now follows.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from loopfile_helpers import Csi, MiB

from csi_kit._pb import csi_pb2 as pb

pytestmark = pytest.mark.privileged

SIZE = 32 * MiB


def _image(root: Path, volume_id: str) -> Path:
    return root / "volumes" / f"{volume_id}.img"


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _modify(csi: Csi, volume_id: str, **params: str) -> None:
    csi.controller.ControllerModifyVolume(
        pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=params)
    )


def _refused(csi: Csi, volume_id: str, params: dict[str, str]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        csi.controller.ControllerModifyVolume(
            pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=params)
        )
    return info.value


def _write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def test_the_driver_advertises_modify_volume(csi: Csi) -> None:
    caps = csi.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities
    kinds = {c.rpc.type for c in caps}
    assert pb.ControllerServiceCapability.RPC.MODIFY_VOLUME in kinds


def test_sparse_to_preallocated_allocates_every_block_and_keeps_the_data(csi: Csi, driver_root: Path) -> None:
    vol = csi.create(SIZE)
    image = _image(driver_root, vol.volume_id)
    data = os.urandom(MiB)
    _write(image, 5 * MiB, data)
    assert _allocated(image) < SIZE // 2  # sparse: only what was written

    _modify(csi, vol.volume_id, allocation="preallocated")
    assert _allocated(image) >= SIZE
    assert _read(image, 5 * MiB, MiB) == data
    assert _read(image, 0, MiB) == bytes(MiB)  # the holes became unwritten extents: still zeros
    _modify(csi, vol.volume_id, allocation="preallocated")  # idempotent
    assert _allocated(image) >= SIZE

    # Expansion now follows the new policy: the grown part is allocated too.
    csi.expand(vol.volume_id, 2 * SIZE)
    assert os.stat(image).st_size == 2 * SIZE and _allocated(image) >= 2 * SIZE
    csi.delete(vol.volume_id)


def test_preallocated_to_sparse_keeps_the_blocks_and_grows_sparse(csi: Csi, driver_root: Path) -> None:
    vol = csi.create(SIZE, parameters={"allocation": "preallocated"})
    image = _image(driver_root, vol.volume_id)
    assert _allocated(image) >= SIZE
    _modify(csi, vol.volume_id, allocation="sparse")
    _modify(csi, vol.volume_id, allocation="sparse")
    assert _allocated(image) >= SIZE  # nothing given back: the policy changed, not the blocks

    csi.expand(vol.volume_id, 4 * SIZE)
    assert os.stat(image).st_size == 4 * SIZE
    assert _allocated(image) < 2 * SIZE  # the new 96 MiB are holes
    csi.delete(vol.volume_id)


def test_create_volume_applies_mutable_parameters_over_parameters(csi: Csi, driver_root: Path) -> None:
    req = pb.CreateVolumeRequest(
        name="thick-by-mutable",
        capacity_range=pb.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[csi.cap()],
        parameters={"allocation": "sparse"},
        mutable_parameters={"allocation": "preallocated"},
    )
    vol = csi.controller.CreateVolume(req).volume
    assert _allocated(_image(driver_root, vol.volume_id)) >= SIZE
    assert csi.controller.CreateVolume(req).volume.volume_id == vol.volume_id  # same request: same volume
    csi.delete(vol.volume_id)


def test_refusals_change_nothing(csi: Csi, driver_root: Path) -> None:
    vol = csi.create(SIZE)
    image = _image(driver_root, vol.volume_id)
    before = _allocated(image)
    for params in ({"allocation": "thick"}, {"iops": "100"}, {"allocation": "preallocated", "iops": "1"}):
        err = _refused(csi, vol.volume_id, params)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, params
    assert _allocated(image) == before
    err = _refused(csi, "no-such-volume", {"allocation": "sparse"})
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # An unknown key at creation is refused and leaves no image behind.
    req = pb.CreateVolumeRequest(
        name="bad-mutable",
        capacity_range=pb.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[csi.cap()],
        mutable_parameters={"iops": "100"},
    )
    with pytest.raises(grpc.RpcError) as info:
        csi.controller.CreateVolume(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(os.listdir(driver_root / "volumes")) == [f"{vol.volume_id}.img"]
    csi.delete(vol.volume_id)


def test_preallocating_more_than_the_root_can_promise_is_resource_exhausted(
    csi: Csi, driver_root: Path
) -> None:
    free = os.statvfs(driver_root).f_bavail * os.statvfs(driver_root).f_frsize
    size = (free * 6 // 10) // MiB * MiB
    first, second = csi.create(size), csi.create(size)  # each fits alone; together they overcommit
    image = _image(driver_root, first.volume_id)
    before = _allocated(image)
    err = _refused(csi, first.volume_id, {"allocation": "preallocated"})
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert _allocated(image) == before
    # Still sparse: growing it allocates nothing.
    csi.expand(first.volume_id, size + 8 * MiB)
    assert _allocated(image) == before
    csi.delete(second.volume_id)
    csi.delete(first.volume_id)


def test_a_mounted_volume_is_preallocated_in_place(csi: Csi, driver_root: Path) -> None:
    vol = csi.create(SIZE, fs_type="ext4")
    target = Path(csi.mount(vol.volume_id, fs_type="ext4"))
    payload = os.urandom(3 * MiB)
    (target / "data").write_bytes(payload)
    os.sync()
    _modify(csi, vol.volume_id, allocation="preallocated")
    image = _image(driver_root, vol.volume_id)
    assert _allocated(image) >= SIZE
    (target / "more").write_bytes(payload)  # the filesystem keeps working on the same device
    os.sync()
    assert (target / "data").read_bytes() == payload
    csi.umount(vol.volume_id)
    csi.delete(vol.volume_id)
