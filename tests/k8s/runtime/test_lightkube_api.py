"""The lightkube adapter, over HTTP, against the fake API behind a mock transport.

The bridge below speaks the Kubernetes REST protocol (paths, verbs, Status
errors, chunked watch streams with ERROR events) on top of `FakeKubeAPI`, so
the adapter's real requests are exercised -- URLs, patch content types,
subresources, error decoding, watch resumption -- without a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
import yaml
from k8s_helpers import eventually
from lightkube import AsyncClient, KubeConfig

from csi_kit.k8s.objects.resources import LEASE, PV, PVC, SECRET, VOLUME_SNAPSHOT, VOLUME_SNAPSHOT_CONTENT
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError
from csi_kit.k8s.runtime.informer import Informer
from csi_kit.k8s.runtime.lightkube import LightkubeAPI
from csi_kit.testing.fake_k8s import FakeKubeAPI

KINDS = {r.plural: r for r in (PVC, LEASE, VOLUME_SNAPSHOT, VOLUME_SNAPSHOT_CONTENT, PV, SECRET)}


def status_body(e: ApiError) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": e.message,
        "reason": e.reason,
        "code": e.code,
    }


class Bridge:
    def __init__(self, fake: FakeKubeAPI) -> None:
        self.fake = fake
        self.seen: list[tuple[str, str, str]] = []

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        parts = request.url.path.strip("/").split("/")
        parts = parts[2:] if parts[0] == "api" else parts[3:]
        ns = None
        if parts[0] == "namespaces":
            ns, parts = parts[1], parts[2:]
        res = KINDS[parts[0]]
        name = parts[1] if len(parts) > 1 else None
        sub = parts[2] if len(parts) > 2 else None
        q = dict(request.url.params)
        self.seen.append((request.method, request.url.path, request.headers.get("content-type", "")))
        body = json.loads(request.content) if request.content else None
        try:
            if request.method == "GET" and name:
                out: Any = await self.fake.get(res, name, ns)
            elif request.method == "GET" and q.get("watch") == "true":
                return httpx2.Response(
                    200,
                    content=self._stream(res, q.get("resourceVersion", ""), ns, q),
                    headers={"Content-Type": "application/json"},
                )
            elif request.method == "GET":
                lst = await self.fake.list(res, ns, q.get("labelSelector"))
                out = {
                    "apiVersion": res.api_version,
                    "kind": res.kind + "List",
                    "metadata": {"resourceVersion": lst.resource_version},
                    "items": lst.items,
                }
            elif request.method == "POST":
                out = await self.fake.create(res, body, ns)
            elif request.method == "PUT" and sub == "status":
                out = await self.fake.update_status(res, body)
            elif request.method == "PUT":
                out = await self.fake.update(res, body)
            elif request.method == "PATCH":
                assert request.headers["content-type"] == "application/merge-patch+json"
                out = await self.fake.patch(res, str(name), body, ns, status=sub == "status")
            elif request.method == "DELETE":
                await self.fake.delete(res, str(name), ns)
                out = {"kind": "Status", "status": "Success"}
            else:
                raise AssertionError(request)
        except ApiError as e:
            return httpx2.Response(e.code, json=status_body(e), headers={"Content-Type": "application/json"})
        return httpx2.Response(200, json=out, headers={"Content-Type": "application/json"})

    async def _stream(
        self, res: k.Resource, rv: str, ns: str | None, q: dict[str, str]
    ) -> AsyncIterator[bytes]:
        try:
            async for ev in self.fake.watch(res, rv, ns, q.get("labelSelector")):
                yield (json.dumps({"type": ev.type, "object": ev.object}) + "\n").encode()
        except ApiError as e:
            yield (json.dumps({"type": "ERROR", "object": status_body(e)}) + "\n").encode()


@pytest.fixture
async def adapter() -> AsyncIterator[tuple[LightkubeAPI, FakeKubeAPI, Bridge]]:
    fake = FakeKubeAPI()
    bridge = Bridge(fake)
    config = KubeConfig.from_dict(
        {
            "clusters": [{"name": "c", "cluster": {"server": "https://kube.test"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }
    )
    client = AsyncClient(config, transport=httpx2.MockTransport(bridge))
    api = LightkubeAPI(client)
    try:
        yield api, fake, bridge
    finally:
        await api.close()


async def test_crud_status_and_errors_over_http(adapter: tuple[LightkubeAPI, FakeKubeAPI, Bridge]) -> None:
    api, fake, bridge = adapter
    created = await api.create(
        VOLUME_SNAPSHOT, {"metadata": {"name": "s", "namespace": "ns"}, "spec": {"a": 1}}
    )
    assert created["metadata"]["uid"] and created["kind"] == "VolumeSnapshot"
    assert bridge.seen[-1][:2] == ("POST", "/apis/snapshot.storage.k8s.io/v1/namespaces/ns/volumesnapshots")
    got = await api.get(VOLUME_SNAPSHOT, "s", "ns")
    assert got["spec"] == {"a": 1}
    st = await api.patch(VOLUME_SNAPSHOT, "s", {"status": {"readyToUse": True}}, "ns", status=True)
    assert st["status"] == {"readyToUse": True}
    assert bridge.seen[-1][1].endswith("/volumesnapshots/s/status")
    st["status"]["readyToUse"] = False
    st2 = await api.update_status(VOLUME_SNAPSHOT, st)
    assert st2["status"] == {"readyToUse": False}
    with pytest.raises(ApiError) as e:
        await api.update(VOLUME_SNAPSHOT, st)  # stale resourceVersion
    assert e.value.code == 409
    with pytest.raises(ApiError) as e:
        await api.get(VOLUME_SNAPSHOT, "missing", "ns")
    assert e.value.code == 404
    await api.create(VOLUME_SNAPSHOT_CONTENT, {"metadata": {"name": "c"}, "spec": {}})
    assert bridge.seen[-1][1] == "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents"
    await api.create(PVC, {"metadata": {"name": "p", "namespace": "ns", "labels": {"x": "1"}}})
    assert bridge.seen[-1][1] == "/api/v1/namespaces/ns/persistentvolumeclaims"
    lst = await api.list(PVC, label_selector="x=1")
    assert [o["metadata"]["name"] for o in lst.items] == ["p"] and int(lst.resource_version) > 0
    assert bridge.seen[-1][1] == "/api/v1/persistentvolumeclaims"  # all namespaces
    await api.delete(VOLUME_SNAPSHOT, "s", "ns")
    assert fake.peek(VOLUME_SNAPSHOT, "s", "ns") is None


async def test_informer_over_http_resumes_and_relists_on_410(
    adapter: tuple[LightkubeAPI, FakeKubeAPI, Bridge],
) -> None:
    api, fake, _ = adapter
    await fake.create(VOLUME_SNAPSHOT, {"metadata": {"name": "a", "namespace": "ns"}})
    inf = Informer(api, VOLUME_SNAPSHOT, retry_delay=0.01)
    task = asyncio.create_task(inf.run())
    try:
        await asyncio.wait_for(inf.synced.wait(), 10)
        await fake.create(VOLUME_SNAPSHOT, {"metadata": {"name": "b", "namespace": "ns"}})
        await eventually(lambda: "ns/b" in inf.cache, "watch event over HTTP")
        fake.expire_watches()
        await fake.create(VOLUME_SNAPSHOT, {"metadata": {"name": "c", "namespace": "ns"}})
        await eventually(lambda: "ns/c" in inf.cache, "re-listed after 410")
        assert inf.relists >= 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_connect_reads_a_kubeconfig_file(tmp_path: Any) -> None:
    path = tmp_path / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://kube.example:6443"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
                "current-context": "x",
            }
        )
    )
    api = LightkubeAPI.connect(str(path))
    assert api.client.config.cluster.server == "https://kube.example:6443"
    assert api.client.namespace == "team"


def test_label_selectors_keep_their_operators() -> None:
    """`a!=b` is a not-equal term, `e` an exists term, `!f` a not-exists one: the query the
    API server gets says the same as the selector the loop was given."""
    from lightkube.core.selector import build_selector

    from csi_kit.k8s.runtime.lightkube import _labels

    for selector in ("a=b", "a=b,c!=d", "e", "!f", "a=b, c!=d ,e,!f"):
        labels = _labels(selector)
        assert labels is not None
        assert build_selector(labels) == ",".join(t.strip() for t in selector.split(","))
    assert build_selector(_labels("a==b") or {}) == "a=b"
    assert _labels("") is None
