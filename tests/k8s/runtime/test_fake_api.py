"""The fake API keeps the semantics the loops rely on (so tests on it mean something)."""

from __future__ import annotations

import asyncio

import pytest

from csi_kit.k8s.objects.resources import LEASE, PV, PVC, STORAGE_CLASS, VOLUME_SNAPSHOT
from csi_kit.k8s.runtime.api import ApiError, Obj, is_already_exists, is_conflict
from csi_kit.testing.fake_k8s import FakeKubeAPI

#: A kind with a status subresource and no validation rules of its own in the fake.
GENERIC = VOLUME_SNAPSHOT


def pvc(name: str = "a", **meta: object) -> dict[str, object]:
    """An object of the generic kind (the name is historical)."""
    return {"metadata": {"name": name, "namespace": "ns", **meta}, "spec": {"x": 1}}


async def test_resource_version_increases_and_stale_update_conflicts() -> None:
    api = FakeKubeAPI()
    a = await api.create(GENERIC, pvc())
    b = await api.create(GENERIC, pvc("b"))
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    a2 = dict(a, spec={"x": 2})
    a3 = await api.update(GENERIC, a2)
    assert int(a3["metadata"]["resourceVersion"]) > int(b["metadata"]["resourceVersion"])
    assert a3["metadata"]["generation"] == 2
    with pytest.raises(ApiError) as e:
        await api.update(GENERIC, dict(a, spec={"x": 3}))  # stale resourceVersion
    assert is_conflict(e.value)
    with pytest.raises(ApiError) as e:
        await api.create(GENERIC, pvc())
    assert is_already_exists(e.value)


async def test_generate_name_and_uid() -> None:
    api = FakeKubeAPI()
    a = await api.create(GENERIC, {"metadata": {"generateName": "x-", "namespace": "ns"}})
    b = await api.create(GENERIC, {"metadata": {"generateName": "x-", "namespace": "ns"}})
    assert a["metadata"]["name"].startswith("x-") and a["metadata"]["name"] != b["metadata"]["name"]
    assert a["metadata"]["uid"] != b["metadata"]["uid"]


async def test_status_is_a_subresource() -> None:
    api = FakeKubeAPI()
    a = await api.create(GENERIC, dict(pvc(), status={"phase": "Bound"}))
    assert "status" not in a, "status given at creation is dropped"
    a = await api.update_status(GENERIC, dict(a, status={"phase": "Bound"}, spec={"x": 99}))
    assert a["status"] == {"phase": "Bound"} and a["spec"] == {"x": 1}, "status write ignores spec"
    a = await api.update(GENERIC, dict(a, status={"phase": "Lost"}, spec={"x": 2}))
    assert a["status"] == {"phase": "Bound"} and a["spec"] == {"x": 2}, "main write ignores status"
    a = await api.patch(GENERIC, "a", {"status": {"phase": "Lost"}}, "ns")
    assert a["status"] == {"phase": "Bound"}
    a = await api.patch(GENERIC, "a", {"status": {"phase": "Lost"}}, "ns", status=True)
    assert a["status"] == {"phase": "Lost"}
    with pytest.raises(ApiError):
        await api.update_status(LEASE, {"metadata": {"name": "l", "namespace": "ns"}})


async def test_finalizers_and_deletion_timestamp() -> None:
    api = FakeKubeAPI()
    await api.create(GENERIC, pvc(finalizers=["a/b", "c/d"]))
    await api.delete(GENERIC, "a", "ns")
    o = await api.get(GENERIC, "a", "ns")
    assert o["metadata"]["deletionTimestamp"]
    with pytest.raises(ApiError) as e:
        await api.patch(GENERIC, "a", {"metadata": {"finalizers": ["a/b", "c/d", "new/one"]}}, "ns")
    assert e.value.code == 422, "no new finalizers on an object being deleted"
    o = await api.patch(GENERIC, "a", {"metadata": {"finalizers": ["c/d"]}}, "ns")
    assert o["metadata"]["finalizers"] == ["c/d"]
    await api.patch(GENERIC, "a", {"metadata": {"finalizers": None}}, "ns")
    with pytest.raises(ApiError) as e:
        await api.get(GENERIC, "a", "ns")
    assert e.value.code == 404


async def test_delete_uid_precondition() -> None:
    api = FakeKubeAPI()
    await api.create(GENERIC, pvc())
    with pytest.raises(ApiError) as e:
        await api.delete(GENERIC, "a", "ns", uid="other")
    assert e.value.code == 409


