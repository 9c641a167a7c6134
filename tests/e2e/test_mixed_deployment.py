"""The mixed deployment many clusters have: the distribution's upstream snapshot-controller
(the shipped binary, distributed snapshotting on) with only csi_kit's snapshotter loop
(``--controllers snapshotter`` instead of ``snapshot``) next to csi_kit's provisioner.

The upstream controller creates and labels the VolumeSnapshotContent; csi_kit's per-node
snapshotter takes it, cuts the snapshot, and a restore reads the data back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import Deployments, timed
from e2e_walk import Flavor, Walk

from csi_kit.testing.cluster import Cluster

pytestmark = pytest.mark.e2e

FLAVOR = Flavor("hostpath+upstream-snapshot-controller", "hostpath", "csi-kit-hostpath")


@pytest.fixture(scope="module")
def walk(cluster: Cluster, deployments: Deployments) -> Iterator[Walk]:
    controllers = "snapshotter,provisioner,resizer,capacity,registration,liveness"
    deployments.get("hostpath", controllers, upstream_snapshot_controller=True)
    w = Walk(cluster, FLAVOR, "e2e-mixed")
    try:
        yield w
    finally:
        w.cleanup()


@pytest.mark.privileged
def test_upstream_snapshot_controller_with_our_snapshotter(walk: Walk) -> None:
    w, name = walk, FLAVOR.name
    with timed("provision (WaitForFirstConsumer) + writer pod", name):
        w.claim("data")
        w.writer("writer", "data", "hello-mixed")
        w.wait_log("writer", "written")
    with timed("snapshot readyToUse", name):
        w.snapshot("data-snap", "data")
        snap = w.wait_ready("volumesnapshot", "data-snap")
    content = w.api.get(
        f"/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/{snap['status']['boundVolumeSnapshotContentName']}"
    )
    # Made by the upstream controller (its distributed-snapshotting label), cut by our snapshotter.
    assert content["metadata"]["labels"]["snapshot.storage.kubernetes.io/managed-by"] == "csi-kit-node"
    assert content["status"]["snapshotHandle"]
    src = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "data-snap"}
    with timed("restore + reader pod", name):
        w.claim("data-restored", source=src)
        w.reader("reader", "data-restored", 12)
        assert w.read("reader").strip() == "hello-mixed"
    with timed("delete everything", name):
        w.cleanup()
    assert not w.volume_handles()
