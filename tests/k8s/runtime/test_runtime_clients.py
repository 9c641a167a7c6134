"""`Clients`: a budget and a User-Agent per loop, shared informers, one events path."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
from k8s_helpers import eventually
from lightkube import KubeConfig

from csi_kit import __version__
from csi_kit.k8s.objects.resources import EVENT, LEASE, PV, PVC, VOLUME_SNAPSHOT
from csi_kit.k8s.runtime.api import KubeAPI, Obj, Resource, key_of
from csi_kit.k8s.runtime.clients import Clients, user_agent
from csi_kit.k8s.runtime.controller import Loop
from csi_kit.k8s.runtime.events import EventRecorder, EventSink
from csi_kit.k8s.runtime.informer import Informer, InformerFactory, SharedInformer
from csi_kit.k8s.runtime.lightkube import DEFAULT_AGENT, LightkubeAPI
from csi_kit.testing.fake_k8s import FakeKubeAPI

PROVISIONER = f"csi-kit-provisioner/{__version__}"
INFORMERS = f"csi-kit-informers/{__version__}"
EVENTS = f"csi-kit-events/{__version__}"


def pvc(name: str, ns: str = "ns") -> Obj:
    return {"metadata": {"name": name, "namespace": ns}, "spec": {}}


# ----------------------------------------------------------------- User-Agent


class Recorder:
    """An API server that answers every request with one PVC and notes who asked."""

    def __init__(self) -> None:
        self.agents: list[tuple[str, str]] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.agents.append((request.url.path, request.headers.get("user-agent", "")))
        body = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "p", "namespace": "ns"},
        }
        return httpx2.Response(200, content=json.dumps(body), headers={"Content-Type": "application/json"})


@pytest.fixture
def config() -> KubeConfig:
    return KubeConfig.from_dict(
        {
            "clusters": [{"name": "c", "cluster": {"server": "https://kube.test"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }
    )


async def test_lightkube_sends_each_agent_as_user_agent(config: KubeConfig) -> None:
    server = Recorder()
    raw = LightkubeAPI.open(config, transport=httpx2.MockTransport(server))
    clients = Clients(raw, qps=0, burst=1)
    lease = clients.lease_api(raw)
    try:
        await raw.get(PVC, "p", "ns")
        await clients.api_for("provisioner").get(PVC, "p", "ns")
        await clients.api_for("snapshotter").get(PVC, "p", "ns")
        await lease.get(PVC, "p", "ns")
        await raw.get(PVC, "p", "ns")  # the siblings did not change the raw connection's agent
    finally:
        await clients.close()  # closes the lease's sibling client too
        await raw.close()
    assert lease.client._client._client.is_closed  # type: ignore[attr-defined]
    assert [agent for _, agent in server.agents] == [
        DEFAULT_AGENT,
        PROVISIONER,
        f"csi-kit-snapshotter/{__version__}",
        f"csi-kit-leader-election/{__version__}",
        DEFAULT_AGENT,
    ]
    assert all(path == "/api/v1/namespaces/ns/persistentvolumeclaims/p" for path, _ in server.agents)


def test_agent_names_are_checked() -> None:
    assert user_agent("group-snapshotter", "1.2") == "csi-kit-group-snapshotter/1.2"
    for bad in ("", "Provisioner", "a/b", "a b", "-a", "a\r\nX-Evil: 1"):
        with pytest.raises(ValueError):
            user_agent(bad)


async def test_fake_counts_requests_by_agent_on_one_store() -> None:
    api = FakeKubeAPI()
    clients = Clients(api, qps=0, burst=1)
    created = await clients.api_for("provisioner").create(PVC, pvc("a"))
    assert api.peek(PVC, "a", "ns") == created  # the same objects behind every handle
    await api.get(PVC, "a", "ns")
    assert api.requests[("create", "persistentvolumeclaims")] == 1
    assert api.requests[("get", "persistentvolumeclaims")] == 1
    assert api.requests_of(PROVISIONER) == {("create", "persistentvolumeclaims"): 1}
    assert api.requests_of("") == {("get", "persistentvolumeclaims"): 1}


# --------------------------------------------------------------------- budgets


async def test_each_loop_has_its_own_budget_and_snapshots_a_second_one() -> None:
    api = FakeKubeAPI()
    await api.create(PVC, pvc("a"))
    await api.create(VOLUME_SNAPSHOT, pvc("s"))
    clients = Clients(api, qps=0.001, burst=2)  # no token comes back during the test
    prov, other = clients.api_for("provisioner"), clients.api_for("resizer")
    assert clients.api_for("provisioner") is prov
    for _ in range(2):
        await prov.get(PVC, "a", "ns")
    blocked = asyncio.create_task(prov.get(PVC, "a", "ns"))  # the provisioner's bucket is empty
    try:
        await other.get(PVC, "a", "ns")  # another loop is not held up by it
        await prov.get(VOLUME_SNAPSHOT, "s", "ns")  # nor are the provisioner's own snapshot requests
        await asyncio.sleep(0)
        assert not blocked.done()
        assert api.requests_of(PROVISIONER)[("get", "persistentvolumeclaims")] == 2
    finally:
        blocked.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await blocked


async def test_informers_are_outside_every_loop_budget(api: FakeKubeAPI) -> None:
    for name in ("a", "b", "c"):
        await api.create(PVC, pvc(name))
    clients = Clients(api, qps=0.001, burst=1)
    loop = Watcher(clients.api_for("provisioner"), clients.informers, (PVC, PV, VOLUME_SNAPSHOT))
    async with running(loop):
        pass  # synced although the loop's bucket holds one token for six lists and watches
    assert api.requests_of(PROVISIONER) == {}
    assert api.requests_of(INFORMERS)[("list", "persistentvolumeclaims")] == 1


# ---------------------------------------------------------------- informers


class Watcher(Loop):
    """A loop that only records what its informers tell it."""

    def __init__(
        self,
        api: KubeAPI,
        informers: InformerFactory | None,
        kinds: tuple[Resource, ...] = (PVC,),
        *,
        resync_period: float = 0.0,
    ) -> None:
        super().__init__(informers=informers)
        self.seen: list[tuple[str, str]] = []
        self.queue("keys", self._sync)  # workers to stop too, as a real loop has
        self.infs = [self.informer(api, res, resync_period=resync_period) for res in kinds]
        for inf in self.infs:
            inf.add_handler(self._on)

    def _on(self, event: str, old: Obj | None, new: Obj | None) -> None:
        self.seen.append((event, key_of(new or old or {})))

    async def _sync(self, key: str) -> None:
        pass


@contextlib.asynccontextmanager
async def running(loop: Loop) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(loop.started.wait(), 30)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_loops_share_one_list_and_watch_per_resource(api: FakeKubeAPI) -> None:
    await api.create(PVC, pvc("a"))
    factory = InformerFactory(api.with_agent("informers"))
    one, two = Watcher(api, factory, (PVC, PV)), Watcher(api, factory, (PVC,))
    async with running(one), running(two):
        await api.create(PVC, pvc("b"))
        await eventually(lambda: ("ADDED", "ns/b") in one.seen and ("ADDED", "ns/b") in two.seen, "b")
        assert api.requests_of("informers") == {
            ("list", "persistentvolumeclaims"): 1,
            ("watch", "persistentvolumeclaims"): 1,
            ("list", "persistentvolumes"): 1,
            ("watch", "persistentvolumes"): 1,
        }
        assert one.seen == two.seen == [("ADDED", "ns/a"), ("ADDED", "ns/b")]
    await eventually(lambda: not any(s.running for s in factory.shared), "the watches stopped")


async def test_a_restarted_loop_gets_the_cache_replayed_and_nothing_while_stopped(api: FakeKubeAPI) -> None:
    await api.create(PVC, pvc("a"))
    factory = InformerFactory(api)
    # With a resync period a stopping registration has a task of its own to stop (one more await).
    stays, restarts = Watcher(api, factory), Watcher(api, factory, resync_period=900)
    async with running(stays):
        async with running(restarts):
            assert restarts.seen == [("ADDED", "ns/a")]
        await api.create(PVC, pvc("b"))  # while `restarts` is stopped
        await eventually(lambda: ("ADDED", "ns/b") in stays.seen, "b")
        assert restarts.seen == [("ADDED", "ns/a")]
        async with running(restarts):
            # Replayed from the running informer's cache, without a second list.
            assert sorted(restarts.seen[1:]) == [("ADDED", "ns/a"), ("ADDED", "ns/b")]
        assert api.requests[("list", "persistentvolumeclaims")] == 1


async def test_an_informer_cancelled_again_while_stopping_still_detaches(api: FakeKubeAPI) -> None:
    """A stopping loop cancels its informers' tasks once more when its gather ends early."""
    shared = SharedInformer(api, PVC)
    informer = Informer(api, PVC, resync_period=900, shared=shared)
    task = asyncio.create_task(informer.run())
    await informer.synced.wait()
    task.cancel()
    await asyncio.sleep(0)  # now in its clean-up
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert not shared.running and not shared.synced.is_set()


