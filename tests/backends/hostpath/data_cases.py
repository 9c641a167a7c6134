"""Data tests shared by the XFS (reflink) and ext4 (copy fallback) modules:
snapshot, restore, clone, group snapshots, expansion, capacity, condition.

Each module sets FS_TYPE and imports these tests; the `hostpath` fixture then
serves a driver whose root is on that filesystem."""

from __future__ import annotations

import os
import shutil

import grpc
from helpers import create_req, expect
from hp_helpers import HostPath, allocated, digest, fill

from csi_kit._pb import csi_pb2 as pb

MiB = 1 << 20


def test_snapshot_then_restore_and_clone_reproduce_the_bytes(hostpath: HostPath) -> None:
    csi = hostpath.csi
    src = csi.create("data-src", required=128 * MiB)
    fill(hostpath.volume_dir(src.volume_id), seed=1)
    original = digest(hostpath.volume_dir(src.volume_id))
    snap = csi.snapshot("data-snap", src.volume_id)
    assert snap.ready_to_use and snap.size_bytes == 128 * MiB
    assert digest(hostpath.snapshot_dir(snap.snapshot_id)) == original

    restored = csi.create("data-restored", required=MiB, snapshot=snap.snapshot_id)
    clone = csi.create("data-clone", required=MiB, volume=src.volume_id)
    # Never smaller than the source, even when asked for less.
    assert restored.capacity_bytes == clone.capacity_bytes == 128 * MiB
    assert digest(hostpath.volume_dir(restored.volume_id)) == original
    assert digest(hostpath.volume_dir(clone.volume_id)) == original


def test_copies_are_independent_of_the_source(hostpath: HostPath) -> None:
    csi = hostpath.csi
    src = csi.create("ind-src")
    src_dir = hostpath.volume_dir(src.volume_id)
    fill(src_dir, seed=2)
    original = digest(src_dir)
    snap = csi.snapshot("ind-snap", src.volume_id)
    restored = csi.create("ind-restored", snapshot=snap.snapshot_id)
    clone = csi.create("ind-clone", volume=src.volume_id)

    # Writes to the source after the snapshot leak nowhere.
    with open(os.path.join(src_dir, "random.bin"), "r+b") as f:
        f.seek(4096)
        f.write(b"CHANGED" * 100)
    with open(os.path.join(src_dir, "sparse.img"), "r+b") as f:
        f.seek(10 * MiB)
        f.write(b"new data in a hole")
    os.remove(os.path.join(src_dir, "sub", "deeper", "text.txt"))
    changed = digest(src_dir)
    assert changed != original
    for copy_dir in (
        hostpath.snapshot_dir(snap.snapshot_id),
        hostpath.volume_dir(restored.volume_id),
        hostpath.volume_dir(clone.volume_id),
    ):
        assert digest(copy_dir) == original

    # Writes to a restored volume leak neither into the snapshot nor the source.
    with open(os.path.join(hostpath.volume_dir(restored.volume_id), "random.bin"), "r+b") as f:
        f.write(b"RESTORED")
    assert digest(hostpath.snapshot_dir(snap.snapshot_id)) == original
    assert digest(src_dir) == changed
    # A second restore still gets the snapshot's bytes.
    again = csi.create("ind-restored-2", snapshot=snap.snapshot_id)
    assert digest(hostpath.volume_dir(again.volume_id)) == original


def test_sparse_files_stay_sparse(hostpath: HostPath) -> None:
    csi = hostpath.csi
    src = csi.create("sparse-src")
    fill(hostpath.volume_dir(src.volume_id), seed=3)
    snap = csi.snapshot("sparse-snap", src.volume_id)
    restored = csi.create("sparse-restored", snapshot=snap.snapshot_id)
    for d in (hostpath.snapshot_dir(snap.snapshot_id), hostpath.volume_dir(restored.volume_id)):
        path = os.path.join(d, "sparse.img")
        assert os.path.getsize(path) == 16 * MiB
        assert allocated(path) <= 2 * MiB, f"{path} lost its holes: {allocated(path)} bytes allocated"