async def test_watch_resumes_from_version_and_expires_with_410() -> None:
    api = FakeKubeAPI(history=3)
    lst = await api.list(VOLUME_SNAPSHOT)
    for i in range(2):
        await api.create(VOLUME_SNAPSHOT, {"metadata": {"name": f"s{i}", "namespace": "ns"}})
    events = []

    async def consume() -> None:
        async for ev in api.watch(VOLUME_SNAPSHOT, lst.resource_version):
            events.append((ev.type, ev.object["metadata"]["name"]))
            if len(events) == 3:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    await api.delete(VOLUME_SNAPSHOT, "s0", "ns")
    await asyncio.wait_for(task, 5)
    assert events == [("ADDED", "s0"), ("ADDED", "s1"), ("DELETED", "s0")]
    for i in range(5):
        await api.create(VOLUME_SNAPSHOT, {"metadata": {"name": f"t{i}", "namespace": "ns"}})
    with pytest.raises(ApiError) as e:
        async for _ in api.watch(VOLUME_SNAPSHOT, lst.resource_version):
            pass
    assert e.value.code == 410


async def test_merge_patch_with_stale_resource_version_conflicts() -> None:
    api = FakeKubeAPI()
    a = await api.create(GENERIC, pvc())
    await api.patch(GENERIC, "a", {"metadata": {"labels": {"x": "y"}}}, "ns")
    with pytest.raises(ApiError) as e:
        await api.patch(
            GENERIC,
            "a",
            {"metadata": {"finalizers": ["f/g"], "resourceVersion": a["metadata"]["resourceVersion"]}},
            "ns",
        )
    assert is_conflict(e.value)


async def test_label_selector_on_list() -> None:
    api = FakeKubeAPI()
    await api.create(GENERIC, pvc("a", labels={"node": "n1"}))
    await api.create(GENERIC, pvc("b", labels={"node": "n2"}))
    got = await api.list(GENERIC, label_selector="node=n1")
    assert [o["metadata"]["name"] for o in got.items] == ["a"]


MODIFIED = (
    'Operation cannot be fulfilled on persistentvolumeclaims "c": the object has been modified; '
    "please apply your changes to the latest version and try again"
)


async def _bound_claim(api: FakeKubeAPI, size: str = "1Gi", cls: str = "fast") -> Obj:
    await api.create(
        PVC,
        {
            "metadata": {"name": "c", "namespace": "ns"},
            "spec": {"storageClassName": cls, "resources": {"requests": {"storage": size}}},
        },
    )
    await api.patch(PVC, "c", {"spec": {"volumeName": "pv-c"}}, "ns")
    return await api.patch(
        PVC, "c", {"status": {"phase": "Bound", "capacity": {"storage": size}}}, "ns", status=True
    )


async def test_a_stale_status_patch_gets_the_api_servers_409() -> None:
    """The kubelet's and the resizer's status patches carry the version they read (issue #13)."""
    api = FakeKubeAPI()
    c = await _bound_claim(api)
    rv = c["metadata"]["resourceVersion"]
    await api.patch(PVC, "c", {"status": {"allocatedResourceStatuses": {"storage": "X"}}}, "ns", status=True)
    body = {"metadata": {"resourceVersion": rv}, "status": {"capacity": {"storage": "2Gi"}}}
    with pytest.raises(ApiError) as e:
        await api.patch(PVC, "c", body, "ns", status=True)
    assert (e.value.code, e.value.reason, e.value.message) == (409, "Conflict", MODIFIED)
    with pytest.raises(ApiError) as e:
        await api.update_status(PVC, c)
    assert e.value.message == MODIFIED
    current = await api.get(PVC, "c", "ns")
    body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    done = await api.patch(PVC, "c", body, "ns", status=True)
    assert done["status"]["capacity"] == {"storage": "2Gi"}


async def test_status_writes_take_metadata_for_core_kinds_only() -> None:
    api = FakeKubeAPI()
    await _bound_claim(api)
    c = await api.patch(
        PVC, "c", {"metadata": {"annotations": {"a/b": "x"}}, "status": {"phase": "Bound"}}, "ns", status=True
    )
    assert c["metadata"]["annotations"] == {"a/b": "x"}, "a PVC's status strategy resets only the spec"
    c = await api.patch(
        PVC, "c", {"metadata": {"annotations": {"a/b": None}}, "status": {}}, "ns", status=True
    )
    assert not c["metadata"].get("annotations")
    s = await api.create(VOLUME_SNAPSHOT, {"metadata": {"name": "s", "namespace": "ns"}})
    s = await api.patch(
        VOLUME_SNAPSHOT,
        "s",
        {"metadata": {"labels": {"l": "v"}}, "status": {"readyToUse": True}},
        "ns",
        status=True,
    )
    assert s["status"] == {"readyToUse": True} and not s["metadata"].get("labels"), (
        "a CRD's status write is status"
    )