async def test_resync_is_per_registration(api: FakeKubeAPI) -> None:
    await api.create(PVC, pvc("a"))
    factory = InformerFactory(api)
    resyncs, quiet = Watcher(api, factory, resync_period=0.01), Watcher(api, factory)
    async with running(resyncs), running(quiet):
        await eventually(lambda: ("SYNC", "ns/a") in resyncs.seen, "a resync")
        assert quiet.seen == [("ADDED", "ns/a")]


async def test_store_update_is_shared_and_the_other_loops_still_see_the_add(api: FakeKubeAPI) -> None:
    factory = InformerFactory(api)
    writer, reader = Watcher(api, factory), Watcher(api, factory)
    async with running(writer), running(reader):
        created = await api.create(PVC, pvc("a"))
        writer.infs[0].store_update(created)  # the writer's own write, before its watch event
        assert reader.infs[0].get("ns/a") == created
        await eventually(lambda: ("ADDED", "ns/a") in reader.seen, "the watch event")
        assert reader.seen == [("ADDED", "ns/a")]  # an add, not a modification of the stored copy


async def test_a_failing_list_ends_every_loop_reading_it_and_a_new_start_lists_again(
    api: FakeKubeAPI,
) -> None:
    factory = InformerFactory(api)
    one, two = Watcher(api, factory), Watcher(api, factory)
    api.fail("list", PVC, ValueError("not an API error"))
    results = await asyncio.gather(one.run(), two.run(), return_exceptions=True)
    assert [type(r) for r in results] == [ValueError, ValueError]
    await api.create(PVC, pvc("a"))
    async with running(one):
        assert one.seen == [("ADDED", "ns/a")]


