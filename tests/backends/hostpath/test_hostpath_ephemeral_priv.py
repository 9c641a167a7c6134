"""CSI inline ephemeral volumes on hostPath: NodePublishVolume with the kubelet's
own volume id and `csi.storage.k8s.io/ephemeral` makes the volume, NodeUnpublish
unmakes it (issue #14)."""

from __future__ import annotations

import os

import grpc
import pytest
from helpers import expect, mount_cap
from hp_helpers import HostPath

from csi_kit._pb import csi_pb2 as pb
from csi_kit.linux.mounts import is_mounted

pytestmark = pytest.mark.privileged

KUBELET_ID = "csi-" + "ab" * 32  # the kubelet's id: csi-<sha256 of pod uid and volume name>


def _context(**extra: str) -> dict[str, str]:
    return {
        "csi.storage.k8s.io/ephemeral": "true",
        "csi.storage.k8s.io/pod.name": "web-0",
        "csi.storage.k8s.io/pod.namespace": "default",
        **extra,
    }


def _publish(hp: HostPath, target: str, volume_id: str = KUBELET_ID, **extra: str) -> None:
    hp.csi.node.NodePublishVolume(
        pb.NodePublishVolumeRequest(
            volume_id=volume_id,
            target_path=target,
            volume_capability=mount_cap(),
            volume_context=_context(**extra),
        )
    )


def test_publish_makes_the_volume_and_unpublish_unmakes_it(hostpath: HostPath, targets: str) -> None:
    target = os.path.join(targets, "inline")
    _publish(hostpath, target, size="16Mi")
    assert is_mounted(target)
    with open(os.path.join(target, "data"), "w") as f:
        f.write("inline")
    (vid,) = hostpath.csi.list_volume_ids()
    assert os.path.exists(os.path.join(hostpath.volume_dir(vid), "data"))
    listed = hostpath.csi.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vid))
    assert listed.volume.capacity_bytes == 16 << 20
    _publish(hostpath, target, size="16Mi")  # the kubelet retries: the same volume, still one
    assert hostpath.csi.list_volume_ids() == [vid]
    stats = hostpath.csi.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=KUBELET_ID, volume_path=target)
    )
    assert {u.unit: u.total for u in stats.usage}[pb.VolumeUsage.BYTES] == 16 << 20
    hostpath.csi.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=KUBELET_ID, target_path=target)
    )
    assert not is_mounted(target) and not os.path.exists(target)
    assert hostpath.csi.list_volume_ids() == []
    assert not os.path.exists(hostpath.volume_dir(vid))
    # Unpublished again (the kubelet retries too): nothing left, still OK.
    hostpath.csi.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=KUBELET_ID, target_path=target)
    )


def test_bad_attributes_make_nothing(hostpath: HostPath, targets: str) -> None:
    target = os.path.join(targets, "bad")
    for extra in ({"size": "lots"}, {"no-such-parameter": "x"}):
        with pytest.raises(grpc.RpcError) as info:
            _publish(hostpath, target, **extra)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert hostpath.csi.list_volume_ids() == []
    assert not os.path.exists(target)


def test_a_failed_publish_leaves_no_volume(hostpath: HostPath, targets: str) -> None:
    """The target's parent is missing: the volume made for it is unmade again."""
    target = os.path.join(targets, "missing-parent", "inline")
    expect(
        grpc.StatusCode.NOT_FOUND,
        hostpath.csi.node.NodePublishVolume,
        pb.NodePublishVolumeRequest(
            volume_id=KUBELET_ID, target_path=target, volume_capability=mount_cap(), volume_context=_context()
        ),
    )
    assert hostpath.csi.list_volume_ids() == []
