"""The resizer on the fake API against a scripted CSI driver over real gRPC."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from volume_peer import (
    GiB,
    KubeletSim,
    ResizerEnv,
    VolumeCSI,
    claim,
    eventually,
    make_bound,
    run_tasks,
    settle,
)

from csi_kit.k8s.objects.quantity import parse_quantity
from csi_kit.k8s.objects.resources import PV, PVC, SECRET
from csi_kit.k8s.runtime.api import ApiError, Obj
from csi_kit.k8s.runtime.csi import CSIClient
from csi_kit.k8s.volume.resizer import (
    COND_ERROR,
    COND_FS_PENDING,
    IN_PROGRESS,
    INFEASIBLE,
    NODE_PENDING,
    Resizer,
)
from csi_kit.testing.fake_k8s import FakeKubeAPI


class Env(ResizerEnv):
    async def start_kubelet(self, *claims: str) -> KubeletSim:
        """The node's kubelet, with a running pod using each of `claims`."""
        kubelet = KubeletSim(self.api, self.client.endpoint)
        self.tasks += await run_tasks(kubelet)
        for name in claims:
            kubelet.mount(name)
        return kubelet


@pytest.fixture
async def env(api: FakeKubeAPI, volume_csi: VolumeCSI, csi_client: CSIClient) -> AsyncIterator[Env]:
    async with Env(api, csi_client, volume_csi) as e:
        yield e


async def ask(api: FakeKubeAPI, size: str, name: str = "data") -> None:
    await api.patch(PVC, name, {"spec": {"resources": {"requests": {"storage": size}}}}, "default")


def status(api: FakeKubeAPI, name: str = "data") -> dict[str, Any]:
    c = claim(api, name)
    assert c is not None
    st: dict[str, Any] = c.get("status") or {}
    return st


def conditions(api: FakeKubeAPI, name: str = "data") -> set[str]:
    return {c["type"] for c in status(api, name).get("conditions") or []}


def pv_size(api: FakeKubeAPI, name: str = "data") -> int:
    pv = api.peek(PV, f"pv-{name}")
    assert pv is not None
    return parse_quantity(pv["spec"]["capacity"]["storage"])


def cap(api: FakeKubeAPI, name: str = "data") -> int:
    return parse_quantity((status(api, name).get("capacity") or {}).get("storage", 0))


async def test_online_expansion_updates_pv_and_claim(env: Env) -> None:
    await make_bound(env.api)
    await env.start()
    await ask(env.api, "2Gi")
    await eventually(lambda: cap(env.api) == 2 * GiB, "claim capacity 2Gi")
    assert pv_size(env.api) == 2 * GiB
    (req,) = env.peer.requests["ControllerExpandVolume"]
    assert req.volume_id == "vol-data" and req.capacity_range.required_bytes == 2 * GiB
    assert req.volume_capability.access_mode.mode != 0
    st = status(env.api)
    assert "allocatedResourceStatuses" not in st and not conditions(env.api)
    assert st["allocatedResources"]["storage"] == "2Gi"


async def test_node_side_expansion_is_left_to_the_kubelet(env: Env) -> None:
    env.peer.node_expansion_required = True
    await make_bound(env.api)
    await env.start()
    await ask(env.api, "3Gi")
    await eventually(
        lambda: status(env.api).get("allocatedResourceStatuses", {}).get("storage") == NODE_PENDING, ""
    )
    assert COND_FS_PENDING in conditions(env.api)
    assert pv_size(env.api) == 3 * GiB and cap(env.api) == GiB
    # The kubelet grows the filesystem and records it; the resizer has nothing more to do.
    c = claim(env.api)
    assert c is not None
    await env.api.patch(
        PVC,
        "data",
        {"status": {"capacity": {"storage": "3Gi"}, "allocatedResourceStatuses": None, "conditions": None}},
        "default",
        status=True,
    )
    await settle(env.api)
    assert env.peer.calls["ControllerExpandVolume"] == 1 and cap(env.api) == 3 * GiB