async def test_a_loop_without_a_factory_has_its_own_informers(api: FakeKubeAPI) -> None:
    await api.create(PVC, pvc("a"))
    one, two = Watcher(api, None), Watcher(api, None)
    async with running(one), running(two):
        assert one.seen == two.seen == [("ADDED", "ns/a")]
    assert api.requests[("list", "persistentvolumeclaims")] == 2


# ----------------------------------------------------------------------- events


async def test_an_event_never_delays_the_write_it_describes() -> None:
    api = FakeKubeAPI()
    release = asyncio.Event()

    def hold(verb: str, res: Resource, name: str, body: Obj | None) -> Any:
        return release.wait() if res == EVENT else None  # every Event write hangs until released

    api.reactors.append(hold)
    clients = Clients(api, qps=5, burst=10)
    loop_api = clients.api_for("provisioner")
    recorder = clients.recorder("csi-kit-provisioner")
    claim = await loop_api.create(PVC, pvc("a"))
    await recorder.event(claim, "Normal", "Provisioning", "started")  # awaiting it waits for nothing
    recorder.event(claim, "Normal", "Provisioning", "started")
    pv = await loop_api.create(PV, {"metadata": {"name": "pv-a"}, "spec": {}})
    assert pv["metadata"]["name"] == "pv-a" and api.objects(EVENT) == []
    release.set()
    await recorder.flush()
    (event,) = api.objects(EVENT)
    assert event["count"] == 2 and event["source"] == {"component": "csi-kit-provisioner"}
    assert api.requests_of(EVENTS) == {("create", "events"): 1}
    await clients.close()


