"""The provisioner on the fake API against a scripted CSI driver over real gRPC."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from k8s_helpers import running
from volume_peer import (
    DRIVER,
    TOPO_KEY,
    ClusterSim,
    VolumeCSI,
    bound,
    claim,
    eventually,
    make_claim,
    make_class,
    make_node,
    make_ready_snapshot,
    run_tasks,
    settle,
    stop_tasks,
)

from csi_kit.k8s.objects.quantity import format_quantity, parse_quantity
from csi_kit.k8s.objects.resources import EVENT, PV, PVC, REFERENCE_GRANT, SECRET, VOLUME_SNAPSHOT
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import Obj
from csi_kit.k8s.runtime.csi import CSIClient
from csi_kit.k8s.volume.protocol import (
    ANN_DELETION_SECRET_NAME,
    ANN_PROVISIONED_BY,
    ANN_SELECTED_NODE,
    CLONE_SOURCE_FINALIZER,
    PROVISIONER_IDENTITY_KEY,
    PV_FINALIZER,
    SNAPSHOT_SOURCE_FINALIZER,
    capabilities_for,
)
from csi_kit.k8s.volume.provisioner import Provisioner
from csi_kit.testing.fake_k8s import FakeKubeAPI

GiB = 1 << 30


class Env:
    def __init__(self, api: FakeKubeAPI, peer: VolumeCSI, client: CSIClient) -> None:
        self.api = api
        self.peer = peer
        self.client = client
        self.sim = ClusterSim(api)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.provisioners: dict[str, Provisioner] = {}

    async def start(self, name: str = "main", **kw: Any) -> Provisioner:
        info = await self.client.driver_info()
        kw.setdefault("base_delay", 0.01)
        kw.setdefault("max_delay", 0.05)
        p = Provisioner(self.api, self.client, info, **kw)
        self.provisioners[name] = p
        (self.tasks[name],) = await run_tasks(p)
        return p

    async def stop(self, name: str = "main") -> None:
        await stop_tasks([self.tasks.pop(name)])

    async def close(self) -> None:
        await stop_tasks(list(self.tasks.values()))

    def events(self, reason: str) -> list[Obj]:
        return [e for e in self.api.objects(EVENT) if e.get("reason") == reason]


@pytest.fixture
async def env(api: FakeKubeAPI, volume_csi: VolumeCSI, csi_client: CSIClient) -> AsyncIterator[Env]:
    e = Env(api, volume_csi, csi_client)
    async with running(e.sim):
        try:
            yield e
        finally:
            await e.close()


async def provisioned(env: Env, name: str = "data", ns: str = "default") -> Obj:
    await eventually(lambda: bound(env.api, name, ns), f"claim {ns}/{name} bound")
    c = claim(env.api, name, ns)
    assert c is not None
    pv = env.api.peek(PV, c["spec"]["volumeName"])
    assert pv is not None
    return pv


# ------------------------------------------------------------------ basics


async def test_claim_gets_a_volume_and_a_pv_with_the_upstream_fields(env: Env) -> None:
    await make_class(env.api, mount_options=["noatime"], params={"tier": "gold"})
    await env.start()
    pvc = await make_claim(env.api, size="3Gi", modes=["ReadWriteOnce", "ReadOnlyMany"])
    pv = await provisioned(env)

    assert k.name_of(pv) == "pvc-" + k.uid_of(pvc)
    assert k.annotations_of(pv)[ANN_PROVISIONED_BY] == DRIVER
    assert k.finalizers_of(pv) == [PV_FINALIZER]
    spec = pv["spec"]
    assert spec["capacity"] == {"storage": "3Gi"}
    assert spec["accessModes"] == ["ReadWriteOnce", "ReadOnlyMany"]
    assert spec["persistentVolumeReclaimPolicy"] == "Delete"
    assert spec["storageClassName"] == "fast"
    assert spec["mountOptions"] == ["noatime"]
    assert spec["volumeMode"] == "Filesystem"
    assert spec["claimRef"]["uid"] == k.uid_of(pvc) and spec["claimRef"]["name"] == "data"
    csi = spec["csi"]
    assert csi["driver"] == DRIVER
    assert csi["volumeHandle"] == next(iter(env.peer.volumes.values())).volume_id
    assert csi["volumeAttributes"]["made-by"] == "scripted"
    assert PROVISIONER_IDENTITY_KEY in csi["volumeAttributes"]

    (req,) = env.peer.requests["CreateVolume"]
    assert req.name == k.name_of(pv)
    assert req.capacity_range.required_bytes == 3 * GiB
    assert dict(req.parameters) == {"tier": "gold"}
    modes = sorted(c.access_mode.mode for c in req.volume_capabilities)
    assert len(modes) == 2
    assert all(c.mount.mount_flags == ["noatime"] for c in req.volume_capabilities)
    assert env.events("ProvisioningSucceeded")


async def test_block_claim_and_fstype_parameter(env: Env) -> None:
    await make_class(env.api, params={"csi.storage.k8s.io/fstype": "xfs"})
    await env.start()
    await make_claim(env.api, "blk", block=True)
    await make_claim(env.api, "fs")
    blk = await provisioned(env, "blk")
    fs = await provisioned(env, "fs")
    assert "fsType" not in blk["spec"]["csi"] and blk["spec"]["volumeMode"] == "Block"
    assert fs["spec"]["csi"]["fsType"] == "xfs"
    by_name = {r.name: r for r in env.peer.requests["CreateVolume"]}
    assert by_name[k.name_of(blk)].volume_capabilities[0].HasField("block")
    assert by_name[k.name_of(fs)].volume_capabilities[0].mount.fs_type == "xfs"
    assert all(dict(r.parameters) == {} for r in by_name.values())  # the prefixed key is stripped


async def test_claims_of_other_drivers_and_unannotated_claims_are_left_alone(env: Env) -> None:
    await make_class(env.api, "other", driver="other.example.com")
    await env.start()
    await make_claim(env.api, "theirs", cls="other")
    # No StorageClass object at all: the PV controller never annotates it for us.
    await make_claim(env.api, "static", cls="")
    await settle(env.api)
    assert env.peer.calls["CreateVolume"] == 0
    assert env.api.objects(PV) == []


async def test_secrets_are_resolved_passed_and_recorded_for_deletion(env: Env) -> None:
    await env.api.create(
        SECRET,
        {
            "metadata": {"name": "creds", "namespace": "default"},
            "data": {"key": base64.b64encode(b"s3cr3t").decode()},
        },
    )
    await make_class(
        env.api,
        params={
            "csi.storage.k8s.io/provisioner-secret-name": "creds",
            "csi.storage.k8s.io/provisioner-secret-namespace": "${pvc.namespace}",
            "csi.storage.k8s.io/node-publish-secret-name": "${pvc.name}-np",
            "csi.storage.k8s.io/node-publish-secret-namespace": "${pvc.namespace}",
            "size-hint": "x",
        },
    )
    await env.start(extra_create_metadata=True)
    await make_claim(env.api)
    pv = await provisioned(env)
    (req,) = env.peer.requests["CreateVolume"]
    assert dict(req.secrets) == {"key": "s3cr3t"}
    assert dict(req.parameters) == {
        "size-hint": "x",
        "csi.storage.k8s.io/pvc/name": "data",
        "csi.storage.k8s.io/pvc/namespace": "default",
        "csi.storage.k8s.io/pv/name": k.name_of(pv),
    }
    assert k.annotations_of(pv)[ANN_DELETION_SECRET_NAME] == "creds"
    assert pv["spec"]["csi"]["nodePublishSecretRef"] == {"name": "data-np", "namespace": "default"}
    # Deletion uses the recorded secret.
    await env.api.delete(PVC, "data", "default")
    await eventually(lambda: env.api.peek(PV, k.name_of(pv)) is None, "PV deleted")
    (dreq,) = env.peer.requests["DeleteVolume"]
    assert dict(dreq.secrets) == {"key": "s3cr3t"}


async def test_unknown_reserved_parameter_and_missing_secret_are_refused_before_any_create(env: Env) -> None:
    await make_class(env.api, "typo", params={"csi.storage.k8s.io/provisioner-secret-nmae": "x"})
    await make_class(
        env.api,
        "nosecret",
        params={
            "csi.storage.k8s.io/provisioner-secret-name": "absent",
            "csi.storage.k8s.io/provisioner-secret-namespace": "default",
        },
    )
    await env.start()
    await make_claim(env.api, "a", cls="typo")
    await make_claim(env.api, "b", cls="nosecret")
    await eventually(lambda: len(env.events("ProvisioningFailed")) >= 2, "two failure events")
    msgs = " ".join(e["message"] for e in env.events("ProvisioningFailed"))
    assert "unknown parameter key" in msgs and "absent not found" in msgs
    assert env.peer.calls["CreateVolume"] == 0


async def test_a_secret_value_that_is_not_base64_text_is_refused_in_one_line(env: Env) -> None:
    await env.api.create(
        SECRET, {"metadata": {"name": "mangled", "namespace": "default"}, "data": {"key": "not base64!"}}
    )
    await make_class(
        env.api,
        "mangled",
        params={
            "csi.storage.k8s.io/provisioner-secret-name": "mangled",
            "csi.storage.k8s.io/provisioner-secret-namespace": "default",
        },
    )
    await env.start()
    await make_claim(env.api, "a", cls="mangled")
    await eventually(lambda: env.events("ProvisioningFailed"), "a failure event")
    (msg,) = {e["message"] for e in env.events("ProvisioningFailed")}
    assert "secret default/mangled holds a value that is not base64 of UTF-8 text" in msg
    assert "not base64!" not in msg and "\n" not in msg
    assert env.peer.calls["CreateVolume"] == 0


# ---------------------------------------------------------- delete / retain


async def test_released_pv_with_delete_policy_is_deleted_on_the_backend(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    await make_claim(env.api)
    pv = await provisioned(env)
    handle = pv["spec"]["csi"]["volumeHandle"]
    await env.api.delete(PVC, "data", "default")
    await eventually(lambda: env.api.peek(PV, k.name_of(pv)) is None, "PV gone")
    assert env.peer.deleted == [handle]
    assert env.peer.volumes == {}


async def test_retain_keeps_volume_and_pv(env: Env) -> None:
    await make_class(env.api, policy="Retain")
    await env.start()
    await make_claim(env.api)
    pv = await provisioned(env)
    assert PV_FINALIZER not in k.finalizers_of(pv)
    await env.api.delete(PVC, "data", "default")
    await eventually(
        lambda: ((env.api.peek(PV, k.name_of(pv)) or {}).get("status") or {}).get("phase") == "Released",
        "released",
    )
    await settle(env.api)
    assert env.peer.calls["DeleteVolume"] == 0
    assert env.api.peek(PV, k.name_of(pv)) is not None


async def test_delete_failure_is_retried_and_reported(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    await make_claim(env.api)
    pv = await provisioned(env)
    env.peer.fail("DeleteVolume", grpc.StatusCode.INTERNAL, "disk busy", times=2)
    await env.api.delete(PVC, "data", "default")
    await eventually(lambda: env.api.peek(PV, k.name_of(pv)) is None, "PV gone after retries")
    assert env.peer.calls["DeleteVolume"] == 3
    assert any("disk busy" in e["message"] for e in env.events("VolumeFailedDelete"))


async def test_deleting_a_pv_object_directly_still_deletes_the_volume(env: Env) -> None:
    """The provisioner finalizer (HonorPVReclaimPolicy): a PV deleted before its claim does not leak."""
    await make_class(env.api)
    await env.start()
    await make_claim(env.api)
    pv = await provisioned(env)
    await env.api.delete(PVC, "data", "default")
    await env.api.delete(PV, k.name_of(pv))
    await eventually(lambda: env.api.peek(PV, k.name_of(pv)) is None, "PV gone")
    assert env.peer.volumes == {}


# --------------------------------------------------------------- topology


async def test_wait_for_first_consumer_waits_for_the_selected_node(env: Env) -> None:
    await make_class(env.api, binding="WaitForFirstConsumer")
    await make_node(env.api, "node-7")
    await env.start()
    pvc = await make_claim(env.api)
    await settle(env.api)
    assert env.peer.calls["CreateVolume"] == 0
    pvc = claim(env.api) or pvc
    await env.api.patch(PVC, "data", {"metadata": {"annotations": {ANN_SELECTED_NODE: "node-7"}}}, "default")
    pv = await provisioned(env)
    (req,) = env.peer.requests["CreateVolume"]
    assert [dict(t.segments) for t in req.accessibility_requirements.requisite] == [{TOPO_KEY: "node-7"}]
    assert [dict(t.segments) for t in req.accessibility_requirements.preferred] == [{TOPO_KEY: "node-7"}]
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": TOPO_KEY, "operator": "In", "values": ["node-7"]}]}]


async def test_allowed_topologies_become_the_requisite(env: Env) -> None:
    await make_class(env.api, allowed=[{TOPO_KEY: ["node-a", "node-b"]}])
    await env.start()
    await make_claim(env.api)
    await provisioned(env)
    (req,) = env.peer.requests["CreateVolume"]
    assert sorted(t.segments[TOPO_KEY] for t in req.accessibility_requirements.requisite) == [
        "node-a",
        "node-b",
    ]


async def test_selected_node_outside_allowed_topologies_is_refused(env: Env) -> None:
    await make_class(env.api, binding="WaitForFirstConsumer", allowed=[{TOPO_KEY: ["node-a"]}])
    await make_node(env.api, "node-z")
    await env.start()
    await make_claim(env.api, node="node-z")
    await eventually(lambda: env.events("ProvisioningFailed"), "failure event")
    assert env.peer.calls["CreateVolume"] == 0


async def test_resource_exhausted_on_the_selected_node_reschedules(env: Env) -> None:
    await make_class(env.api, binding="WaitForFirstConsumer")
    await make_node(env.api, "node-1")
    await env.start()
    env.peer.fail("CreateVolume", grpc.StatusCode.RESOURCE_EXHAUSTED, "node full")
    await make_claim(env.api, node="node-1")
    await eventually(
        lambda: ANN_SELECTED_NODE not in k.annotations_of(claim(env.api) or {}), "annotation removed"
    )
    await settle(env.api)
    assert env.peer.calls["CreateVolume"] == 1
    assert env.api.objects(PV) == []
    # The scheduler picks a node again: provisioning goes on.
    await env.api.patch(PVC, "data", {"metadata": {"annotations": {ANN_SELECTED_NODE: "node-1"}}}, "default")
    await provisioned(env)


async def test_resource_exhausted_without_a_selected_node_is_retried_with_the_same_name(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    env.peer.fail("CreateVolume", grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", times=2)
    await make_claim(env.api)
    await provisioned(env)
    names = {r.name for r in env.peer.requests["CreateVolume"]}
    assert len(names) == 1 and env.peer.calls["CreateVolume"] == 3
    assert len(env.peer.volumes) == 1


# ------------------------------------------------------- timeouts, restarts


async def test_timeout_means_may_exist_and_is_retried_with_the_same_name(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    env.peer.fail("CreateVolume", grpc.StatusCode.DEADLINE_EXCEEDED, "slow backend", times=3)
    await make_claim(env.api)
    await provisioned(env)
    assert env.peer.calls["CreateVolume"] == 4
    assert len({r.name for r in env.peer.requests["CreateVolume"]}) == 1
    assert len(env.peer.volumes) == 1 and len(env.api.objects(PV)) == 1


async def test_claim_deleted_while_create_is_in_progress_leaks_nothing(env: Env) -> None:
    await make_class(env.api)
    p = await env.start(base_delay=0.3, max_delay=0.3)
    # The first answer is lost after the backend made the volume (as a timeout would).
    env.peer.fail("CreateVolume", grpc.StatusCode.DEADLINE_EXCEEDED, "lost")
    real = env.peer.CreateVolume

    async def create_then_lose(request: Any, context: Any) -> Any:
        if env.peer.calls["CreateVolume"] == 0:
            env.peer.errors["CreateVolume"] = []
            await real(request, context)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "answer lost")
        return await real(request, context)

    env.peer.CreateVolume = create_then_lose  # type: ignore[method-assign]
    await make_claim(env.api)
    await eventually(lambda: p.in_progress, "create in progress")
    await env.api.delete(PVC, "data", "default")
    await eventually(lambda: env.peer.deleted, "orphan deleted")
    await settle(env.api)
    assert env.peer.volumes == {}
    assert env.api.objects(PV) == []
    assert not p.in_progress


async def test_restart_while_create_is_in_flight_makes_one_volume(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    gate = env.peer.hold("CreateVolume")
    await make_claim(env.api)
    await eventually(lambda: env.peer.calls["CreateVolume"] >= 1, "create in flight")
    await env.stop()  # crash: the in-flight call is abandoned
    gate.set()
    await env.start()
    await provisioned(env)
    await settle(env.api)
    assert len(env.peer.volumes) == 1
    assert len(env.api.objects(PV)) == 1


async def test_restart_between_create_volume_and_saving_the_pv(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    env.api.fail("create", PV, times=1000)
    await make_claim(env.api)
    await eventually(lambda: env.peer.calls["CreateVolume"] >= 1, "volume made")
    await env.stop()
    env.api.reactors.clear()
    await env.start()
    await provisioned(env)
    assert len(env.peer.volumes) == 1
    assert len({r.name for r in env.peer.requests["CreateVolume"]}) == 1


async def test_leader_hand_over_mid_create(env: Env) -> None:
    """The old leader stops mid-call (what losing the lease does); the new one finishes with the same name."""
    await make_class(env.api)
    await env.start("a")
    gate = env.peer.hold("CreateVolume")
    await make_claim(env.api)
    await eventually(lambda: env.peer.calls["CreateVolume"] >= 1, "create in flight")
    await env.stop("a")
    await env.start("b")
    await eventually(lambda: env.peer.calls["CreateVolume"] >= 2, "new leader asks again")
    gate.set()
    await provisioned(env)
    await settle(env.api)
    assert len(env.peer.volumes) == 1 and len(env.api.objects(PV)) == 1


async def test_pv_already_exists_after_restart_is_not_recreated(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    await make_claim(env.api)
    await provisioned(env)
    calls = env.peer.calls["CreateVolume"]
    await env.stop()
    await env.start()
    await settle(env.api)
    assert env.peer.calls["CreateVolume"] == calls


# ------------------------------------------------------------ data sources


async def test_restore_from_a_ready_snapshot(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    await make_ready_snapshot(env.api, handle="snap-xyz", size="2Gi")
    src = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}
    await make_claim(env.api, "restored", size="2Gi", source=src)
    await provisioned(env, "restored")
    (req,) = env.peer.requests["CreateVolume"]
    assert req.volume_content_source.snapshot.snapshot_id == "snap-xyz"
    # The source protection is gone once the claim has its volume.
    await eventually(
        lambda: (
            SNAPSHOT_SOURCE_FINALIZER
            not in k.finalizers_of(env.api.peek(VOLUME_SNAPSHOT, "snap", "default") or {})
        ),
        "snapshot released",
    )


async def test_snapshot_is_protected_while_provisioning(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    await make_ready_snapshot(env.api)
    gate = env.peer.hold("CreateVolume")
    src = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}
    await make_claim(env.api, "restored", source=src)
    await eventually(lambda: env.peer.calls["CreateVolume"] >= 1, "create in flight")
    snap = env.api.peek(VOLUME_SNAPSHOT, "snap", "default")
    assert snap is not None and SNAPSHOT_SOURCE_FINALIZER in k.finalizers_of(snap)
    gate.set()
    await provisioned(env, "restored")


async def test_restore_waits_for_a_snapshot_that_is_not_ready_or_not_there(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    src = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}
    await make_claim(env.api, "restored", source=src)
    await eventually(
        lambda: any("not found" in e["message"] for e in env.events("ProvisioningFailed")), "not found"
    )
    snap = await make_ready_snapshot(env.api, ready=False)
    await eventually(
        lambda: any("not Ready" in e["message"] for e in env.events("ProvisioningFailed")), "not ready"
    )
    assert env.peer.calls["CreateVolume"] == 0
    snap["status"]["readyToUse"] = True
    await env.api.update_status(VOLUME_SNAPSHOT, snap)
    await provisioned(env, "restored")


async def test_restore_smaller_than_the_snapshot_is_refused(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    await make_ready_snapshot(env.api, size="5Gi")
    src = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}
    await make_claim(env.api, "restored", size="1Gi", source=src)
    await eventually(
        lambda: any("less than the size" in e["message"] for e in env.events("ProvisioningFailed")), ""
    )
    assert env.peer.calls["CreateVolume"] == 0


async def test_snapshot_of_another_driver_is_refused(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    await make_ready_snapshot(env.api, driver="other.example.com")
    src = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}
    await make_claim(env.api, "restored", source=src)
    await eventually(
        lambda: any("belongs to driver" in e["message"] for e in env.events("ProvisioningFailed")), ""
    )
    assert env.peer.calls["CreateVolume"] == 0


async def test_clone_of_a_bound_claim(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    await make_claim(env.api, "source", size="2Gi")
    src_pv = await provisioned(env, "source")
    gate = env.peer.hold("CreateVolume")
    await make_claim(env.api, "copy", size="2Gi", source={"kind": "PersistentVolumeClaim", "name": "source"})
    await eventually(lambda: env.peer.calls["CreateVolume"] >= 2, "clone in flight")
    assert CLONE_SOURCE_FINALIZER in k.finalizers_of(claim(env.api, "source") or {})
    gate.set()
    await provisioned(env, "copy")
    req = env.peer.requests["CreateVolume"][-1]
    assert req.volume_content_source.volume.volume_id == src_pv["spec"]["csi"]["volumeHandle"]
    await eventually(
        lambda: CLONE_SOURCE_FINALIZER not in k.finalizers_of(claim(env.api, "source") or {}),
        "source released",
    )


async def test_clone_source_not_bound_not_found_or_too_big(env: Env) -> None:
    await make_class(env.api)
    await make_class(env.api, "slow")
    await env.start()
    await make_claim(env.api, "copy", source={"kind": "PersistentVolumeClaim", "name": "missing"})
    await eventually(
        lambda: any("not found" in e["message"] for e in env.events("ProvisioningFailed")), "missing"
    )
    await make_claim(env.api, "big", size="4Gi")
    await provisioned(env, "big")
    await make_claim(env.api, "small", size="1Gi", source={"kind": "PersistentVolumeClaim", "name": "big"})
    await eventually(
        lambda: any("greater than or equal" in e["message"] for e in env.events("ProvisioningFailed")),
        "too small",
    )
    await make_claim(
        env.api,
        "other-class",
        cls="slow",
        size="4Gi",
        source={"kind": "PersistentVolumeClaim", "name": "big"},
    )
    await eventually(
        lambda: any("same storage class" in e["message"] for e in env.events("ProvisioningFailed")), ""
    )
    assert env.peer.calls["CreateVolume"] == 1


async def test_populator_data_sources_are_not_ours(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    await make_claim(env.api, source={"apiGroup": "populators.example.com", "kind": "Blob", "name": "b"})
    await settle(env.api)
    assert env.peer.calls["CreateVolume"] == 0


# ------------------------------------------------------------- hostile input


@pytest.mark.parametrize("size", ["lots", "-1Gi", "1e40", "", "1Qi", "9999999Ei"])
async def test_bad_sizes_are_reported_not_sent(env: Env, size: str) -> None:
    await make_class(env.api)
    await env.start()
    await make_claim(env.api, size=size)
    await eventually(lambda: env.events("ProvisioningFailed"), "failure event")
    assert env.peer.calls["CreateVolume"] == 0


async def test_unknown_class_is_reported_and_picked_up_when_it_appears(env: Env) -> None:
    await env.start()
    await make_claim(env.api, cls="later", annotate=DRIVER)
    await eventually(
        lambda: any("not found" in e["message"] for e in env.events("ProvisioningFailed")), "event"
    )
    await make_class(env.api, "later")
    await provisioned(env)


async def test_unknown_access_mode_is_refused(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    await make_claim(env.api, modes=["ReadWriteEverywhere"])
    await eventually(lambda: env.events("ProvisioningFailed"), "failure event")
    assert env.peer.calls["CreateVolume"] == 0


async def _two_namespaces(env: Env) -> None:
    await make_class(env.api)
    await make_ready_snapshot(env.api, "snap", "prod")


SRC = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap", "namespace": "prod"}


async def test_cross_namespace_source_refused_when_not_enabled(env: Env) -> None:
    await _two_namespaces(env)
    await env.start()
    await make_claim(env.api, "steal", "dev", source=SRC)
    await eventually(
        lambda: any("another namespace" in e["message"] for e in env.events("ProvisioningFailed")), ""
    )
    assert env.peer.calls["CreateVolume"] == 0


async def test_cross_namespace_source_needs_a_reference_grant(env: Env) -> None:
    await _two_namespaces(env)
    await env.start(cross_namespace=True)
    await make_claim(env.api, "steal", "dev", source=SRC)
    await eventually(
        lambda: any("ReferenceGrant" in e["message"] for e in env.events("ProvisioningFailed")), ""
    )
    assert env.peer.calls["CreateVolume"] == 0
    # A grant for another namespace does not help; the right one does.
    grant = {
        "metadata": {"name": "g", "namespace": "prod"},
        "spec": {
            "from": [{"group": "", "kind": "PersistentVolumeClaim", "namespace": "qa"}],
            "to": [{"group": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot"}],
        },
    }
    await env.api.create(REFERENCE_GRANT, grant)
    p = env.provisioners["main"]
    seen = p.claim_queue.num_requeues("dev/steal")
    await eventually(lambda: p.claim_queue.num_requeues("dev/steal") >= seen + 2, "two more refusals")
    assert env.peer.calls["CreateVolume"] == 0
    grant["metadata"]["name"] = "g2"
    grant["spec"]["from"][0]["namespace"] = "dev"
    await env.api.create(REFERENCE_GRANT, grant)
    await env.api.patch(PVC, "steal", {"metadata": {"labels": {"poke": "1"}}}, "dev")
    await provisioned(env, "steal", "dev")


# --------------------------------------------------------------- per node


def pinned_to(pv: Obj) -> set[tuple[str, str]]:
    (term,) = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    return {(e["key"], v) for e in term["matchExpressions"] for v in e["values"]}


async def test_per_node_provisioners_take_only_their_own_claims(env: Env) -> None:
    await make_class(env.api, binding="WaitForFirstConsumer")
    a = await env.start("a", node_name="node-a", node_topology={TOPO_KEY: "node-a"})
    b = await env.start("b", node_name="node-b", node_topology={TOPO_KEY: "node-b"})
    await make_claim(env.api, "on-a", node="node-a")
    await make_claim(env.api, "on-b", node="node-b")
    await make_claim(env.api, "elsewhere", node="node-c")
    pa = await provisioned(env, "on-a")
    pb = await provisioned(env, "on-b")
    await settle(env.api)
    assert not bound(env.api, "elsewhere")
    assert pinned_to(pa) == {(TOPO_KEY, "node-a"), ("kubernetes.io/hostname", "node-a")}
    assert pinned_to(pb) == {(TOPO_KEY, "node-b"), ("kubernetes.io/hostname", "node-b")}
    assert a.node_name == "node-a" and b.node_name == "node-b"
    # Deletion: each node deletes only its own PVs (both see both PVs).
    await env.api.delete(PVC, "on-a", "default")
    await eventually(lambda: env.api.peek(PV, k.name_of(pa)) is None, "a's PV gone")
    assert [r.volume_id for r in env.peer.requests["DeleteVolume"]] == [pa["spec"]["csi"]["volumeHandle"]]


async def test_per_node_immediate_claims_are_won_by_exactly_one_node(env: Env) -> None:
    await make_class(env.api)
    for n in ("a", "b", "c"):
        await env.start(n, node_name=f"node-{n}", node_topology={TOPO_KEY: f"node-{n}"})
    for i in range(6):
        await make_claim(env.api, f"c{i}")
    for i in range(6):
        await provisioned(env, f"c{i}")
    await settle(env.api)
    assert env.peer.calls["CreateVolume"] == 6
    assert len(env.api.objects(PV)) == 6
    for i in range(6):
        c = claim(env.api, f"c{i}")
        assert c is not None
        node = k.annotations_of(c)[ANN_SELECTED_NODE]
        pv = env.api.peek(PV, c["spec"]["volumeName"])
        assert pv is not None
        assert pinned_to(pv) == {(TOPO_KEY, node), ("kubernetes.io/hostname", node)}


async def test_per_node_without_immediate_binding_leaves_immediate_claims(env: Env) -> None:
    await make_class(env.api)
    await env.start("a", node_name="node-a", node_topology={TOPO_KEY: "node-a"}, immediate_binding=False)
    await make_claim(env.api)
    await settle(env.api)
    assert env.peer.calls["CreateVolume"] == 0


async def test_claim_deleted_before_provisioning_releases_its_snapshot_source(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    await make_ready_snapshot(env.api)
    env.peer.fail("CreateVolume", grpc.StatusCode.INVALID_ARGUMENT, "cannot restore that", times=1000)
    src = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}
    await make_claim(env.api, "restored", source=src)
    await eventually(
        lambda: (
            SNAPSHOT_SOURCE_FINALIZER
            in k.finalizers_of(env.api.peek(VOLUME_SNAPSHOT, "snap", "default") or {})
        ),
        "snapshot protected",
    )
    await env.api.delete(PVC, "restored", "default")
    await eventually(
        lambda: (
            SNAPSHOT_SOURCE_FINALIZER
            not in k.finalizers_of(env.api.peek(VOLUME_SNAPSHOT, "snap", "default") or {})
        ),
        "snapshot released",
    )
    assert env.api.objects(PV) == []


async def test_claim_deleted_before_provisioning_releases_its_clone_source(env: Env) -> None:
    await make_class(env.api)
    await env.start()
    await make_claim(env.api, "source")
    await provisioned(env, "source")
    env.peer.fail("CreateVolume", grpc.StatusCode.INVALID_ARGUMENT, "cannot clone that", times=1000)
    await make_claim(env.api, "copy", source={"kind": "PersistentVolumeClaim", "name": "source"})
    await eventually(
        lambda: CLONE_SOURCE_FINALIZER in k.finalizers_of(claim(env.api, "source") or {}), "protected"
    )
    await env.api.delete(PVC, "copy", "default")
    await eventually(
        lambda: CLONE_SOURCE_FINALIZER not in k.finalizers_of(claim(env.api, "source") or {}),
        "source released",
    )


async def test_a_bound_restored_claim_costs_no_request_on_resync(env: Env) -> None:
    await make_class(env.api)
    p = await env.start()
    await make_ready_snapshot(env.api)
    src = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}
    await make_claim(env.api, "restored", source=src)
    await provisioned(env, "restored")
    await settle(env.api)
    before = env.api.total_requests
    for _ in range(3):
        p.claim_queue.add("default/restored")
        await settle(env.api)
    assert env.api.total_requests == before


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1Gi", 1 << 30),
        ("1.5Gi", 3 << 29),
        ("100M", 100_000_000),
        ("1e3", 1000),
        ("100m", 1),  # milli-bytes round up to a whole byte
        (4096, 4096),
        ("0", 0),
        ("7Ei", 7 << 60),
    ],
)
def test_quantities(text: object, value: int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Gi", "1.2.3Gi", "-1", "1Qi", "1e400", "8Ei", True, " ", "1 Gi x"])
def test_bad_quantities(text: object) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)


def test_quantity_round_trip() -> None:
    for n in (0, 1, 1023, 1024, 3 << 29, 5 << 40, (1 << 30) + 1):
        assert parse_quantity(format_quantity(n)) == n


def test_access_modes_map_as_upstream() -> None:
    def modes(am: list[str], multi: bool) -> list[str]:
        caps = capabilities_for(am, block=False, fs_type="", mount_flags=[], single_node_multi_writer=multi)
        return [c.access_mode for c in caps]

    assert modes(["ReadWriteOnce"], False) == ["SINGLE_NODE_WRITER"]
    assert modes(["ReadWriteOnce"], True) == ["SINGLE_NODE_MULTI_WRITER"]
    assert modes(["ReadWriteOncePod"], False) == ["SINGLE_NODE_WRITER"]
    assert modes(["ReadWriteOncePod"], True) == ["SINGLE_NODE_SINGLE_WRITER"]
    assert modes(["ReadOnlyMany", "ReadWriteMany"], False) == [
        "MULTI_NODE_READER_ONLY",
        "MULTI_NODE_MULTI_WRITER",
    ]
    with pytest.raises(ValueError):
        modes([], False)
