"""hostPath volume health on the node: what NodeGetVolumeStats tells the kubelet
about a published volume whose directory was removed behind the driver's back."""

from __future__ import annotations

import os
import shutil

import pytest
from hp_helpers import HostPath
from test_hostpath_node_priv import publish, unpublish

from csi_kit._pb import csi_pb2 as pb

pytestmark = pytest.mark.privileged


def test_stats_of_a_volume_whose_directory_was_removed_are_abnormal(hostpath: HostPath, targets: str) -> None:
    vol = hostpath.csi.create("health")
    target = os.path.join(targets, "health")
    publish(hostpath, vol.volume_id, target)
    request = pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target)
    assert not hostpath.csi.node.NodeGetVolumeStats(request, timeout=30).volume_condition.abnormal

    shutil.rmtree(hostpath.volume_dir(vol.volume_id))  # the bind mount still shows the (now unlinked) tree
    condition = hostpath.csi.node.NodeGetVolumeStats(request, timeout=30).volume_condition
    assert condition.abnormal and condition.message == "volume directory is missing"
    # The controller side says the same, with the path (what the health monitor's Event carries).
    got = hostpath.csi.controller.ControllerGetVolume(
        pb.ControllerGetVolumeRequest(volume_id=vol.volume_id), timeout=30
    )
    assert (
        got.status.volume_condition.message
        == f"volume directory {hostpath.volume_dir(vol.volume_id)} is missing"
    )
    unpublish(hostpath, vol.volume_id, target)
    hostpath.csi.delete(vol.volume_id)
