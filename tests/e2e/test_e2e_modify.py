"""Volume modification through the real API server: a VolumeAttributesClass
(storage.k8s.io/v1) named by a claim is applied by the resizer loop's modifier with
ControllerModifyVolume, and the claim's status says which class is in force."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Deployments, timed
from e2e_walk import Flavor, Walk

from csi_kit.testing.cluster import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

FLAVOR = Flavor("loopfile modify", "loopfile", "csi-kit-loopfile", fstype="ext4")
VAC = "/apis/storage.k8s.io/v1/volumeattributesclasses"


@pytest.fixture
def walk(cluster: Cluster, deployments: Deployments) -> Iterator[tuple[Walk, Path]]:
    deployment = deployments.get("loopfile")
    w = Walk(cluster, FLAVOR, "e2e-modify")
    try:
        yield w, deployment.data_dir
    finally:
        w.cleanup()
        for name in ("preallocated", "bogus"):
            if w.api.find(f"{VAC}/{name}") is not None:
                w.api.delete(f"{VAC}/{name}")


def _class(w: Walk, name: str, parameters: dict[str, str]) -> None:
    w.api.create(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "VolumeAttributesClass",
            "metadata": {"name": name},
            "driverName": "loopfile.csi-kit.io",
            "parameters": parameters,
        }
    )


def test_a_claims_attributes_class_is_applied(walk: tuple[Walk, Path]) -> None:
    w, data_dir = walk
    w.claim("data")
    w.writer("writer", "data", "modify-me")
    w.wait_log("writer", "written")
    pv = w.wait_bound("data")["spec"]["volumeName"]
    handle = w.api.get(f"/api/v1/persistentvolumes/{pv}")["spec"]["csi"]["volumeHandle"]
    image = data_dir / "volumes" / f"{handle}.img"
    sparse_blocks = os.stat(image).st_blocks
    _class(w, "preallocated", {"allocation": "preallocated"})
    with timed("modify: VolumeAttributesClass applied", FLAVOR.name):
        w.api.patch(w.path("pvc", "data"), {"spec": {"volumeAttributesClassName": "preallocated"}})
        claim = w.api.wait(
            w.path("pvc", "data"),
            lambda c: (c.get("status") or {}).get("currentVolumeAttributesClassName") == "preallocated",
            "claim's current VolumeAttributesClass preallocated",
            60,
        )
    assert not (claim["status"].get("modifyVolumeStatus") or {}), claim["status"]
    assert os.stat(image).st_blocks * 512 >= 1 << 30 > sparse_blocks * 512, "the image is now fully allocated"
    assert (
        w.api.get(f"/api/v1/persistentvolumes/{pv}")["spec"].get("volumeAttributesClassName")
        == "preallocated"
    )
    # A class the driver refuses: Infeasible, and the volume keeps the class in force.
    _class(w, "bogus", {"no-such-key": "x"})
    with timed("modify: infeasible class reported", FLAVOR.name):
        w.api.patch(w.path("pvc", "data"), {"spec": {"volumeAttributesClassName": "bogus"}})
        claim = w.api.wait(
            w.path("pvc", "data"),
            lambda c: ((c.get("status") or {}).get("modifyVolumeStatus") or {}).get("status") == "Infeasible",
            "modifyVolumeStatus Infeasible",
            60,
        )
    assert claim["status"]["currentVolumeAttributesClassName"] == "preallocated"
    assert w.last("writer", "df") or w.log("writer"), "the pod kept running"