async def test_the_kubelets_node_expansion_is_not_fought(env: Env) -> None:
    """Issue #13: kubelet 1.36 marks NodeResizeInProgress, calls NodeExpandVolume, then patches the
    claim with the resourceVersion of its mark.  A resizer that takes NodeResizeInProgress for its
    own turn expands again and rewrites the claim meanwhile: the kubelet's patch meets 409 and the
    claim cycles NodeResizeInProgress → ControllerResizeInProgress → NodeResizePending for ever."""
    env.peer.node_expansion_required = True
    await make_bound(env.api)
    await env.start()
    kubelet = await env.start_kubelet("data")
    # The node's filesystem growth takes longer than the controller needs to react to the claim.
    env.peer.node_expand_work = lambda: settle(env.api, rounds=20)
    await ask(env.api, "3Gi")
    await eventually(
        lambda: cap(env.api) == 3 * GiB or kubelet.conflicts >= 2, "the kubelet finishing (or being fought)"
    )
    assert kubelet.conflicts == 0, f"the kubelet met conflicts; it read the claim as {kubelet.trail}"
    assert cap(env.api) == 3 * GiB and pv_size(env.api) == 3 * GiB
    await settle(env.api)
    assert env.peer.calls["ControllerExpandVolume"] == 1 and env.peer.calls["NodeExpandVolume"] == 1
    assert kubelet.trail == ["NodeResizePending"]
    st = status(env.api)
    assert "allocatedResourceStatuses" not in st and not conditions(env.api)
    assert st["allocatedResources"]["storage"] == "3Gi"


async def test_a_larger_request_waits_for_the_node_expansion_under_way(env: Env) -> None:
    env.peer.node_expansion_required = True
    await make_bound(env.api)
    await env.start()
    await env.start_kubelet("data")
    gate = env.peer.hold("NodeExpandVolume")
    await ask(env.api, "3Gi")
    await eventually(lambda: env.peer.calls["NodeExpandVolume"] >= 1, "node expansion in flight")
    await ask(env.api, "5Gi")
    await settle(env.api)
    assert status(env.api)["allocatedResourceStatuses"]["storage"] == "NodeResizeInProgress"
    assert env.peer.calls["ControllerExpandVolume"] == 1, "no controller expansion while the node is at work"
    gate.set()
    await eventually(lambda: cap(env.api) == 5 * GiB, "grown to 5Gi")
    sizes = [r.capacity_range.required_bytes for r in env.peer.requests["ControllerExpandVolume"]]
    assert sizes == [3 * GiB, 5 * GiB]
    assert env.peer.requests["NodeExpandVolume"][-1].capacity_range.required_bytes == 5 * GiB


async def test_a_node_expansion_that_failed_for_good_is_handed_back_to_the_kubelet(env: Env) -> None:
    """NodeResizeInfeasible: the controller side is redone at the allocated size, then the kubelet retries."""
    env.peer.node_expansion_required = True
    await make_bound(env.api)
    env.peer.fail("NodeExpandVolume", grpc.StatusCode.INVALID_ARGUMENT, "not now")
    await env.start()
    kubelet = await env.start_kubelet("data")
    await ask(env.api, "3Gi")
    await eventually(lambda: cap(env.api) == 3 * GiB, "grown after the node's retry")
    assert "NodeResizeInfeasible" in kubelet.trail or env.peer.calls["ControllerExpandVolume"] == 2
    assert [r.capacity_range.required_bytes for r in env.peer.requests["ControllerExpandVolume"]] == [
        3 * GiB
    ] * 2
    assert env.peer.calls["NodeExpandVolume"] == 2 and not conditions(env.api)


async def test_node_only_driver_gets_the_trivial_resizer(env: Env) -> None:
    env.peer.controller_caps.discard("EXPAND_VOLUME")
    await make_bound(env.api)
    await env.start()
    await ask(env.api, "2Gi")
    await eventually(
        lambda: status(env.api).get("allocatedResourceStatuses", {}).get("storage") == NODE_PENDING, ""
    )
    assert env.peer.calls["ControllerExpandVolume"] == 0
    assert pv_size(env.api) == 2 * GiB


async def test_final_error_then_user_lowers_the_request_to_recover(env: Env) -> None:
    await make_bound(env.api)
    env.peer.fail("ControllerExpandVolume", grpc.StatusCode.OUT_OF_RANGE, "too big for the pool", times=1000)
    await env.start()
    await ask(env.api, "100Gi")
    await eventually(
        lambda: status(env.api).get("allocatedResourceStatuses", {}).get("storage") == INFEASIBLE, ""
    )
    assert COND_ERROR in conditions(env.api)
    await ask(env.api, "2Gi")
    await eventually(
        lambda: status(env.api).get("allocatedResources", {}).get("storage") == "2Gi", "retrying at 2Gi"
    )
    env.peer.errors.clear()
    await eventually(lambda: cap(env.api) == 2 * GiB, "recovered at 2Gi")
    assert pv_size(env.api) == 2 * GiB
    assert env.peer.requests["ControllerExpandVolume"][-1].capacity_range.required_bytes == 2 * GiB
    assert not conditions(env.api)


