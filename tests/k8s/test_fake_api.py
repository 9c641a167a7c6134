"""The fake API keeps the semantics the loops rely on (so tests on it mean something)."""

from __future__ import annotations

import asyncio

import pytest

from csi_kit.k8s.api import LEASE, PVC, VOLUME_SNAPSHOT, ApiError, is_already_exists, is_conflict
from csi_kit.testing.fake_k8s import FakeKubeAPI


def pvc(name: str = "a", **meta: object) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "ns", **meta}, "spec": {"x": 1}}


async def test_resource_version_increases_and_stale_update_conflicts() -> None:
    api = FakeKubeAPI()
    a = await api.create(PVC, pvc())
    b = await api.create(PVC, pvc("b"))
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    a2 = dict(a, spec={"x": 2})
    a3 = await api.update(PVC, a2)
    assert int(a3["metadata"]["resourceVersion"]) > int(b["metadata"]["resourceVersion"])
    assert a3["metadata"]["generation"] == 2
    with pytest.raises(ApiError) as e:
        await api.update(PVC, dict(a, spec={"x": 3}))  # stale resourceVersion
    assert is_conflict(e.value)
    with pytest.raises(ApiError) as e:
        await api.create(PVC, pvc())
    assert is_already_exists(e.value)


async def test_generate_name_and_uid() -> None:
    api = FakeKubeAPI()
    a = await api.create(PVC, {"metadata": {"generateName": "x-", "namespace": "ns"}})
    b = await api.create(PVC, {"metadata": {"generateName": "x-", "namespace": "ns"}})
    assert a["metadata"]["name"].startswith("x-") and a["metadata"]["name"] != b["metadata"]["name"]
    assert a["metadata"]["uid"] != b["metadata"]["uid"]


async def test_status_is_a_subresource() -> None:
    api = FakeKubeAPI()
    a = await api.create(PVC, dict(pvc(), status={"phase": "Bound"}))
    assert "status" not in a, "status given at creation is dropped"
    a = await api.update_status(PVC, dict(a, status={"phase": "Bound"}, spec={"x": 99}))
    assert a["status"] == {"phase": "Bound"} and a["spec"] == {"x": 1}, "status write ignores spec"
    a = await api.update(PVC, dict(a, status={"phase": "Lost"}, spec={"x": 2}))
    assert a["status"] == {"phase": "Bound"} and a["spec"] == {"x": 2}, "main write ignores status"
    a = await api.patch(PVC, "a", {"status": {"phase": "Lost"}}, "ns")
    assert a["status"] == {"phase": "Bound"}
    a = await api.patch(PVC, "a", {"status": {"phase": "Lost"}}, "ns", status=True)
    assert a["status"] == {"phase": "Lost"}
    with pytest.raises(ApiError):
        await api.update_status(LEASE, {"metadata": {"name": "l", "namespace": "ns"}})


async def test_finalizers_and_deletion_timestamp() -> None:
    api = FakeKubeAPI()
    await api.create(PVC, pvc(finalizers=["a/b", "c/d"]))
    await api.delete(PVC, "a", "ns")
    o = await api.get(PVC, "a", "ns")
    assert o["metadata"]["deletionTimestamp"]
    with pytest.raises(ApiError) as e:
        await api.patch(PVC, "a", {"metadata": {"finalizers": ["a/b", "c/d", "new/one"]}}, "ns")
    assert e.value.code == 422, "no new finalizers on an object being deleted"
    o = await api.patch(PVC, "a", {"metadata": {"finalizers": ["c/d"]}}, "ns")
    assert o["metadata"]["finalizers"] == ["c/d"]
    await api.patch(PVC, "a", {"metadata": {"finalizers": None}}, "ns")
    with pytest.raises(ApiError) as e:
        await api.get(PVC, "a", "ns")
    assert e.value.code == 404


async def test_delete_uid_precondition() -> None:
    api = FakeKubeAPI()
    await api.create(PVC, pvc())
    with pytest.raises(ApiError) as e:
        await api.delete(PVC, "a", "ns", uid="other")
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
    a = await api.create(PVC, pvc())
    await api.patch(PVC, "a", {"metadata": {"labels": {"x": "y"}}}, "ns")
    with pytest.raises(ApiError) as e:
        await api.patch(
            PVC,
            "a",
            {"metadata": {"finalizers": ["f/g"], "resourceVersion": a["metadata"]["resourceVersion"]}},
            "ns",
        )
    assert is_conflict(e.value)


async def test_label_selector_on_list() -> None:
    api = FakeKubeAPI()
    await api.create(PVC, pvc("a", labels={"node": "n1"}))
    await api.create(PVC, pvc("b", labels={"node": "n2"}))
    got = await api.list(PVC, label_selector="node=n1")
    assert [o["metadata"]["name"] for o in got.items] == ["a"]
