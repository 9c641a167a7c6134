"""The node side against hostile paths (issue #11, findings 1-4): the real
hostPath driver, real bind mounts, in the private mount namespace the test
run lives in.  Each case checks the answer and that nothing was mounted,
unmounted or removed that the request should not have touched."""

from __future__ import annotations

import os

import grpc
import pytest
from helpers import block_cap, expect, mount_cap
from hp_helpers import HostPath

from csi_kit._pb import csi_pb2 as pb
from csi_kit.linux.mounts import is_mounted, mounts_at, read_mountinfo

pytestmark = pytest.mark.privileged

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _publish_req(volume_id: str, target: str, cap: object = None) -> pb.NodePublishVolumeRequest:
    return pb.NodePublishVolumeRequest(
        volume_id=volume_id, target_path=target, volume_capability=cap or mount_cap()
    )


def _mount_table() -> set[tuple[int, str]]:
    return {(m.mount_id, m.mount_point) for m in read_mountinfo()}


def test_publish_refuses_a_symlinked_target_or_parent(hostpath: HostPath, targets: str) -> None:
    """Finding 1: the bind used to land on the link's destination (/etc, the backend root...)."""
    vol = hostpath.csi.create("attack-link")
    victim = os.path.join(targets, "victim")
    os.mkdir(victim)
    with open(os.path.join(victim, "canary"), "w") as f:
        f.write("intact")
    os.symlink(victim, os.path.join(targets, "link"))
    os.symlink(os.path.join(victim, "canary"), os.path.join(targets, "filelink"))
    os.symlink(targets, os.path.join(targets, "parentlink"))
    before = _mount_table()
    for target in ("link", "filelink", "parentlink/victim", "link/inside"):
        expect(
            INVALID,
            hostpath.csi.node.NodePublishVolume,
            _publish_req(vol.volume_id, os.path.join(targets, target)),
            "symlink",
        )
    assert _mount_table() == before
    assert os.listdir(victim) == ["canary"]
    assert os.path.islink(os.path.join(targets, "link"))
    # Block access on a link to a file: INVALID_ARGUMENT too (it was INTERNAL FileExistsError).
    req = _publish_req(vol.volume_id, os.path.join(targets, "filelink"), block_cap())
    err = hostpath.csi.node.NodePublishVolume
    with pytest.raises(grpc.RpcError) as info:
        err(req)
    assert info.value.code() in (INVALID, grpc.StatusCode.FAILED_PRECONDITION)


def test_unpublish_through_a_symlink_leaves_the_real_mount(hostpath: HostPath, targets: str) -> None:
    """Finding 1, the other half: unpublish via a link neither answers OK leaving the mount, nor unmounts."""
    vol = hostpath.csi.create("attack-unlink")
    target = os.path.join(targets, "real")
    hostpath.csi.node.NodePublishVolume(_publish_req(vol.volume_id, target))
    os.symlink(target, os.path.join(targets, "alias"))
    os.symlink(targets, os.path.join(targets, "up"))
    for path in ("alias", "up/real"):
        expect(
            INVALID,
            hostpath.csi.node.NodeUnpublishVolume,
            pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=os.path.join(targets, path)),
        )
    assert is_mounted(target)
    hostpath.csi.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
    )
    assert not is_mounted(target) and not os.path.exists(target)


def test_unpublish_of_root_touches_no_mount(hostpath: HostPath) -> None:
    """Finding 2: "/" used to unmount every mount in the namespace."""
    vol = hostpath.csi.create("attack-root")
    before = _mount_table()
    for path in ("/", "//", "/."):
        expect(
            INVALID,
            hostpath.csi.node.NodeUnpublishVolume,
            pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=path),
        )
    assert _mount_table() == before


def test_unpublish_of_a_never_published_path_removes_nothing(hostpath: HostPath, targets: str) -> None:
    """Finding 3: empty directories (a volume's own, .incoming, anyone's) used to be removed."""
    vol = hostpath.csi.create("attack-rmdir")
    empty = os.path.join(targets, "empty")
    os.mkdir(empty)
    hostpath.csi.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=empty)
    )
    assert os.path.isdir(empty)
    for own in (hostpath.volume_dir(vol.volume_id), os.path.join(hostpath.root, ".incoming")):
        expect(
            INVALID,
            hostpath.csi.node.NodeUnpublishVolume,
            pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=own),
            "driver's own directory",
        )
        assert os.path.isdir(own)


def test_publish_inside_the_drivers_roots_is_refused(hostpath: HostPath) -> None:
    """Finding 4: one volume mounted over another (or over the driver's state)."""
    a = hostpath.csi.create("attack-over-a")
    b = hostpath.csi.create("attack-over-b")
    before = _mount_table()
    for target in (
        hostpath.volume_dir(b.volume_id),
        os.path.join(hostpath.root, "volumes"),
        os.path.join(hostpath.state, "anything"),
        os.path.dirname(hostpath.state.rstrip("/")),  # above the state dir: would hide it
    ):
        expect(INVALID, hostpath.csi.node.NodePublishVolume, _publish_req(a.volume_id, target))
    assert _mount_table() == before


def test_a_foreign_mount_at_the_target_is_neither_adopted_nor_undone(
    hostpath: HostPath, targets: str
) -> None:
    """A target that is already someone else's mount point: publish refuses, unpublish leaves it."""
    from csi_kit.linux.mounts import bind_mount, unmount

    vol = hostpath.csi.create("attack-foreign")
    foreign_src, target = os.path.join(targets, "src"), os.path.join(targets, "busy")
    os.mkdir(foreign_src)
    os.mkdir(target)
    bind_mount(foreign_src, target)
    try:
        expect(
            grpc.StatusCode.FAILED_PRECONDITION,
            hostpath.csi.node.NodePublishVolume,
            _publish_req(vol.volume_id, target),
        )
        hostpath.csi.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
        )
        assert len(mounts_at(target)) == 1
    finally:
        unmount(target)


def test_ids_that_are_not_one_component_never_reach_the_backend(hostpath: HostPath, targets: str) -> None:
    """Finding 7 for node RPCs: ids like '..' or '/' used to be joined into the bind source."""
    before = _mount_table()
    for bad in ("..", "/", "/etc", "a/../../b", "x\ny"):
        expect(
            INVALID,
            hostpath.csi.node.NodePublishVolume,
            _publish_req(bad, os.path.join(targets, "t")),
            "volume_id",
        )
        expect(
            INVALID,
            hostpath.csi.node.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(volume_id=bad, volume_path=targets),
            "volume_id",
        )
    assert _mount_table() == before
    assert not os.path.exists(os.path.join(targets, "t"))


def test_stats_and_expand_of_unknown_volumes_are_not_found(hostpath: HostPath) -> None:
    """csi-sanity: an unknown volume is NOT_FOUND whatever the path, even a relative one."""
    for path in ("some/path", "/tmp"):
        expect(
            grpc.StatusCode.NOT_FOUND,
            hostpath.csi.node.NodeGetVolumeStats,
            pb.NodeGetVolumeStatsRequest(volume_id="no-such-volume", volume_path=path),
        )
    expect(
        grpc.StatusCode.NOT_FOUND,
        hostpath.csi.node.NodeExpandVolume,
        pb.NodeExpandVolumeRequest(volume_id="no-such-volume", volume_path="some/path"),
    )
