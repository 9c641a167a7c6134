"""The cases a cluster produces: missing inputs, driver errors, races with deletion, pre-provisioning."""

from __future__ import annotations

import asyncio
import base64

import grpc
from csi_peer import ScriptedCSI
from k8s_helpers import (
    Loops,
    contents,
    eventually,
    is_ready,
    make_class,
    make_snapshot,
    make_volume,
    ready_snapshot,
    request_snapshot,
    settle,
    snapshot,
)

from csi_kit.k8s.objects.resources import PVC, SECRET, VOLUME_SNAPSHOT, VOLUME_SNAPSHOT_CONTENT
from csi_kit.k8s.runtime.api import Obj
from csi_kit.k8s.snapshot import protocol as p
from csi_kit.testing.fake_k8s import FakeKubeAPI


def error_of(api: FakeKubeAPI, name: str = "snap") -> str:
    s = snapshot(api, name)
    return str(((s or {}).get("status") or {}).get("error", {}).get("message", ""))


async def test_missing_pvc_reports_then_recovers_when_pvc_appears(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    await make_class(api)
    await make_snapshot(api)
    await eventually(lambda: 'persistentvolumeclaim "data" not found' in error_of(api), "error reported")
    assert not contents(api)
    s = snapshot(api)
    assert s is not None and s["status"]["readyToUse"] is False
    await make_volume(api)
    await eventually(lambda: is_ready(api), "ready once the PVC exists")
    assert error_of(api) == ""


async def test_unbound_pvc_waits_without_creating_content(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    await make_class(api)
    await make_volume(api, bound=False)
    await make_snapshot(api)
    await eventually(lambda: "not yet bound" in error_of(api), "error reported")
    await settle(api)
    assert not contents(api)
    pvc = api.peek(PVC, "data", "default")
    assert pvc is not None and not pvc["metadata"].get("finalizers")


async def test_no_default_class(api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops) -> None:
    await request_snapshot(api, default=False)
    await eventually(lambda: "cannot find default snapshot class" in error_of(api), "error reported")
    assert not contents(api)


async def test_ambiguous_default_class(api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops) -> None:
    await make_volume(api)
    await make_class(api, "one")
    await make_class(api, "two")
    await make_snapshot(api)
    await eventually(lambda: "2 default snapshot classes were found" in error_of(api), "error reported")
    assert not contents(api)
    s = snapshot(api)
    assert s is not None and not s["spec"].get("volumeSnapshotClassName")


async def test_named_class_missing(api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops) -> None:
    await make_volume(api)
    await make_snapshot(api, cls="nope")
    await eventually(lambda: '"nope" not found' in error_of(api), "error reported")


async def test_final_driver_error_is_reported_and_retried(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    csi, _ = peer
    # The driver keeps failing until the test has seen the error reported, so a
    # fast retry cannot clear it before the test looks (no timing assumption).
    csi.create_errors = [(grpc.StatusCode.INTERNAL, "disk on fire")] * 10_000
    await request_snapshot(api)
    await eventually(lambda: "disk on fire" in error_of(api), "driver error mirrored into the snapshot")
    failed = csi.calls["CreateSnapshot"]
    assert failed >= 1
    csi.create_errors = []
    await eventually(lambda: is_ready(api), "ready after retries")
    assert csi.calls["CreateSnapshot"] > failed
    assert error_of(api) == ""
    [c] = contents(api)
    assert "error" not in c["status"]


async def test_non_final_error_keeps_being_created_annotation(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    csi, _ = peer
    csi.create_errors = [(grpc.StatusCode.DEADLINE_EXCEEDED, "slow")] * 1000
    await request_snapshot(api)
    await eventually(lambda: csi.calls["CreateSnapshot"] >= 3, "retries")
    [c] = contents(api)
    assert c["metadata"]["annotations"][p.ANN_BEING_CREATED] == "yes"
    # A final error, in contrast, lifts it: the driver said it did not create anything.
    csi.create_errors = [(grpc.StatusCode.INVALID_ARGUMENT, "bad")] * 1000
    await eventually(
        lambda: p.ANN_BEING_CREATED not in (contents(api)[0]["metadata"].get("annotations") or {}),
        "annotation removed after a final error",
    )
    csi.create_errors = []
    await eventually(lambda: is_ready(api), "ready")


async def test_deletion_while_create_snapshot_in_flight_leaks_nothing(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    csi, _ = peer
    csi.create_gate = asyncio.Event()
    await request_snapshot(api)
    await eventually(lambda: csi.create_started.is_set(), "CreateSnapshot sent")
    await api.delete(VOLUME_SNAPSHOT, "snap", "default")
    await settle(api)
    # While the driver is cutting, the content must stay (being-created blocks deletion).
    [c] = contents(api)
    assert c["metadata"].get("deletionTimestamp")
    assert c["metadata"]["annotations"][p.ANN_BEING_CREATED] == "yes"
    assert csi.calls["DeleteSnapshot"] == 0
    csi.create_gate.set()
    await eventually(lambda: snapshot(api) is None and not contents(api), "all gone")
    assert csi.snapshots == {}, "the snapshot cut during deletion was deleted, not leaked"
    assert csi.calls["DeleteSnapshot"] == 1


async def test_delete_snapshot_error_is_retried(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    csi, _ = peer
    await ready_snapshot(api)
    csi.delete_errors = [(grpc.StatusCode.INTERNAL, "busy")] * 2
    await api.delete(VOLUME_SNAPSHOT, "snap", "default")
    await eventually(lambda: snapshot(api) is None and not contents(api), "all gone")
    assert csi.calls["DeleteSnapshot"] == 3 and csi.snapshots == {}


async def test_pvc_being_deleted_is_not_snapshotted(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    pvc = await make_volume(api)
    pvc["metadata"]["finalizers"] = ["kubernetes.io/pvc-protection"]
    await api.update(PVC, pvc)
    await api.delete(PVC, "data", "default")
    await make_class(api)
    await make_snapshot(api)
    await eventually(lambda: "claim is being deleted" in error_of(api), "error reported")
    assert not contents(api)


async def test_pvc_finalizer_held_until_every_snapshot_of_it_is_ready(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    csi, _ = peer
    csi.not_ready_polls = 3
    await make_volume(api)
    await make_class(api)
    await make_snapshot(api, "a")
    await eventually(
        lambda: (
            p.PVC_AS_SOURCE_FINALIZER
            in ((api.peek(PVC, "data", "default") or {})["metadata"].get("finalizers") or [])
        ),
        "PVC protected",
    )
    await eventually(lambda: is_ready(api, "a"), "ready after polling")
    await eventually(
        lambda: not (api.peek(PVC, "data", "default") or {})["metadata"].get("finalizers"), "PVC released"
    )
    assert csi.calls["CreateSnapshot"] == 4  # polled with the same name until ready, as upstream


async def test_secrets_from_class_reach_the_driver_and_are_stripped(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    csi, endpoint = peer
    lp = Loops(api, endpoint, snapshotter={"extra_create_metadata": True})
    await lp.start()
    try:
        await api.create(
            SECRET,
            {
                "metadata": {"name": "snap-secret-snap", "namespace": "default"},
                "data": {"password": base64.b64encode(b"hunter2").decode()},
            },
        )
        await make_volume(api)
        await make_class(
            api,
            **{
                p.SECRET_NAME_KEY: "snap-secret-${volumesnapshot.name}",
                p.SECRET_NAMESPACE_KEY: "${volumesnapshot.namespace}",
                "tier": "gold",
            },
        )
        snap = await make_snapshot(api)
        await eventually(lambda: is_ready(api), "ready")
        assert csi.secrets_seen[-1] == {"password": "hunter2"}
        assert csi.params_seen[-1] == {
            "tier": "gold",
            p.META_SNAPSHOT_NAME: "snap",
            p.META_SNAPSHOT_NAMESPACE: "default",
            p.META_CONTENT_NAME: "snapcontent-" + snap["metadata"]["uid"],
        }
        [c] = contents(api)
        assert c["metadata"]["annotations"][p.ANN_DELETION_SECRET_NAME] == "snap-secret-snap"
        assert c["metadata"]["annotations"][p.ANN_DELETION_SECRET_NAMESPACE] == "default"
    finally:
        await lp.stop()


async def test_a_secret_value_that_is_not_text_is_reported_in_one_line(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    """The content's status.error names the secret (never its value) and no CreateSnapshot is sent."""
    csi, _ = peer
    await api.create(
        SECRET,
        {
            "metadata": {"name": "creds", "namespace": "default"},
            "data": {"password": base64.b64encode(b"\xffs3cret").decode()},
        },
    )
    await request_snapshot(api, **{p.SECRET_NAME_KEY: "creds", p.SECRET_NAMESPACE_KEY: "default"})

    def content_error() -> str:
        found = contents(api)
        return str(((found[0].get("status") or {}).get("error") or {}).get("message", "")) if found else ""

    await eventually(lambda: "not base64 of UTF-8 text" in content_error(), "error reported on the content")
    assert "secret default/creds" in content_error() and "s3cret" not in content_error()
    assert "\n" not in content_error()
    assert csi.calls["CreateSnapshot"] == 0
    await eventually(lambda: "not base64 of UTF-8 text" in error_of(api), "mirrored into the snapshot")


async def pre_provisioned(api: FakeKubeAPI, handle: str, policy: str = "Delete", uid: str = "") -> Obj:
    ref = {"name": "pre", "namespace": "default"}
    if uid:
        ref["uid"] = uid
    return await api.create(
        VOLUME_SNAPSHOT_CONTENT,
        {
            "metadata": {"name": "pre-content"},
            "spec": {
                "deletionPolicy": policy,
                "driver": "scripted.csi-kit.io",
                "source": {"snapshotHandle": handle},
                "volumeSnapshotRef": ref,
            },
        },
    )


async def test_pre_provisioned_snapshot_binds_and_is_checked_with_the_driver(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    csi, _ = peer
    csi.add_existing("existing-1", size=5 << 20)
    await pre_provisioned(api, "existing-1")
    snap = await api.create(
        VOLUME_SNAPSHOT,
        {
            "metadata": {"name": "pre", "namespace": "default"},
            "spec": {"source": {"volumeSnapshotContentName": "pre-content"}},
        },
    )
    await eventually(lambda: is_ready(api, "pre"), "pre-provisioned snapshot ready")
    c = api.peek(VOLUME_SNAPSHOT_CONTENT, "pre-content")
    assert c is not None
    assert c["spec"]["volumeSnapshotRef"]["uid"] == snap["metadata"]["uid"]
    assert c["metadata"]["finalizers"] == [p.CONTENT_BOUND_FINALIZER]
    assert c["status"]["snapshotHandle"] == "existing-1"
    s = snapshot(api, "pre")
    assert s is not None and s["status"]["restoreSize"] == "5Mi"
    assert csi.calls["CreateSnapshot"] == 0 and csi.calls["ListSnapshots"] >= 1

    await api.delete(VOLUME_SNAPSHOT, "pre", "default")
    await eventually(lambda: snapshot(api, "pre") is None and not contents(api), "all gone")
    assert csi.deleted == ["existing-1"]


async def test_pre_provisioned_missing_on_backend_reports_error(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    await pre_provisioned(api, "ghost")
    await api.create(
        VOLUME_SNAPSHOT,
        {
            "metadata": {"name": "pre", "namespace": "default"},
            "spec": {"source": {"volumeSnapshotContentName": "pre-content"}},
        },
    )
    await eventually(
        lambda: "snapshot ghost not found" in error_of(api, "pre"), "error mirrored to the snapshot"
    )
    assert not is_ready(api, "pre")


async def test_pre_provisioned_content_bound_elsewhere_is_refused(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    await pre_provisioned(api, "x", uid="someone-else")
    await api.create(
        VOLUME_SNAPSHOT,
        {
            "metadata": {"name": "pre", "namespace": "default"},
            "spec": {"source": {"volumeSnapshotContentName": "pre-content"}},
        },
    )
    await eventually(lambda: "bound to a different snapshot" in error_of(api, "pre"), "refused")
    c = api.peek(VOLUME_SNAPSHOT_CONTENT, "pre-content")
    assert c is not None and c["spec"]["volumeSnapshotRef"]["uid"] == "someone-else"


async def test_unbound_pre_provisioned_content_deleted_with_delete_policy(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    csi, _ = peer
    csi.add_existing("lonely")
    c = await pre_provisioned(api, "lonely")
    c["metadata"]["finalizers"] = [p.CONTENT_BOUND_FINALIZER]
    await api.update(VOLUME_SNAPSHOT_CONTENT, c)
    await api.delete(VOLUME_SNAPSHOT_CONTENT, "pre-content")
    await eventually(lambda: not contents(api), "content gone")
    assert csi.deleted == ["lonely"]


async def test_content_of_missing_snapshot_is_never_deleted_on_its_own(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    """A content copied from another cluster must not take its storage with it."""
    csi, _ = peer
    csi.add_existing("copied")
    await pre_provisioned(api, "copied", uid="uid-from-another-cluster")
    await settle(api)
    assert len(contents(api)) == 1 and csi.calls["DeleteSnapshot"] == 0


async def test_deleting_a_bound_content_whose_snapshot_is_gone_keeps_the_storage(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], loops: Loops
) -> None:
    """Upstream's rule: a content copied to another cluster must not delete storage the first still uses."""
    csi, _ = peer
    csi.add_existing("copied")
    c = await pre_provisioned(api, "copied", uid="uid-from-another-cluster")
    await settle(api)
    c = api.peek(VOLUME_SNAPSHOT_CONTENT, "pre-content") or c
    assert c["metadata"]["finalizers"] == [p.CONTENT_BOUND_FINALIZER]
    await api.delete(VOLUME_SNAPSHOT_CONTENT, "pre-content")
    await settle(api)
    c = api.peek(VOLUME_SNAPSHOT_CONTENT, "pre-content")
    assert c is not None and c["metadata"]["deletionTimestamp"], "stays Terminating"
    assert p.ANN_BEING_DELETED not in (c["metadata"].get("annotations") or {})
    assert csi.calls["DeleteSnapshot"] == 0 and len(csi.snapshots) == 1


async def test_pre_provisioned_without_list_snapshots_is_taken_on_trust(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    csi, endpoint = peer
    lp = Loops(api, endpoint, snapshotter={"list_snapshots": False})
    await lp.start()
    try:
        await pre_provisioned(api, "trusted")
        await api.create(
            VOLUME_SNAPSHOT,
            {
                "metadata": {"name": "pre", "namespace": "default"},
                "spec": {"source": {"volumeSnapshotContentName": "pre-content"}},
            },
        )
        await eventually(lambda: is_ready(api, "pre"), "ready without asking the driver")
        assert csi.calls["ListSnapshots"] == 0
        s = snapshot(api, "pre")
        assert s is not None and "restoreSize" not in s["status"], "size unknown, not invented"
    finally:
        await lp.stop()
