"""Volume health through the real components: the health-monitor loop (upstream's
external-health-monitor-controller) records a VolumeConditionAbnormal Event on the claim
whose hostPath directory was removed underneath it, and the kubelet reads the same abnormal
condition through NodeGetVolumeStats without an error."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Deployments, timed
from e2e_walk import Flavor, Walk

from csi_kit.testing.cluster import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

FLAVOR = Flavor("hostpath health", "hostpath", "csi-kit-hostpath")
CONTROLLERS = "snapshot,provisioner,resizer,capacity,registration,liveness,health-monitor"


@pytest.fixture
def walk(cluster: Cluster, deployments: Deployments) -> Iterator[tuple[Walk, Path]]:
    deployment = deployments.get(
        "hostpath",
        CONTROLLERS,
        extra_env={"CSI_KIT_MONITOR_INTERVAL": "2"},
        extra_manifests=("rbac-health-monitor.yaml",),
    )
    w = Walk(cluster, FLAVOR, "e2e-health")
    try:
        yield w, deployment.data_dir
    finally:
        w.cleanup()


def _abnormal_events(w: Walk, claim: str) -> list[dict[str, Any]]:
    events = w.api.get(f"/api/v1/namespaces/{w.ns}/events")["items"]
    return [
        e
        for e in events
        if e["reason"] == "VolumeConditionAbnormal"
        and e["involvedObject"]["kind"] == "PersistentVolumeClaim"
        and e["involvedObject"]["name"] == claim
    ]


def test_a_removed_volume_directory_becomes_an_event_on_its_claim(walk: tuple[Walk, Path]) -> None:
    w, data_dir = walk
    w.claim("data")
    w.writer("writer", "data", "healthy")
    w.wait_log("writer", "written")
    pv = w.wait_bound("data")["spec"]["volumeName"]
    handle = w.api.get(f"/api/v1/persistentvolumes/{pv}")["spec"]["csi"]["volumeHandle"]
    assert not _abnormal_events(w, "data"), "a healthy volume gets no event"
    with timed("health: directory removed -> VolumeConditionAbnormal event", FLAVOR.name):
        shutil.rmtree(data_dir / "volumes" / handle)
        w.api.wait(
            f"/api/v1/namespaces/{w.ns}/events",
            lambda _: _abnormal_events(w, "data"),
            "a VolumeConditionAbnormal event on claim data",
            60,
        )
    (event,) = _abnormal_events(w, "data")
    assert event["type"] == "Warning"
    assert "is missing" in event["message"]
