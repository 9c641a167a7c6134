"""The backend object on its own (no engine, no store): what it guarantees
even when csi_kit's records are gone — the start-up pass, and refusing to
delete a volume that is mounted or bound."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from loopfile_helpers import MiB

from csi_kit.backend import BackendContext
from csi_kit.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument
from csi_kit.linux import loop, paths
from csi_kit.linux.mounts import is_mounted
from csi_kit.types import (
    CapacityRange,
    MountAccess,
    PublishRequest,
    Snapshot,
    StageRequest,
    Volume,
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


def test_start_detaches_devices_whose_image_is_gone_or_that_nothing_uses(
    driver_root: Path, work: Path
) -> None:
    backend = _backend(driver_root)
    backend.create_volume("idle", _request(8 * MiB, True))
    backend.create_volume("staged", _request(8 * MiB, True))
    staging = work / "staging"
    staging.mkdir()
    backend.node_stage(StageRequest("staged", str(staging), _cap(True)))
    gone = backend.image_path("gone")
    with open(gone, "wb") as f:
        f.truncate(8 * MiB)
    leftover = os.path.join(backend.incoming_dir, "vol-interrupted.img")
    with open(leftover, "wb") as f:
        f.truncate(8 * MiB)
    attached = [loop.attach(path) for path in (gone, leftover, backend.image_path("idle"))]
    try:
        for a in attached:
            a.close()  # not autoclear: they stay
        os.unlink(gone)
        restarted = _backend(driver_root)
        assert len(restarted.detached_at_start) == 3
        assert any("(deleted)" in what for what in restarted.detached_at_start)
        assert any("idle" in what for what in restarted.detached_at_start)
        assert "detached-at-start" in restarted.describe()
        assert loop.device_for(gone, include_deleted=True) is None
        assert loop.device_for(leftover) is None
        assert loop.device_for(backend.image_path("idle")) is None
        assert not os.path.exists(leftover)
        # A block-staged volume's device is in use: it stays.
        assert loop.device_for(backend.image_path("staged")) is not None
        assert restarted.inventory().volume_ids == frozenset({"idle", "staged"})
    finally:
        for a in attached:
            loop.detach(a.device)
        backend.node_unstage("staged", str(staging))
    backend.delete_volume("idle")
    backend.delete_volume("staged")


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
    # The framework makes the target before a backend's node_publish (a file for block).
    paths.make_target(target, directory=not block)
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


def test_a_snapshot_during_a_stage_in_progress_is_aborted(driver_root: Path) -> None:
    backend = _backend(driver_root)
    backend.create_volume("vol", _request(8 * MiB))
    volume = Volume("vol", "vol", 8 * MiB)
    # What NodeStage holds between attach and mount (mkfs may be running): copying now is not safe.
    with loop.attach(backend.image_path("vol"), autoclear=True), pytest.raises(Aborted, match="being staged"):
        backend.create_snapshot("snap", volume, {})
    assert loop.device_for(backend.image_path("vol")) is None  # autoclear: gone with our handle
    backend.create_snapshot("snap", volume, {})
    assert backend.inventory().snapshot_ids == frozenset({"snap"})
    backend.delete_snapshot("snap")
    backend.delete_volume("vol")


def test_publish_onto_a_target_holding_another_volume_is_refused(driver_root: Path, work: Path) -> None:
    backend = _backend(driver_root)
    staged = []
    try:
        for name in ("a", "b"):
            backend.create_volume(name, _request(8 * MiB))
            staging = work / f"staging-{name}"
            staging.mkdir()
            backend.node_stage(StageRequest(name, str(staging), _cap()))
            staged.append((name, str(staging)))
        target = str(work / "target")
        paths.make_target(target, directory=True)
        backend.node_publish(PublishRequest("a", target, _cap(), staging_path=staged[0][1]))
        backend.node_publish(PublishRequest("a", target, _cap(), staging_path=staged[0][1]))  # a retry: fine
        with pytest.raises(AlreadyExists):
            backend.node_publish(PublishRequest("b", target, _cap(), staging_path=staged[1][1]))
        backend.node_unpublish("a", target)
    finally:
        for name, staging in staged:
            backend.node_unstage(name, staging)
            backend.delete_volume(name)


def test_only_images_with_data_of_their_own_are_flushed_before_they_are_named(
    driver_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copied image is fsynced before its rename; on XFS a reflinked one needs only the
    directory's log force (XFS logs metadata in order), so one flush per snapshot or restore."""
    backend = _backend(driver_root)
    backend.create_volume("vol", _request(8 * MiB))
    with open(backend.image_path("vol"), "r+b") as f:
        f.write(b"data of its own" * 1000)
    flushed: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        flushed.append("file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    made = backend.create_snapshot("snap", Volume("vol", "v", 8 * MiB), {})
    backend.restore_snapshot("restored", _request(8 * MiB), Snapshot("snap", "s", "vol", made.size_bytes, 0))
    monkeypatch.undo()
    xfs = backend.reflink  # the XFS root reflinks, the ext4 one copies
    assert backend.ordered_log == xfs
    assert flushed == (["dir", "dir"] if xfs else ["file", "dir", "file", "dir"])
    with open(backend.image_path("restored"), "rb") as f:
        assert f.read(15) == b"data of its own"
    for vid in ("vol", "restored"):
        backend.delete_volume(vid)
    backend.delete_snapshot("snap")
