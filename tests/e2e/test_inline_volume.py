"""CSI inline ephemeral volumes through a real kubelet: a pod names a `csi:` volume of the
driver with volumeAttributes; the kubelet's NodePublishVolume makes it, the pod writes to it,
and deleting the pod unmakes it (the backend is empty again)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Deployments, timed
from e2e_walk import Flavor, Walk

from csi_kit.testing.cluster import BUSYBOX_IMAGE, Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

FLAVORS = [
    Flavor("hostpath inline", "hostpath", "csi-kit-hostpath"),
    Flavor("loopfile inline ext4", "loopfile", "csi-kit-loopfile", fstype="ext4"),
]


def _volumes(data_dir: Path) -> list[str]:
    directory = data_dir / "volumes"
    return sorted(os.listdir(directory)) if directory.is_dir() else []


@pytest.fixture(params=FLAVORS, ids=[f.backend for f in FLAVORS])
def walk(
    request: pytest.FixtureRequest, cluster: Cluster, deployments: Deployments
) -> Iterator[tuple[Walk, Path]]:
    flavor: Flavor = request.param
    deployment = deployments.get(flavor.backend)
    w = Walk(cluster, flavor, f"e2e-inline-{flavor.backend}")
    try:
        yield w, deployment.data_dir
    finally:
        w.cleanup()


def test_inline_volume_lives_and_dies_with_its_pod(walk: tuple[Walk, Path]) -> None:
    w, data_dir = walk
    name = w.flavor.name
    before = _volumes(data_dir)
    csi: dict[str, Any] = {"driver": f"{w.flavor.backend}.csi-kit.io", "volumeAttributes": {"size": "64Mi"}}
    if w.flavor.fstype:
        csi["fsType"] = w.flavor.fstype
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "inline", "namespace": w.ns},
        "spec": {
            "hostNetwork": True,
            "dnsPolicy": "Default",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "app",
                    "image": BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": [
                        "sh",
                        "-c",
                        "echo inline > /data/f && sync && echo written $(cat /data/f); "
                        "while true; do sleep 1; done",
                    ],
                    "volumeMounts": [{"name": "scratch", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "scratch", "csi": csi}],
        },
    }
    with timed("inline volume: pod running and writing", name):
        w.api.create(pod)
        w.wait_log("inline", "written inline", timeout=90)
    made = [v for v in _volumes(data_dir) if v not in before]
    assert len(made) == 1, f"one volume made for the pod, found {made}"
    with timed("inline volume: pod deleted, volume gone", name):
        w.api.delete(w.path("pod", "inline"))
        w.api.wait(w.path("pod", "inline"), lambda p: p is None, "inline pod gone", 90)
        w.api.wait(
            "/api/v1/namespaces",  # any cheap read: the condition is on the backend's directory
            lambda _: made[0] not in _volumes(data_dir),
            "the inline volume deleted from the backend",
            60,
        )
