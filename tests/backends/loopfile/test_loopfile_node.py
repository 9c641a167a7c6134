"""The node path on real loop devices: format once, stage/publish/unpublish/
unstage idempotently, nothing left behind, correct after a driver restart,
online expansion, stats and conditions, and refusal to delete a volume in use."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import grpc
import pytest
from loopfile_helpers import DRIVER, Csi, MiB, cleanup_leaks, no_leaks, read_file, serve, write_file

from csi_kit._pb import csi_pb2 as pb
from csi_kit.linux import blockfs, loop, mounts
from csi_kit.linux.mounts import mounts_at
from csi_kit.testing.driver import driver_process

pytestmark = pytest.mark.privileged

C = grpc.StatusCode


def _code(err: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return err.value.code()  # type: ignore[no-any-return]


def _image(root: Path, volume_id: str) -> str:
    return str(root / "volumes" / f"{volume_id}.img")


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_stage_formats_once_and_unstage_leaves_nothing(
    csi: Csi, driver_root: Path, work: Path, fs_type: str
) -> None:
    vol = csi.create(300 * MiB if fs_type == "xfs" else 32 * MiB, fs_type=fs_type)
    image = _image(driver_root, vol.volume_id)
    assert os.stat(image).st_blocks == 0  # sparse until formatted
    staging = csi.stage(vol.volume_id, fs_type=fs_type)
    csi.stage(vol.volume_id, fs_type=fs_type)  # idempotent
    devices = loop.devices_of(image)
    assert len(devices) == 1 and devices[0].autoclear
    assert mounts_at(staging)[-1].fs_type == fs_type
    assert blockfs.probe(devices[0].path) == blockfs.Signature(fs_type, "filesystem")
    if fs_type == "ext4":
        # The image stays sparse: mkfs was told it reads as zeros, so no inode
        # tables were written (and no ext4lazyinit thread writes them later).
        assert os.stat(image).st_blocks * 512 < 4 * MiB

    target = csi.publish(vol.volume_id, fs_type=fs_type)
    csi.publish(vol.volume_id, fs_type=fs_type)  # idempotent
    write_file(f"{target}/keep", b"kept across stages")
    csi.unpublish(vol.volume_id)
    csi.unpublish(vol.volume_id)  # idempotent
    assert not os.path.exists(target)
    csi.unstage(vol.volume_id)
    csi.unstage(vol.volume_id)  # idempotent
    assert no_leaks(driver_root, work) == []

    # Staged again (without naming the fs type): the filesystem is reused, not remade.
    target = csi.mount(vol.volume_id)
    assert read_file(f"{target}/keep") == b"kept across stages"
    csi.umount(vol.volume_id)
    csi.delete(vol.volume_id)
    assert not os.path.exists(image)


def test_stage_refuses_a_different_filesystem_than_the_volume_holds(csi: Csi) -> None:
    vol = csi.create(300 * MiB, fs_type="ext4")
    csi.stage(vol.volume_id, fs_type="ext4")
    csi.unstage(vol.volume_id)
    with pytest.raises(grpc.RpcError) as err:
        csi.stage(vol.volume_id, fs_type="xfs")
    assert _code(err) == C.FAILED_PRECONDITION
    assert "ext4" in err.value.details()
    csi.delete(vol.volume_id)


def test_readonly_publish_refuses_writes(csi: Csi) -> None:
    vol = csi.create(32 * MiB)
    csi.stage(vol.volume_id)
    rw = csi.publish(vol.volume_id, tag="rw")
    ro = csi.publish(vol.volume_id, readonly=True, tag="ro")
    write_file(f"{rw}/file", b"x")
    assert read_file(f"{ro}/file") == b"x"
    with pytest.raises(OSError) as err:
        write_file(f"{ro}/other", b"y")
    assert err.value.errno == errno.EROFS
    csi.unpublish(vol.volume_id, tag="ro")
    csi.unpublish(vol.volume_id, tag="rw")
    csi.unstage(vol.volume_id)
    csi.delete(vol.volume_id)


def test_block_stage_keeps_the_device_attached_until_unstage(csi: Csi, driver_root: Path, work: Path) -> None:
    vol = csi.create(16 * MiB, block=True)
    image = _image(driver_root, vol.volume_id)
    staging = csi.stage(vol.volume_id, block=True)
    csi.stage(vol.volume_id, block=True)  # idempotent
    devices = loop.devices_of(image)
    assert len(devices) == 1 and not devices[0].autoclear  # nobody holds it open: no autoclear
    assert mounts_at(staging)[-1].source == f"csi-kit-block:{vol.volume_id}"
    target = csi.publish(vol.volume_id, block=True)
    assert os.stat(target).st_rdev == os.stat(devices[0].path).st_rdev
    assert blockfs.probe(devices[0].path) is None  # block volumes are never formatted
    csi.unpublish(vol.volume_id)
    assert not os.path.exists(target)
    csi.unstage(vol.volume_id)
    assert no_leaks(driver_root, work) == []
    csi.delete(vol.volume_id)


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_delete_of_a_staged_volume_is_refused(csi: Csi, driver_root: Path, block: bool) -> None:
    vol = csi.create(16 * MiB, block=block)
    csi.stage(vol.volume_id, block=block)
    with pytest.raises(grpc.RpcError) as err:
        csi.delete(vol.volume_id)
    assert _code(err) == C.FAILED_PRECONDITION
    assert os.path.exists(_image(driver_root, vol.volume_id))
    csi.unstage(vol.volume_id)
    csi.delete(vol.volume_id)
    assert not os.path.exists(_image(driver_root, vol.volume_id))


def test_a_restarted_driver_finds_its_stages_and_publishes(driver_root: Path, work: Path) -> None:
    try:
        with serve(driver_root, work) as csi:
            vol = csi.create(32 * MiB)
            blk = csi.create(16 * MiB, block=True)
            target = csi.mount(vol.volume_id)
            write_file(f"{target}/file", b"before the restart")
            csi.mount(blk.volume_id, block=True)
        # The driver is gone; its mounts and devices stay, as on a real node.
        assert len(loop.devices_of(_image(driver_root, vol.volume_id))) == 1
        with serve(driver_root, work) as csi:
            # Retries of what the CO may not have seen answered: same result, nothing doubled.
            assert csi.mount(vol.volume_id) == target
            csi.mount(blk.volume_id, block=True)
            assert len(loop.devices_of(_image(driver_root, vol.volume_id))) == 1
            assert len(loop.devices_of(_image(driver_root, blk.volume_id))) == 1
            assert read_file(f"{target}/file") == b"before the restart"
            stats = csi.stats(vol.volume_id, target)
            assert not stats.volume_condition.abnormal
            csi.umount(vol.volume_id)
            csi.umount(blk.volume_id)
            assert no_leaks(driver_root, work) == []
            csi.delete(vol.volume_id)
            csi.delete(blk.volume_id)
    finally:
        leaks = cleanup_leaks(driver_root, work)
    assert leaks == []


def test_expand_a_published_xfs_volume_online(csi: Csi) -> None:
    vol = csi.create(300 * MiB, fs_type="xfs")
    target = csi.mount(vol.volume_id, fs_type="xfs")
    write_file(f"{target}/data", b"d" * MiB)
    before = os.statvfs(target)
    reply = csi.expand(vol.volume_id, 600 * MiB)
    assert reply.capacity_bytes == 600 * MiB and reply.node_expansion_required
    node = csi.node_expand(vol.volume_id, target, 600 * MiB)
    assert node.capacity_bytes == 600 * MiB
    after = os.statvfs(target)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 250 * MiB
    assert read_file(f"{target}/data") == b"d" * MiB
    csi.node_expand(vol.volume_id, target, 600 * MiB)  # idempotent
    csi.umount(vol.volume_id)
    csi.delete(vol.volume_id)


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def test_expand_a_published_ext4_volume_online(csi: Csi) -> None:
    if not _has_cap_sys_resource():
        pytest.skip("online ext4 resize needs CAP_SYS_RESOURCE, which this machine's root lacks")
    vol = csi.create(64 * MiB)
    target = csi.mount(vol.volume_id)
    csi.expand(vol.volume_id, 128 * MiB)
    csi.node_expand(vol.volume_id, target, 128 * MiB)
    st = os.statvfs(target)
    assert st.f_blocks * st.f_frsize > 100 * MiB
    csi.umount(vol.volume_id)
    csi.delete(vol.volume_id)


def test_an_ext4_volume_expanded_while_unstaged_grows_at_the_next_stage(csi: Csi) -> None:
    vol = csi.create(64 * MiB)
    target = csi.mount(vol.volume_id)
    write_file(f"{target}/data", b"still here")
    csi.umount(vol.volume_id)
    reply = csi.expand(vol.volume_id, 192 * MiB)
    assert reply.node_expansion_required
    target = csi.mount(vol.volume_id)
    st = os.statvfs(target)
    assert st.f_blocks * st.f_frsize > 160 * MiB
    assert read_file(f"{target}/data") == b"still here"
    csi.umount(vol.volume_id)
    csi.delete(vol.volume_id)


def test_expand_a_published_block_volume_needs_no_node_step(csi: Csi) -> None:
    vol = csi.create(16 * MiB, block=True)
    target = csi.mount(vol.volume_id, block=True)
    reply = csi.expand(vol.volume_id, 48 * MiB, block=True)
    assert reply.capacity_bytes == 48 * MiB and not reply.node_expansion_required
    assert blockfs.device_size(target) == 48 * MiB  # the controller refreshed the loop device
    assert csi.node_expand(vol.volume_id, target, 48 * MiB, block=True).capacity_bytes == 48 * MiB
    stats = csi.stats(vol.volume_id, target)
    assert [(u.unit, u.total) for u in stats.usage] == [(1, 48 * MiB)]  # BYTES
    staged = csi.stats(vol.volume_id, csi.staging_path(vol.volume_id))  # the device's size, not the marker's
    assert [(u.unit, u.total) for u in staged.usage] == [(1, 48 * MiB)]
    assert not staged.volume_condition.abnormal
    csi.unpublish(vol.volume_id)
    csi.unstage(vol.volume_id)
    csi.delete(vol.volume_id)


def test_block_stats_at_the_kubelets_own_bind_of_the_device(csi: Csi, work: Path) -> None:
    """The kubelet asks for a block volume's stats at .../volumeDevices/<pv>/dev/<pod uid>, its
    own bind of the published device file, not the publish target (issue #13, finding 3)."""
    vol = csi.create(16 * MiB, block=True)
    target = csi.mount(vol.volume_id, block=True)
    kubelet_path = work / "volumeDevices" / "pv" / "dev" / "pod-uid"
    kubelet_path.parent.mkdir(parents=True)
    kubelet_path.touch()
    mounts.bind_mount(target, str(kubelet_path))
    try:
        stats = csi.stats(vol.volume_id, str(kubelet_path))
        assert [(u.unit, u.total) for u in stats.usage] == [(1, 16 * MiB)]  # BYTES
        assert not stats.volume_condition.abnormal
        # A bind of something else at a path of the same shape is still NOT_FOUND.
        other = work / "volumeDevices" / "pv" / "dev" / "other"
        other.touch()
        mounts.bind_mount("/dev/null", str(other))
        try:
            with pytest.raises(grpc.RpcError) as info:
                csi.stats(vol.volume_id, str(other))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            mounts.unmount(str(other))
    finally:
        mounts.unmount(str(kubelet_path))
    csi.unpublish(vol.volume_id)
    csi.unstage(vol.volume_id)
    csi.delete(vol.volume_id)


def test_stats_and_a_missing_image_reported_as_abnormal(csi: Csi, driver_root: Path) -> None:
    vol = csi.create(32 * MiB)
    target = csi.mount(vol.volume_id)
    stats = csi.stats(vol.volume_id, target)
    units = {u.unit: u for u in stats.usage}
    assert set(units) == {1, 2}  # BYTES, INODES
    assert 20 * MiB < units[1].total <= 32 * MiB
    assert units[1].available <= units[1].total
    assert not stats.volume_condition.abnormal
    assert not csi.get_volume(vol.volume_id).status.volume_condition.abnormal

    os.unlink(_image(driver_root, vol.volume_id))  # lost behind the driver's back
    stats = csi.stats(vol.volume_id, target)
    assert stats.volume_condition.abnormal
    assert "missing" in stats.volume_condition.message
    condition = csi.get_volume(vol.volume_id).status.volume_condition
    assert condition.abnormal and "missing" in condition.message
    # Cleaning up still works, and the orphaned loop device goes with the mount.
    csi.umount(vol.volume_id)
    assert [d for d in loop.list_devices() if d.backing_file.startswith(str(driver_root) + "/")] == []
    csi.delete(vol.volume_id)


def test_get_capacity_thin_and_thick(csi: Csi, driver_root: Path) -> None:
    free = os.statvfs(driver_root)
    thin_before = csi.capacity()
    assert abs(thin_before - free.f_bavail * free.f_frsize) < 16 * MiB
    sparse = csi.create(512 * MiB)
    # A sparse volume costs (almost) nothing now but may claim its size later.
    assert csi.capacity() > thin_before - 16 * MiB
    assert csi.capacity({"allocation": "preallocated"}) < thin_before - 500 * MiB
    thick = csi.create(128 * MiB, parameters={"allocation": "preallocated"})
    assert os.stat(_image(driver_root, thick.volume_id)).st_blocks * 512 >= 128 * MiB
    assert csi.capacity() < thin_before - 120 * MiB
    with pytest.raises(grpc.RpcError) as err:
        csi.capacity({"allocation": "sometimes"})
    assert _code(err) == C.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        csi.create(8 << 30, parameters={"allocation": "preallocated"})
    assert _code(err) == C.RESOURCE_EXHAUSTED
    # GetCapacity's figure is also the largest volume it makes, thin or thick.
    thick_now = csi.capacity({"allocation": "preallocated"})
    with pytest.raises(grpc.RpcError) as err:
        csi.create(thick_now + 64 * MiB, parameters={"allocation": "preallocated"})
    assert _code(err) == C.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        csi.create(csi.capacity() + 64 * MiB)
    assert _code(err) == C.RESOURCE_EXHAUSTED
    csi.delete(sparse.volume_id)
    csi.delete(thick.volume_id)


def test_restore_or_clone_for_another_node_is_resource_exhausted(csi: Csi) -> None:
    vol = csi.create(16 * MiB)
    snap = csi.snapshot(vol.volume_id)
    key = f"topology.{DRIVER}/node"
    assert [dict(t.segments) for t in vol.accessible_topology] == [{key: "node-1"}]
    elsewhere = pb.TopologyRequirement(requisite=[pb.Topology(segments={key: "node-2"})])
    for source in ({"snapshot": snap.snapshot_id}, {"volume": vol.volume_id}):
        req = pb.CreateVolumeRequest(
            name=f"elsewhere-{next(iter(source))}",
            capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
            volume_capabilities=[csi.cap()],
            accessibility_requirements=elsewhere,
        )
        if "snapshot" in source:
            req.volume_content_source.snapshot.snapshot_id = source["snapshot"]
        else:
            req.volume_content_source.volume.volume_id = source["volume"]
        with pytest.raises(grpc.RpcError) as err:
            csi.controller.CreateVolume(req)
        assert _code(err) == C.RESOURCE_EXHAUSTED
    csi.delete_snapshot(snap.snapshot_id)
    csi.delete(vol.volume_id)


@pytest.mark.parametrize("durability", ["power", "process"])  # every mode that survives kill -9
def test_a_killed_driver_process_leaves_a_state_the_next_one_finishes(
    driver_root: Path, work: Path, durability: str
) -> None:
    """kill -9 of a real `csi-kit serve` with a volume staged, published and
    a raw volume staged: the next process serves retries and cleans up."""
    state = work / "state"
    options = {"root": str(driver_root)}
    args = ["--durability", durability]
    try:
        with driver_process(
            str(state), backend="loopfile", backend_options=options, driver_name=DRIVER, extra_args=args
        ) as proc:
            with grpc.insecure_channel(proc.endpoint) as channel:
                csi = Csi(channel, work)
                vol = csi.create(32 * MiB)
                blk = csi.create(16 * MiB, block=True)
                target = csi.mount(vol.volume_id)
                write_file(f"{target}/file", b"survives kill -9")
                csi.stage(blk.volume_id, block=True)
            proc.kill()
        with (
            driver_process(
                str(state), backend="loopfile", backend_options=options, driver_name=DRIVER, extra_args=args
            ) as proc,
            grpc.insecure_channel(proc.endpoint) as channel,
        ):
            csi = Csi(channel, work)
            assert csi.mount(vol.volume_id) == target
            assert read_file(f"{target}/file") == b"survives kill -9"
            blk_target = csi.publish(blk.volume_id, block=True)
            assert blockfs.device_size(blk_target) == 16 * MiB
            with pytest.raises(grpc.RpcError) as err:
                csi.delete(vol.volume_id)
            assert _code(err) == C.FAILED_PRECONDITION
            csi.umount(vol.volume_id)
            csi.umount(blk.volume_id)
            csi.delete(vol.volume_id)
            csi.delete(blk.volume_id)
            assert no_leaks(driver_root, work) == []
    finally:
        leaks = cleanup_leaks(driver_root, work)
    assert leaks == []


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_inline_ephemeral_volume_is_made_staged_and_unmade(csi: Csi, driver_root: Path, fs_type: str) -> None:
    """An inline (ephemeral) volume of a staging backend: NodePublish alone makes, formats,
    stages and publishes it; NodeUnpublish unstages, detaches and deletes it (issue #14)."""
    kubelet_id = "csi-" + "cd" * 32
    target = csi.target_path("inline")
    context = {"csi.storage.k8s.io/ephemeral": "true", "size": "24Mi"}
    cap = csi.cap(False, fs_type)
    request = pb.NodePublishVolumeRequest(
        volume_id=kubelet_id, target_path=target, volume_capability=cap, volume_context=context
    )
    csi.node.NodePublishVolume(request)
    csi.node.NodePublishVolume(request)  # a retry: the same volume
    (here,) = mounts_at(target)
    assert here.fs_type == fs_type
    write_file(os.path.join(target, "f"), b"inline data")
    (vol,) = csi.controller.ListVolumes(pb.ListVolumesRequest()).entries
    assert vol.volume.capacity_bytes >= 24 * MiB  # XFS raises it to its minimum
    assert loop.device_for(_image(driver_root, vol.volume.volume_id)) is not None
    csi.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=kubelet_id, target_path=target))
    assert not os.path.exists(target)
    assert list(csi.controller.ListVolumes(pb.ListVolumesRequest()).entries) == []
    assert not os.path.exists(_image(driver_root, vol.volume.volume_id))
