"""The backend object on its own (no engine, no store): what it guarantees
even when csi_kit's records are gone — the start-up pass, and refusing to
delete a volume that is mounted or bound."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loopfile_helpers import MiB

from csi_kit.backend import BackendContext
from csi_kit.errors import FailedPrecondition, InvalidArgument
from csi_kit.linux import loop
from csi_kit.linux.mounts import is_mounted
from csi_kit.types import (
    CapacityRange,
    MountAccess,
    PublishRequest,
    StageRequest,
    VolumeCapability,
    VolumeRequest,
)
from csi_kit_backends.loopfile.backend import LoopfileBackend, LoopfileConfig

pytestmark = pytest.mark.privileged


def _backend(root: Path) -> LoopfileBackend:
    b = LoopfileBackend(
        LoopfileConfig(root=str(root)), BackendContext("loopfile.csi-kit.io", "n1", str(root))
    )
    b.start()
    return b


def _cap(block: bool = False) -> VolumeCapability:
    if block:
        return VolumeCapability("block", 1)
    return VolumeCapability("mount", 1, MountAccess())


def _request(size: int, block: bool = False) -> VolumeRequest:
    return VolumeRequest("v", size, CapacityRange(size), (_cap(block),))


def test_start_detaches_devices_whose_image_is_gone(driver_root: Path) -> None:
    backend = _backend(driver_root)
    kept = backend.create_volume("kept", _request(8 * MiB))
    assert kept.capacity_bytes == 8 * MiB
    gone = backend.image_path("gone")
    with open(gone, "wb") as f:
        f.truncate(8 * MiB)
    leftover = os.path.join(backend.incoming_dir, "vol-interrupted.img")
    with open(leftover, "wb") as f:
        f.truncate(8 * MiB)
    attached = [loop.attach(path) for path in (gone, leftover, backend.image_path("kept"))]
    try:
        for a in attached:
            a.close()  # not autoclear: they stay
        os.unlink(gone)
        restarted = _backend(driver_root)
        assert len(restarted.detached_at_start) == 2
        assert any("(deleted)" in what for what in restarted.detached_at_start)
        assert "detached-at-start" in restarted.describe()
        assert loop.device_for(gone, include_deleted=True) is None
        assert loop.device_for(leftover) is None
        assert not os.path.exists(leftover)
        # A device on an image that still exists is not a stray.
        assert loop.device_for(backend.image_path("kept")) is not None
        assert restarted.inventory().volume_ids == frozenset({"kept"})
    finally:
        for a in attached:
            loop.detach(a.device)
    backend.delete_volume("kept")


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_delete_refuses_a_volume_in_use_without_any_record(
    driver_root: Path, work: Path, block: bool
) -> None:
    backend = _backend(driver_root)
    backend.create_volume("vol", _request(16 * MiB, block))
    staging = work / "staging"
    staging.mkdir()
    target = str(work / "target")
    backend.node_stage(StageRequest("vol", str(staging), _cap(block)))
    try:
        backend.node_publish(PublishRequest("vol", target, _cap(block), staging_path=str(staging)))
        with pytest.raises(FailedPrecondition, match="in use"):
            backend.delete_volume("vol")
        backend.node_unpublish("vol", target)
        with pytest.raises(FailedPrecondition, match="in use"):
            backend.delete_volume("vol")  # still staged
        assert is_mounted(str(staging))
    finally:
        backend.node_unpublish("vol", target)
        backend.node_unstage("vol", str(staging))
    assert loop.device_for(backend.image_path("vol")) is None
    backend.delete_volume("vol")
    backend.delete_volume("vol")  # already gone: fine
    assert backend.inventory().volume_ids == frozenset()


def test_a_leftover_idle_device_is_detached_by_delete(driver_root: Path) -> None:
    backend = _backend(driver_root)
    backend.create_volume("vol", _request(8 * MiB, True))
    backend.attach("vol")  # e.g. a crash between attach and the stage marker
    assert loop.device_for(backend.image_path("vol")) is not None
    backend.delete_volume("vol")
    assert loop.device_for(backend.image_path("vol"), include_deleted=True) is None
    assert not os.path.exists(backend.image_path("vol"))


def test_xfs_volumes_are_made_big_enough_for_mkfs_xfs(driver_root: Path) -> None:
    backend = _backend(driver_root)
    xfs = VolumeCapability("mount", 1, MountAccess(fs_type="xfs"))
    made = backend.create_volume("x", VolumeRequest("x", 64 * MiB, CapacityRange(64 * MiB), (xfs,)))
    assert made.capacity_bytes == 300 * MiB
    with pytest.raises(Exception, match="limit_bytes"):
        backend.create_volume("y", VolumeRequest("y", 64 * MiB, CapacityRange(64 * MiB, 128 * MiB), (xfs,)))
    with pytest.raises(InvalidArgument):
        backend.image_path("../escape")
    backend.delete_volume("x")