async def test_a_custom_resource_update_needs_a_resource_version() -> None:
    api = FakeKubeAPI()
    s = await api.create(VOLUME_SNAPSHOT, {"metadata": {"name": "s", "namespace": "ns"}, "spec": {"a": 1}})
    del s["metadata"]["resourceVersion"]
    with pytest.raises(ApiError) as e:
        await api.update(VOLUME_SNAPSHOT, s)
    assert e.value.code == 422 and "metadata.resourceVersion" in e.value.message
    pv = await api.create(PV, {"metadata": {"name": "p"}, "spec": {"a": 1}})
    del pv["metadata"]["resourceVersion"]
    pv["spec"]["a"] = 2
    assert (await api.update(PV, pv))["spec"]["a"] == 2, "a built-in kind may be updated unconditionally"


async def test_claim_validation_and_resize_admission() -> None:
    api = FakeKubeAPI()
    await api.create(STORAGE_CLASS, {"metadata": {"name": "fast"}, "allowVolumeExpansion": True})
    await api.create(STORAGE_CLASS, {"metadata": {"name": "fixed"}})
    await _bound_claim(api, "2Gi")
    with pytest.raises(ApiError) as e:
        await api.patch(PVC, "c", {"spec": {"volumeName": "other"}}, "ns")
    assert e.value.code == 422 and "spec is immutable" in e.value.message
    await api.patch(PVC, "c", {"spec": {"resources": {"requests": {"storage": "5Gi"}}}}, "ns")
    await api.patch(PVC, "c", {"spec": {"resources": {"requests": {"storage": "3Gi"}}}}, "ns")  # recovery
    for size in ("2Gi", "1Gi"):
        with pytest.raises(ApiError) as e:
            await api.patch(PVC, "c", {"spec": {"resources": {"requests": {"storage": size}}}}, "ns")
        assert e.value.code == 422
        assert "spec.resources.requests.storage: Forbidden: field can not be less than status.capacity" in (
            e.value.message
        )
    await api.delete(PVC, "c", "ns")
    await _bound_claim(api, "1Gi", cls="fixed")
    with pytest.raises(ApiError) as e:
        await api.patch(PVC, "c", {"spec": {"resources": {"requests": {"storage": "2Gi"}}}}, "ns")
    assert e.value.code == 403 and "must support resize" in e.value.message


async def test_a_selected_watch_sees_objects_leave_and_enter() -> None:
    api = FakeKubeAPI()
    lst = await api.list(GENERIC)
    await api.create(GENERIC, pvc("a", labels={"node": "n1"}))
    await api.patch(GENERIC, "a", {"metadata": {"labels": {"node": "n2"}}}, "ns")
    await api.patch(GENERIC, "a", {"metadata": {"labels": {"node": "n1"}}}, "ns")
    await api.delete(GENERIC, "a", "ns")
    events: list[tuple[str, str]] = []

    async def consume() -> None:
        async for ev in api.watch(GENERIC, lst.resource_version, label_selector="node=n1"):
            events.append((ev.type, ev.object["metadata"]["labels"]["node"]))
            if len(events) == 4:
                return

    await asyncio.wait_for(consume(), 5)
    assert events == [("ADDED", "n1"), ("DELETED", "n1"), ("ADDED", "n1"), ("DELETED", "n1")]


async def test_a_watch_from_version_zero_starts_with_the_current_objects() -> None:
    api = FakeKubeAPI()
    await api.create(GENERIC, pvc("a"))
    await api.create(GENERIC, pvc("b"))
    await api.delete(GENERIC, "a", "ns")
    seen: list[tuple[str, str]] = []
    async for ev in api.watch(GENERIC, "0"):
        seen.append((ev.type, ev.object["metadata"]["name"]))
        break
    assert seen == [("ADDED", "b")]


async def test_generate_name_uses_the_api_servers_alphabet() -> None:
    api = FakeKubeAPI()
    o = await api.create(GENERIC, {"metadata": {"generateName": "p" * 70, "namespace": "ns"}})
    name = o["metadata"]["name"]
    assert len(name) == 63 and name.startswith("p" * 58)
    assert set(name[58:]) <= set("bcdfghjklmnpqrstvwxz2456789")