async def test_after_a_final_error_the_request_cannot_go_back_to_the_capacity(env: Env) -> None:
    """The API server keeps a lowered request above status.capacity; the claim stays Infeasible."""
    await make_bound(env.api)
    env.peer.fail("ControllerExpandVolume", grpc.StatusCode.OUT_OF_RANGE, "no", times=1000)
    await env.start()
    await ask(env.api, "100Gi")
    await eventually(
        lambda: status(env.api).get("allocatedResourceStatuses", {}).get("storage") == INFEASIBLE, ""
    )
    with pytest.raises(ApiError) as e:
        await ask(env.api, "1Gi")
    assert e.value.code == 422
    assert status(env.api)["allocatedResourceStatuses"]["storage"] == INFEASIBLE
    assert status(env.api)["allocatedResources"]["storage"] == "100Gi"
    assert pv_size(env.api) == GiB and cap(env.api) == GiB


async def test_a_request_lowered_during_a_non_final_error_is_not_shrunk(env: Env) -> None:
    """The expansion may be running on the storage: finish it at the size it was started with."""
    await make_bound(env.api)
    env.peer.fail("ControllerExpandVolume", grpc.StatusCode.DEADLINE_EXCEEDED, "slow", times=3)
    await env.start()
    await ask(env.api, "5Gi")
    await eventually(lambda: env.peer.calls["ControllerExpandVolume"] >= 1, "first try")
    await ask(env.api, "2Gi")
    await eventually(lambda: cap(env.api) == 5 * GiB, "finished at 5Gi")
    assert {r.capacity_range.required_bytes for r in env.peer.requests["ControllerExpandVolume"]} == {5 * GiB}


async def test_restart_mid_expansion_finishes_it(env: Env) -> None:
    await make_bound(env.api)
    await env.start()
    gate = env.peer.hold("ControllerExpandVolume")
    await ask(env.api, "4Gi")
    await eventually(lambda: env.peer.calls["ControllerExpandVolume"] >= 1, "expansion in flight")
    assert status(env.api)["allocatedResourceStatuses"]["storage"] == IN_PROGRESS
    await env.stop()
    gate.set()
    await env.start()
    await eventually(lambda: cap(env.api) == 4 * GiB, "finished after restart")
    await settle(env.api)
    assert pv_size(env.api) == 4 * GiB
    assert {r.capacity_range.required_bytes for r in env.peer.requests["ControllerExpandVolume"]} == {4 * GiB}


async def test_secrets_come_from_the_pv(env: Env) -> None:
    await env.api.create(
        SECRET,
        {
            "metadata": {"name": "exp", "namespace": "kube-system"},
            "data": {"k": base64.b64encode(b"v").decode()},
        },
    )
    await make_bound(
        env.api, csi_extra={"controllerExpandSecretRef": {"name": "exp", "namespace": "kube-system"}}
    )
    await env.start()
    await ask(env.api, "2Gi")
    await eventually(lambda: cap(env.api) == 2 * GiB, "expanded")
    assert dict(env.peer.requests["ControllerExpandVolume"][0].secrets) == {"k": "v"}


async def test_claims_not_ours_unbound_or_not_growing_are_left_alone(env: Env) -> None:
    await make_bound(env.api, "theirs", driver="other.example.com")
    await make_bound(env.api, "same")
    pvc: Obj = {
        "metadata": {"name": "pending", "namespace": "default"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "9Gi"}}},
    }
    await env.api.create(PVC, pvc)
    await env.start()
    await ask(env.api, "5Gi", "theirs")
    await ask(env.api, "1Gi", "same")  # the same size is not expansion
    await settle(env.api)
    assert env.peer.calls["ControllerExpandVolume"] == 0


async def test_bad_size_in_a_claim_is_reported_not_sent(env: Env) -> None:
    await make_bound(env.api)
    await env.start()
    await ask(env.api, "a-lot")
    await settle(env.api)
    assert env.peer.calls["ControllerExpandVolume"] == 0


async def test_per_node_resizer_grows_only_its_nodes_volumes(env: Env) -> None:
    for name, node in (("here", "n1"), ("there", "n2")):
        await make_bound(env.api, name)
        expr = {"key": "topology.vol.csi-kit.io/node", "operator": "In", "values": [node]}
        affinity = {"required": {"nodeSelectorTerms": [{"matchExpressions": [expr]}]}}
        await env.api.patch(PV, f"pv-{name}", {"spec": {"nodeAffinity": affinity}})
    info = await env.client.driver_info()
    r = Resizer(
        env.api, env.client, info, node_topology={"topology.vol.csi-kit.io/node": "n1"}, base_delay=0.01
    )
    env.tasks += await run_tasks(r)
    await ask(env.api, "2Gi", "here")
    await ask(env.api, "2Gi", "there")
    await eventually(lambda: cap(env.api, "here") == 2 * GiB, "own volume grown")
    await settle(env.api)
    assert cap(env.api, "there") == GiB
    assert [q.volume_id for q in env.peer.requests["ControllerExpandVolume"]] == ["vol-here"]
