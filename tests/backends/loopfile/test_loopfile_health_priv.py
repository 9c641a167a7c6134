"""loopfile volume health with real loop devices: the health monitor's Event
when a published volume's image is deleted underneath, and what
NodeGetVolumeStats tells the kubelet when a raw block volume's loop device
is detached behind the driver's back.  (The node side of a deleted image is
test_loopfile_node's test_stats_and_a_missing_image_reported_as_abnormal.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from loopfile_helpers import DRIVER, Csi, MiB

from csi_kit.k8s.objects.resources import EVENT, PV, PVC
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import Obj
from csi_kit.k8s.runtime.csi import CSIClient
from csi_kit.k8s.runtime.events import EventRecorder
from csi_kit.k8s.volume.health import COMPONENT_PREFIX, REASON_ABNORMAL, HealthMonitor
from csi_kit.linux import loop
from csi_kit.testing.fake_k8s import FakeKubeAPI

pytestmark = pytest.mark.privileged


async def _bound_claim(api: FakeKubeAPI, name: str, volume_id: str) -> Obj:
    """A claim and its PV as the PV controller leaves them once bound; the claim."""
    pvc = await api.create(
        PVC,
        {
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "32Mi"}},
                "volumeName": f"pv-{name}",
            },
        },
    )
    pv = await api.create(
        PV,
        {
            "metadata": {"name": f"pv-{name}"},
            "spec": {
                "capacity": {"storage": "32Mi"},
                "accessModes": ["ReadWriteOnce"],
                "claimRef": {"namespace": "default", "name": name, "uid": k.uid_of(pvc)},
                "csi": {"driver": DRIVER, "volumeHandle": volume_id},
            },
        },
    )
    pv["status"] = {"phase": "Bound"}
    await api.update_status(PV, pv)
    return pvc


def _events_on(api: FakeKubeAPI, claim: Obj) -> list[Obj]:
    return [e for e in api.objects(EVENT) if e["involvedObject"].get("uid") == k.uid_of(claim)]


async def _until(pred: Callable[[], Any], what: str, limit: float = 120.0) -> Any:
    """Poll until `pred()` is truthy; the limit only bounds a hang."""
    deadline = asyncio.get_running_loop().time() + limit
    while not (value := pred()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
    return value


async def test_a_deleted_image_becomes_an_event_on_the_claim(csi: Csi, driver_root: Path) -> None:
    api = FakeKubeAPI()
    sick, well = csi.create(32 * MiB), csi.create(32 * MiB)
    for vol in (sick, well):
        csi.mount(vol.volume_id)
    sick_claim = await _bound_claim(api, "sick", sick.volume_id)
    well_claim = await _bound_claim(api, "well", well.volume_id)
    client = CSIClient(f"unix://{csi.work / 'csi.sock'}", timeout=30)
    events = EventRecorder(api, COMPONENT_PREFIX + DRIVER)
    monitor = HealthMonitor(api, client, await client.driver_info(), interval=0.02, events=events)
    assert monitor.mode == "list"
    task = asyncio.create_task(monitor.run())
    try:
        await _until(lambda: monitor.checks["pv-sick"] >= 3 and monitor.checks["pv-well"] >= 3, "checks")
        assert api.objects(EVENT) == []

        image = str(driver_root / "volumes" / f"{sick.volume_id}.img")
        os.unlink(image)  # lost behind the driver's back, while mounted
        (event,) = await _until(lambda: _events_on(api, sick_claim), "the abnormal Event")
        assert (event["type"], event["reason"]) == ("Warning", REASON_ABNORMAL)
        assert event["message"] == f"image file {image} is missing"
        seen = monitor.checks["pv-sick"]
        await _until(lambda: monitor.checks["pv-sick"] >= seen + 3, "more checks")
        await events.flush()
        assert len(_events_on(api, sick_claim)) == 1 and _events_on(api, well_claim) == []
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await events.flush()
        await client.close()
    for vol in (sick, well):
        csi.umount(vol.volume_id)
        csi.delete(vol.volume_id)


def test_stats_of_a_block_volume_whose_device_was_detached_are_abnormal(csi: Csi, driver_root: Path) -> None:
    vol = csi.create(32 * MiB, block=True)
    staging = csi.stage(vol.volume_id, block=True)
    target = csi.publish(vol.volume_id, block=True)
    assert not csi.stats(vol.volume_id, target).volume_condition.abnormal
    (device,) = loop.devices_of(str(driver_root / "volumes" / f"{vol.volume_id}.img"))
    assert loop.detach(device)  # nothing holds a raw block volume's device open
    for path in (staging, target):
        condition = csi.stats(vol.volume_id, path).volume_condition
        assert condition.abnormal and condition.message == "the volume's device is detached", path
    csi.unpublish(vol.volume_id)
    csi.unstage(vol.volume_id)
    csi.delete(vol.volume_id)