async def test_repeats_bump_the_count_and_forget_starts_a_new_event(api: FakeKubeAPI) -> None:
    claim = await api.create(PVC, pvc("a"))
    recorder = EventRecorder(api, "c")
    recorder.event(claim, "Warning", "Failed", "disk on fire")
    await recorder.flush()
    recorder.event(claim, "Warning", "Failed", "disk on fire")
    recorder.event(claim, "Warning", "Failed", "disk on fire")
    await recorder.flush()
    (event,) = api.objects(EVENT)
    assert event["count"] == 3 and event["involvedObject"]["name"] == "a"
    assert event["involvedObject"]["namespace"] == "ns" and event["metadata"]["namespace"] == "ns"
    assert api.requests[("create", "events")] == 1 and api.requests[("patch", "events")] == 1
    recorder.event(claim, "Warning", "Failed", "another fire")  # another message: another Event
    recorder.forget(claim)
    recorder.event(claim, "Warning", "Failed", "disk on fire")  # after forget: news, a new Event
    await recorder.flush()
    assert sorted((e["message"], e["count"]) for e in api.objects(EVENT)) == [
        ("another fire", 1),
        ("disk on fire", 1),
        ("disk on fire", 3),
    ]


async def test_an_expired_event_is_written_again(api: FakeKubeAPI) -> None:
    claim = await api.create(PVC, pvc("a"))
    recorder = EventRecorder(api, "c")
    recorder.event(claim, "Normal", "R", "m")
    await recorder.flush()
    (event,) = api.objects(EVENT)
    await api.delete(EVENT, event["metadata"]["name"], "ns")  # the Event's TTL ran out
    recorder.event(claim, "Normal", "R", "m")
    await recorder.flush()
    (again,) = api.objects(EVENT)
    assert again["count"] == 2 and again["metadata"]["name"] != event["metadata"]["name"]


async def test_events_memory_is_bounded(api: FakeKubeAPI) -> None:
    lease = await api.create(LEASE, pvc("l"))
    sink = EventSink(api, queue_size=2, remember=2)
    rec = sink.recorder("c")
    for reason in ("A", "B", "C"):  # queued before the writer runs: the third does not fit
        rec.event(lease, "Normal", reason, "m")
    await sink.flush()
    assert sink.dropped == 1 and sorted(e["reason"] for e in api.objects(EVENT)) == ["A", "B"]
    rec.event(lease, "Normal", "C", "m")
    await sink.flush()
    rec.event(lease, "Normal", "A", "m")  # A was the least recently written of three: forgotten
    await sink.flush()
    assert sorted((e["reason"], e["count"]) for e in api.objects(EVENT)) == [
        ("A", 1),
        ("A", 1),
        ("B", 1),
        ("C", 1),
    ]
    await sink.close()


async def test_disabled_events_make_no_request(api: FakeKubeAPI) -> None:
    claim = await api.create(PVC, pvc("a"))
    clients = Clients(api, qps=5, burst=10, events=False)
    recorder = clients.recorder("c")
    assert not recorder.enabled
    await recorder.event(claim, "Warning", "Failed", "m")
    recorder.event(claim, "Warning", "Failed", "m")
    await clients.close()
    assert api.requests_of(EVENTS) == {} and api.objects(EVENT) == []
    assert EventRecorder(api, "c", enabled=False).enabled is False


async def test_clients_hand_out_one_sink_and_count_requests_by_loop(api: FakeKubeAPI) -> None:
    claim = await api.create(PVC, pvc("a"))
    clients = Clients(api, qps=0, burst=1)
    one, two = clients.recorder("one"), clients.recorder("two")
    assert one.sink is two.sink
    one.event(claim, "Normal", "R", "m")
    two.event(claim, "Normal", "R", "m")  # another component: another Event
    await clients.api_for("provisioner").get(PVC, "a", "ns")
    await clients.close()  # writes what is queued
    assert sorted(e["source"]["component"] for e in api.objects(EVENT)) == ["one", "two"]
    assert api.requests_of(EVENTS) == {("create", "events"): 2}
    assert api.requests_of(PROVISIONER) == {("get", "persistentvolumeclaims"): 1}
