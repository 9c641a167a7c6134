"""The attacher on the fake API against a scripted CSI driver over real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from volume_peer import FAST, LoopEnv, VolumeCSI, eventually, make_bound, make_node, settle

from csi_kit.k8s.objects.resources import CSI_NODE, PV, VOLUME_ATTACHMENT
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import Obj
from csi_kit.k8s.runtime.csi import CSIClient, DriverInfo
from csi_kit.k8s.volume.attacher import Attacher
from csi_kit.k8s.volume.protocol import ANN_NODE_ID, attacher_finalizer
from csi_kit.testing.fake_k8s import FakeKubeAPI

FIN = "external-attacher/vol-csi-kit-io"


class Env(LoopEnv[Attacher]):
    def make(self, info: DriverInfo) -> Attacher:
        return Attacher(self.api, self.client, info, **FAST)


@pytest.fixture
async def env(api: FakeKubeAPI, volume_csi: VolumeCSI, csi_client: CSIClient) -> AsyncIterator[Env]:
    async with Env(api, csi_client, volume_csi) as e:
        yield e


async def attach(
    api: FakeKubeAPI,
    name: str = "va-1",
    pv: str = "pv-data",
    node: str = "node-1",
    driver: str = "vol.csi-kit.io",
) -> Obj:
    return await api.create(
        VOLUME_ATTACHMENT,
        {
            "metadata": {"name": name},
            "spec": {"attacher": driver, "nodeName": node, "source": {"persistentVolumeName": pv}},
        },
    )


def va(api: FakeKubeAPI, name: str = "va-1") -> Obj | None:
    return api.peek(VOLUME_ATTACHMENT, name)


def attached(api: FakeKubeAPI, name: str = "va-1") -> bool:
    return bool(((va(api, name) or {}).get("status") or {}).get("attached"))


def test_finalizer_name_matches_upstream_sanitising() -> None:
    assert attacher_finalizer("vol.csi-kit.io") == FIN
    assert attacher_finalizer("example.com/csi-") == "external-attacher/example-com-csi-X"


async def test_attach_and_detach(env: Env) -> None:
    await make_node(env.api, "node-1", node_id="backend-node-17")
    await make_bound(env.api, csi_extra={"volumeAttributes": {"pool": "a"}, "readOnly": True})
    await env.start()
    await attach(env.api)
    await eventually(lambda: attached(env.api), "attached")
    v = va(env.api)
    assert v is not None
    assert FIN in k.finalizers_of(v)
    assert k.annotations_of(v)[ANN_NODE_ID] == "backend-node-17"
    assert v["status"]["attachmentMetadata"] == {"devicePath": "/dev/fake/vol-data"}
    assert FIN in k.finalizers_of(env.api.peek(PV, "pv-data") or {})
    (req,) = env.peer.requests["ControllerPublishVolume"]
    assert (req.volume_id, req.node_id, req.readonly) == ("vol-data", "backend-node-17", True)
    assert dict(req.volume_context) == {"pool": "a"}
    assert env.peer.published == {("vol-data", "backend-node-17")}

    await env.api.delete(VOLUME_ATTACHMENT, "va-1")
    await eventually(lambda: va(env.api) is None, "attachment gone")
    assert env.peer.published == set()
    # The PV keeps our finalizer until it is deleted and unused, then loses it.
    await env.api.delete(PV, "pv-data")
    await eventually(lambda: env.api.peek(PV, "pv-data") is None, "PV gone")


async def test_detach_uses_the_recorded_node_id_after_the_node_is_gone(env: Env) -> None:
    await make_node(env.api, "node-1", node_id="n17")
    await make_bound(env.api)
    await env.start()
    await attach(env.api)
    await eventually(lambda: attached(env.api), "attached")
    await env.api.delete(CSI_NODE, "node-1")
    await env.api.delete(VOLUME_ATTACHMENT, "va-1")
    await eventually(lambda: va(env.api) is None, "attachment gone")
    assert env.peer.requests["ControllerUnpublishVolume"][0].node_id == "n17"


async def test_attach_error_is_reported_retried_and_cleared(env: Env) -> None:
    await make_node(env.api, "node-1")
    await make_bound(env.api)
    env.peer.fail("ControllerPublishVolume", grpc.StatusCode.INTERNAL, "controller busy", times=1000)
    await env.start()
    await attach(env.api)
    await eventually(lambda: ((va(env.api) or {}).get("status") or {}).get("attachError"), "attach error")
    assert "controller busy" in (va(env.api) or {})["status"]["attachError"]["message"]
    env.peer.errors.clear()
    await eventually(lambda: attached(env.api), "attached after retries")
    assert "attachError" not in (va(env.api) or {})["status"]


async def test_deleted_while_publish_failed_still_unpublishes(env: Env) -> None:
    """A timed-out publish may have attached the volume: the finalizer makes detach run anyway."""
    await make_node(env.api, "node-1")
    await make_bound(env.api)
    env.peer.fail("ControllerPublishVolume", grpc.StatusCode.DEADLINE_EXCEEDED, "slow", times=1000)
    await env.start()
    await attach(env.api)
    await eventually(lambda: env.peer.calls["ControllerPublishVolume"] >= 1, "publish tried")
    await env.api.delete(VOLUME_ATTACHMENT, "va-1")
    await eventually(lambda: va(env.api) is None, "attachment gone")
    assert env.peer.calls["ControllerUnpublishVolume"] == 1


async def test_detach_error_keeps_the_attachment(env: Env) -> None:
    await make_node(env.api, "node-1")
    await make_bound(env.api)
    await env.start()
    await attach(env.api)
    await eventually(lambda: attached(env.api), "attached")
    env.peer.fail("ControllerUnpublishVolume", grpc.StatusCode.INTERNAL, "stuck", times=1000)
    await env.api.delete(VOLUME_ATTACHMENT, "va-1")
    await eventually(lambda: ((va(env.api) or {}).get("status") or {}).get("detachError"), "detach error")
    assert "stuck" in (va(env.api) or {})["status"]["detachError"]["message"]
    assert env.peer.published == {("vol-data", "node-1")}
    env.peer.errors.clear()
    await eventually(lambda: va(env.api) is None, "attachment gone after retries")
    assert env.peer.published == set()


async def test_restart_mid_publish_attaches_once(env: Env) -> None:
    await make_node(env.api, "node-1")
    await make_bound(env.api)
    await env.start()
    gate = env.peer.hold("ControllerPublishVolume")
    await attach(env.api)
    await eventually(lambda: env.peer.calls["ControllerPublishVolume"] >= 1, "publish in flight")
    await env.stop()
    gate.set()
    await env.start()
    await eventually(lambda: attached(env.api), "attached after restart")
    assert env.peer.published == {("vol-data", "node-1")}


async def test_missing_csinode_is_reported_and_retried(env: Env) -> None:
    await make_bound(env.api)
    await env.start()
    await attach(env.api)
    await eventually(lambda: ((va(env.api) or {}).get("status") or {}).get("attachError"), "attach error")
    assert env.peer.calls["ControllerPublishVolume"] == 0
    await make_node(env.api, "node-1")
    await eventually(lambda: attached(env.api), "attached once the node registered")


async def test_driver_without_publish_is_marked_attached_without_a_call(env: Env) -> None:
    env.peer.controller_caps.discard("PUBLISH_UNPUBLISH_VOLUME")
    await make_bound(env.api)
    await env.start()
    await attach(env.api)
    await eventually(lambda: attached(env.api), "attached")
    assert k.finalizers_of(va(env.api) or {}) == []
    await env.api.delete(VOLUME_ATTACHMENT, "va-1")
    await eventually(lambda: va(env.api) is None, "gone")
    assert env.peer.calls["ControllerPublishVolume"] == 0 and env.peer.calls["ControllerUnpublishVolume"] == 0


async def test_other_drivers_attachments_are_left_alone(env: Env) -> None:
    await make_node(env.api, "node-1")
    await make_bound(env.api)
    await env.start()
    await attach(env.api, driver="other.example.com")
    await settle(env.api)
    assert not attached(env.api) and env.peer.calls["ControllerPublishVolume"] == 0
