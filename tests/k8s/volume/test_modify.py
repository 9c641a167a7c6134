"""VolumeAttributesClass changes in the resizer loop, on the fake API.

Against the real loopfile driver (its ``allocation`` mutable parameter: the
image is checked, not only the API objects) and against the scripted
`VolumeCSI` where a test needs to hold or fail ControllerModifyVolume, or a
driver without MODIFY_VOLUME.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from volume_peer import (
    DRIVER,
    ResizerEnv,
    VolumeCSI,
    claim,
    eventually,
    make_bound,
    settle,
)

from csi_kit.k8s.objects.resources import EVENT, PV, PVC, VOLUME_ATTRIBUTES_CLASS
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import Obj
from csi_kit.k8s.runtime.csi import Capability, CSIClient
from csi_kit.k8s.volume.modifier import COND_MODIFY_ERROR, COND_MODIFYING, IN_PROGRESS, INFEASIBLE, PENDING
from csi_kit.testing.driver import running_driver
from csi_kit.testing.fake_k8s import FakeKubeAPI

LOOPFILE = "loopfile.csi-kit.io"
MiB = 1 << 20


async def make_vac(api: FakeKubeAPI, name: str, driver: str, **parameters: str) -> None:
    await api.create(
        VOLUME_ATTRIBUTES_CLASS, {"metadata": {"name": name}, "driverName": driver, "parameters": parameters}
    )


async def choose(api: FakeKubeAPI, vac: str, name: str = "data") -> None:
    await api.patch(PVC, name, {"spec": {"volumeAttributesClassName": vac}}, "default")


def status(api: FakeKubeAPI, name: str = "data") -> dict[str, Any]:
    c = claim(api, name)
    assert c is not None
    st: dict[str, Any] = c.get("status") or {}
    return st


def modify_status(api: FakeKubeAPI, name: str = "data") -> tuple[str, str] | None:
    mvs = status(api, name).get("modifyVolumeStatus")
    return None if mvs is None else (mvs["status"], mvs.get("targetVolumeAttributesClassName", ""))


def conditions(api: FakeKubeAPI, name: str = "data") -> set[str]:
    return {c["type"] for c in status(api, name).get("conditions") or []}


def current(api: FakeKubeAPI, name: str = "data") -> str | None:
    value: str | None = status(api, name).get("currentVolumeAttributesClassName")
    return value


def pv_class(api: FakeKubeAPI, name: str = "data") -> str | None:
    pv = api.peek(PV, f"pv-{name}")
    assert pv is not None
    value: str | None = pv["spec"].get("volumeAttributesClassName")
    return value


def reasons(api: FakeKubeAPI, pvc: Obj) -> list[str]:
    return [e["reason"] for e in api.objects(EVENT) if e["involvedObject"].get("uid") == k.uid_of(pvc)]


# ------------------------------------------------------------------ the real loopfile driver


class Loopfile(ResizerEnv):
    def __init__(self, api: FakeKubeAPI, client: CSIClient, state: str) -> None:
        super().__init__(api, client)
        self.state = state

    def image(self, volume_id: str) -> str:
        return os.path.join(self.state, "loopfile", "volumes", f"{volume_id}.img")

    async def bound_volume(self, name: str = "data") -> tuple[Obj, str]:
        made = await self.client.create_volume(
            name,
            required_bytes=16 * MiB,
            limit_bytes=0,
            capabilities=[Capability("SINGLE_NODE_WRITER")],
            parameters={},
            secrets={},
        )
        pvc, _ = await make_bound(self.api, name, driver=LOOPFILE, handle=made.volume_id)
        return pvc, made.volume_id


@pytest.fixture
async def loopfile(api: FakeKubeAPI, tmp_path: Any) -> AsyncIterator[Loopfile]:
    state = str(tmp_path / "driver")
    os.makedirs(state)
    with running_driver(state, backend="loopfile", driver_name=LOOPFILE) as endpoint:
        client = CSIClient(endpoint, timeout=30)
        try:
            async with Loopfile(api, client, state) as env:
                yield env
        finally:
            await client.close()


async def test_a_class_change_modifies_the_volume_and_is_recorded(loopfile: Loopfile) -> None:
    api = loopfile.api
    pvc, volume_id = await loopfile.bound_volume()
    await make_vac(api, "thick", LOOPFILE, allocation="preallocated")
    resizer = await loopfile.start()
    assert resizer.modifier is not None
    assert os.stat(loopfile.image(volume_id)).st_blocks * 512 < 16 * MiB

    await choose(api, "thick")
    await eventually(lambda: current(api) == "thick", "current class thick")
    assert os.stat(loopfile.image(volume_id)).st_blocks * 512 >= 16 * MiB  # the driver really did it
    assert pv_class(api) == "thick"
    assert modify_status(api) is None and not conditions(api)
    await eventually(lambda: "VolumeModifySuccessful" in reasons(api, pvc), "success Event")
    assert "VolumeModify" in reasons(api, pvc)


async def test_an_infeasible_class_then_a_rollback(loopfile: Loopfile) -> None:
    api = loopfile.api
    pvc, volume_id = await loopfile.bound_volume()
    await make_vac(api, "thin", LOOPFILE, allocation="sparse")
    await make_vac(api, "bogus", LOOPFILE, allocation="thick-please")
    await loopfile.start()
    await choose(api, "thin")
    await eventually(lambda: current(api) == "thin", "current class thin")

    await choose(api, "bogus")
    await eventually(lambda: modify_status(api) == (INFEASIBLE, "bogus"), "Infeasible")
    assert {COND_MODIFYING, COND_MODIFY_ERROR} <= conditions(api)
    message = next(c["message"] for c in status(api)["conditions"] if c["type"] == COND_MODIFY_ERROR)
    assert "INVALID_ARGUMENT" in message and "thick-please" in message
    assert current(api) == "thin" and pv_class(api) == "thin"
    await eventually(lambda: "VolumeModifyFailed" in reasons(api, pvc), "failure Event")

    await choose(api, "thin")  # the user goes back to the class the volume has
    await eventually(lambda: modify_status(api) is None, "status cleared")
    assert current(api) == "thin" and not conditions(api)
    assert os.stat(loopfile.image(volume_id)).st_blocks * 512 < 16 * MiB


async def test_a_missing_class_is_pending_until_it_is_created(loopfile: Loopfile) -> None:
    api = loopfile.api
    await loopfile.bound_volume()
    await loopfile.start()
    await choose(api, "later")
    await eventually(lambda: modify_status(api) == (PENDING, "later"), "Pending")
    assert current(api) is None and not conditions(api)
    await make_vac(api, "later", LOOPFILE, allocation="preallocated")
    await eventually(lambda: current(api) == "later", "modified once the class exists")
    assert modify_status(api) is None


# ------------------------------------------------------------------ the scripted driver


@pytest.fixture
async def scripted(
    api: FakeKubeAPI, volume_csi: VolumeCSI, csi_client: CSIClient
) -> AsyncIterator[ResizerEnv]:
    volume_csi.controller_caps.add("MODIFY_VOLUME")
    async with ResizerEnv(api, csi_client, volume_csi) as env:
        yield env


async def bound_with_class(api: FakeKubeAPI, vac: str) -> Obj:
    """A claim and PV already carrying `vac` as their current class (provisioned with it)."""
    _, pv = await make_bound(api)
    await api.patch(PV, k.name_of(pv), {"spec": {"volumeAttributesClassName": vac}})
    await api.patch(PVC, "data", {"spec": {"volumeAttributesClassName": vac}}, "default")
    return await api.patch(
        PVC, "data", {"status": {"currentVolumeAttributesClassName": vac}}, "default", status=True
    )


async def test_in_progress_while_the_driver_works_and_an_uncertain_rollback(scripted: ResizerEnv) -> None:
    api, peer = scripted.api, scripted.peer
    await make_vac(api, "gold", DRIVER, iops="3000")
    await make_vac(api, "silver", DRIVER, iops="1000")
    await bound_with_class(api, "gold")
    gate = peer.hold("ControllerModifyVolume")
    await scripted.start()
    await choose(api, "silver")
    await eventually(lambda: peer.calls["ControllerModifyVolume"] == 1, "the call in flight")
    assert modify_status(api) == (IN_PROGRESS, "silver") and COND_MODIFYING in conditions(api)
    (req,) = peer.requests["ControllerModifyVolume"]
    assert req.volume_id == "vol-data" and dict(req.mutable_parameters) == {"iops": "1000"}

    # The call times out: the volume may be half-way to silver.  The user goes back to gold.
    peer.fail("ControllerModifyVolume", grpc.StatusCode.DEADLINE_EXCEEDED, "slow storage")
    await choose(api, "gold")
    gate.set()
    await eventually(lambda: modify_status(api) is None, "rolled back")
    # Rolled back by asking the driver for gold again, not just by clearing the status.
    assert [dict(r.mutable_parameters) for r in peer.requests["ControllerModifyVolume"]] == [
        {"iops": "1000"},
        {"iops": "3000"},
    ]
    assert current(api) == "gold" and pv_class(api) == "gold" and not conditions(api)


async def test_a_final_error_keeps_in_progress_and_the_retry_completes(scripted: ResizerEnv) -> None:
    api, peer = scripted.api, scripted.peer
    await make_vac(api, "gold", DRIVER, iops="3000")
    await make_bound(api)
    gate = peer.hold("ControllerModifyVolume")
    peer.fail("ControllerModifyVolume", grpc.StatusCode.INTERNAL, "backend hiccup")
    await scripted.start()
    await choose(api, "gold")
    await eventually(lambda: peer.calls["ControllerModifyVolume"] == 1, "first call")
    peer.gates.pop("ControllerModifyVolume")
    gate.set()
    await eventually(lambda: current(api) == "gold", "modified on retry")
    assert peer.calls["ControllerModifyVolume"] == 2
    assert modify_status(api) is None and not conditions(api) and pv_class(api) == "gold"


async def test_a_class_of_another_driver_is_infeasible_without_a_call(scripted: ResizerEnv) -> None:
    api, peer = scripted.api, scripted.peer
    await make_vac(api, "foreign", "other.example.com", iops="1")
    await make_bound(api)
    await scripted.start()
    await choose(api, "foreign")
    await eventually(lambda: modify_status(api) == (INFEASIBLE, "foreign"), "Infeasible")
    await settle(api)
    assert peer.calls["ControllerModifyVolume"] == 0


async def test_a_driver_without_modify_volume_leaves_claims_alone(scripted: ResizerEnv) -> None:
    api, peer = scripted.api, scripted.peer
    peer.controller_caps.discard("MODIFY_VOLUME")
    await make_vac(api, "gold", DRIVER, iops="3000")
    await make_bound(api)
    resizer = await scripted.start()
    assert resizer.modifier is None
    before = status(api)
    await choose(api, "gold")
    await settle(api)
    assert status(api) == before and pv_class(api) is None
    assert peer.calls["ControllerModifyVolume"] == 0


async def test_a_claim_without_a_class_or_of_another_driver_is_not_touched(scripted: ResizerEnv) -> None:
    api, peer = scripted.api, scripted.peer
    await make_vac(api, "gold", DRIVER, iops="3000")
    await make_bound(api, "other", driver="other.example.com")
    await make_bound(api, "plain")
    await scripted.start()
    await choose(api, "gold", "other")
    await settle(api)
    assert "modifyVolumeStatus" not in status(api, "other") and current(api, "other") is None
    assert "modifyVolumeStatus" not in status(api, "plain")
    assert peer.calls["ControllerModifyVolume"] == 0
