"""Work queue, informer, leader election and rate limiter."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from k8s_helpers import eventually

from csi_kit.k8s.objects.resources import LEASE, VOLUME_SNAPSHOT
from csi_kit.k8s.runtime.api import ApiError, Obj, Resource
from csi_kit.k8s.runtime.informer import Informer
from csi_kit.k8s.runtime.leader import LeaderElector
from csi_kit.k8s.runtime.ratelimit import ThrottledAPI, TokenBucket
from csi_kit.k8s.runtime.workqueue import WorkQueue, run_workers
from csi_kit.testing.fake_k8s import FakeKubeAPI


async def test_queue_deduplicates_and_never_runs_a_key_twice_at_once() -> None:
    q = WorkQueue()
    q.add("a")
    q.add("a")
    q.add("b")
    assert len(q) == 2
    key = await q.get()
    assert key == "a"
    q.add("a")  # re-added while in flight: parked, not queued
    assert len(q) == 1
    assert await q.get() == "b"
    assert len(q) == 0
    q.done("a")
    assert len(q) == 1 and await q.get() == "a"


async def test_backoff_doubles_up_to_the_cap_and_forget_resets() -> None:
    q = WorkQueue(base_delay=1.0, max_delay=300.0)
    delays = []
    for _ in range(11):
        delays.append(q.backoff("k"))
        q.add_rate_limited("k")
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0] and delays[-1] == 300.0
    for _ in range(1100):  # a key failing for days: 2**1024 would overflow a float
        q.add_rate_limited("k")
    assert q.backoff("k") == 300.0
    q.forget("k")
    assert q.backoff("k") == 1.0
    q.shutdown()


async def test_workers_retry_failures_and_bound_concurrency() -> None:
    q = WorkQueue(base_delay=0.001, max_delay=0.01)
    attempts: dict[str, int] = {}
    running = 0
    peak = 0

    async def handler(key: str) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001)
        running -= 1
        attempts[key] = attempts.get(key, 0) + 1
        if key == "flaky" and attempts[key] < 3:
            raise RuntimeError("not yet")

    for k in ["flaky", *(f"k{i}" for i in range(20))]:
        q.add(k)
    task = asyncio.create_task(run_workers(q, handler, 4, on_error=lambda k, e: None))
    await eventually(lambda: attempts.get("flaky") == 3 and len(attempts) == 21, "all done")
    q.shutdown()
    await task
    assert peak <= 4 and attempts["k0"] == 1


async def test_informer_fills_cache_resumes_and_relists_on_410() -> None:
    api = FakeKubeAPI()
    await api.create(VOLUME_SNAPSHOT, {"metadata": {"name": "a", "namespace": "ns"}})
    seen: list[tuple[str, str]] = []
    inf = Informer(api, VOLUME_SNAPSHOT)
    inf.add_handler(lambda ev, old, new: seen.append((ev, ((new or old) or {})["metadata"]["name"])))
    task = asyncio.create_task(inf.run())
    try:
        await inf.synced.wait()
        assert list(inf.cache) == ["ns/a"]
        api.close_watches()  # a server-side timeout: resume without re-list
        await api.create(VOLUME_SNAPSHOT, {"metadata": {"name": "b", "namespace": "ns"}})
        await eventually(lambda: "ns/b" in inf.cache, "b seen")
        assert api.requests[("list", "volumesnapshots")] == 1 and inf.relists == 0
        api.expire_watches()  # compaction: the informer must re-list and diff
        await api.delete(VOLUME_SNAPSHOT, "a", "ns")
        await api.create(VOLUME_SNAPSHOT, {"metadata": {"name": "c", "namespace": "ns"}})
        await eventually(lambda: set(inf.cache) == {"ns/b", "ns/c"}, "cache caught up")
        assert inf.relists == 1 and ("DELETED", "a") in seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Partition:
    """Makes every lease request of one identity fail, as a network partition would."""

    def __init__(self) -> None:
        self.cut: set[str] = set()
        self.current = ""

    def reactor(self, verb: str, res: Resource, name: str, body: Obj | None) -> None:
        holder = ((body or {}).get("spec") or {}).get("holderIdentity")
        if res == LEASE and verb in ("update", "create") and holder in self.cut:
            raise ApiError(503, "ServiceUnavailable", "partitioned")


async def test_leader_election_one_leader_loses_on_partition_and_hands_over() -> None:
    api = FakeKubeAPI()
    part = Partition()
    api.reactors.append(part.reactor)
    timing = {"lease_duration": 0.6, "renew_deadline": 0.4, "retry_period": 0.05}
    running: dict[str, bool] = {"a": False, "b": False}
    stopped: list[str] = []

    def body_for(who: str):  # type: ignore[no-untyped-def]
        async def body() -> None:
            running[who] = True
            try:
                await asyncio.Event().wait()
            finally:
                running[who] = False
                stopped.append(who)

        return body

    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    a = LeaderElector(api, lease_name="l", namespace="ns", identity="a", **timing)
    b = LeaderElector(api, lease_name="l", namespace="ns", identity="b", **timing)
    ta = asyncio.create_task(a.run(body_for("a"), stop_a))
    await eventually(lambda: running["a"], "a leads")
    tb = asyncio.create_task(b.run(body_for("b"), stop_b))
    await asyncio.sleep(0.2)
    assert running["a"] and not running["b"], "one leader at a time"

    part.cut.add("a")  # a can no longer renew: it must stop its loops, then b takes over
    await eventually(lambda: stopped == ["a"], "a stopped its loops")
    assert not running["b"], "b must not lead before a's lease could have expired"
    await eventually(lambda: running["b"], "b took over")
    lease = api.peek(LEASE, "l", "ns")
    assert (
        lease is not None
        and lease["spec"]["holderIdentity"] == "b"
        and lease["spec"]["leaseTransitions"] == 1
    )

    stop_b.set()  # clean stop releases the lease at once
    await asyncio.wait_for(tb, 5)
    lease = api.peek(LEASE, "l", "ns")
    assert lease is not None and not lease["spec"].get("holderIdentity")
    part.cut.clear()
    await eventually(lambda: running["a"], "a leads again without waiting out the lease")
    stop_a.set()
    await asyncio.wait_for(ta, 5)


def test_elector_rejects_inconsistent_durations() -> None:
    with pytest.raises(ValueError):
        LeaderElector(
            FakeKubeAPI(), lease_name="l", namespace="n", identity="i", lease_duration=5, renew_deadline=10
        )


async def test_token_bucket_spends_burst_then_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    slept: list[float] = []
    monkeypatch.setattr("csi_kit.k8s.runtime.ratelimit.time.monotonic", lambda: clock[0])

    async def fake_sleep(d: float) -> None:
        slept.append(d)
        clock[0] += d

    monkeypatch.setattr("csi_kit.k8s.runtime.ratelimit.asyncio.sleep", fake_sleep)
    tb = TokenBucket(qps=5, burst=10)
    for _ in range(10):
        await tb.acquire()
    assert slept == []
    await tb.acquire()
    assert slept == [pytest.approx(0.2)]
    clock[0] += 10  # idle time refills at most `burst`
    for _ in range(10):
        await tb.acquire()
    assert len(slept) == 1


async def test_throttled_api_counts_and_passes_through() -> None:
    inner = FakeKubeAPI()
    api = ThrottledAPI(inner, TokenBucket(qps=0, burst=1))
    await api.create(VOLUME_SNAPSHOT, {"metadata": {"name": "a", "namespace": "ns"}})
    await api.get(VOLUME_SNAPSHOT, "a", "ns")
    assert api.requests == {"create": 1, "get": 1} and inner.total_requests == 2