def test_group_snapshot_members_restore_one_by_one(hostpath: HostPath) -> None:
    csi = hostpath.csi
    a, b = csi.create("grp-a"), csi.create("grp-b")
    fill(hostpath.volume_dir(a.volume_id), seed=10)
    fill(hostpath.volume_dir(b.volume_id), seed=11)
    with open(os.path.join(hostpath.volume_dir(b.volume_id), "only-in-b"), "w") as f:
        f.write("b")
    want = {
        a.volume_id: digest(hostpath.volume_dir(a.volume_id)),
        b.volume_id: digest(hostpath.volume_dir(b.volume_id)),
    }
    group = csi.group.CreateVolumeGroupSnapshot(
        pb.CreateVolumeGroupSnapshotRequest(name="grp", source_volume_ids=[a.volume_id, b.volume_id])
    ).group_snapshot
    assert group.ready_to_use and len(group.snapshots) == 2
    assert {s.source_volume_id for s in group.snapshots} == {a.volume_id, b.volume_id}
    assert all(s.group_snapshot_id == group.group_snapshot_id for s in group.snapshots)
    fetched = csi.group.GetVolumeGroupSnapshot(
        pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
    ).group_snapshot
    assert fetched == group
    for member in group.snapshots:
        vol = csi.create(f"grp-restore-{member.source_volume_id}", snapshot=member.snapshot_id)
        assert digest(hostpath.volume_dir(vol.volume_id)) == want[member.source_volume_id]
        got = csi.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=member.snapshot_id)).snapshot
        assert got.group_snapshot_id == group.group_snapshot_id
    csi.group.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id, snapshot_ids=[s.snapshot_id for s in group.snapshots]
        )
    )
    for member in group.snapshots:
        assert not os.path.exists(hostpath.snapshot_dir(member.snapshot_id))


def test_expand(hostpath: HostPath) -> None:
    csi = hostpath.csi
    vol = csi.create("grow", required=8 * MiB)
    resp = csi.controller.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=32 * MiB)
        )
    )
    assert resp.capacity_bytes == 32 * MiB and not resp.node_expansion_required
    got = csi.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)).volume
    assert got.capacity_bytes == 32 * MiB
    # Expanding to the size it has, or less than it has, is a no-op answer.
    same = csi.controller.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=16 * MiB)
        )
    )
    assert same.capacity_bytes == 32 * MiB
    # The new size is what idempotent CreateVolume compares against.
    assert csi.create("grow", required=32 * MiB).volume_id == vol.volume_id


def test_get_capacity_matches_statvfs(hostpath: HostPath) -> None:
    resp = hostpath.csi.controller.GetCapacity(pb.GetCapacityRequest())
    st = os.statvfs(hostpath.root)
    assert abs(resp.available_capacity - st.f_bavail * st.f_frsize) <= MiB
    # Advisory sizes (no quota here) refuse no size, so no maximum is reported.
    assert not resp.HasField("maximum_volume_size")
    other_node = pb.GetCapacityRequest(
        accessible_topology=pb.Topology(segments={"topology.hostpath.csi-kit.io/node": "elsewhere"})
    )
    assert hostpath.csi.controller.GetCapacity(other_node).available_capacity == 0


def test_list_volumes_reports_a_deleted_directory_as_abnormal(hostpath: HostPath) -> None:
    csi = hostpath.csi
    vol = csi.create("vanish")
    fill(hostpath.volume_dir(vol.volume_id), seed=4)
    shutil.rmtree(hostpath.volume_dir(vol.volume_id))
    conditions = {
        e.volume.volume_id: e.status.volume_condition
        for e in csi.controller.ListVolumes(pb.ListVolumesRequest()).entries
    }
    assert conditions[vol.volume_id].abnormal
    assert vol.volume_id in conditions[vol.volume_id].message
    assert not any(c.abnormal for vid, c in conditions.items() if vid != vol.volume_id)
    # Snapshots of it fail clearly; deleting it still succeeds.
    req = pb.CreateSnapshotRequest(name="vanish-snap", source_volume_id=vol.volume_id)
    expect(grpc.StatusCode.NOT_FOUND, csi.controller.CreateSnapshot, req, "missing")
    csi.delete(vol.volume_id)


def test_delete_removes_data_and_snapshot_outlives_its_source(hostpath: HostPath) -> None:
    csi = hostpath.csi
    vol = csi.create("gone")
    fill(hostpath.volume_dir(vol.volume_id), seed=5)
    want = digest(hostpath.volume_dir(vol.volume_id))
    snap = csi.snapshot("gone-snap", vol.volume_id)
    csi.delete(vol.volume_id)
    assert not os.path.exists(hostpath.volume_dir(vol.volume_id))
    assert os.listdir(os.path.join(hostpath.root, ".incoming")) == []
    restored = csi.controller.CreateVolume(create_req("gone-restored", snapshot=snap.snapshot_id)).volume
    assert digest(hostpath.volume_dir(restored.volume_id)) == want
    csi.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert not os.path.exists(hostpath.snapshot_dir(snap.snapshot_id))
