"""Client-side QPS/burst limiting and request counting for the API adapters.

The same token bucket as client-go's default (upstream sidecars use QPS 5,
burst 10): every request, watch openings included, takes one token.  A limit
of 0 or below lifts it.  `ThrottledAPI` wraps any `KubeAPI`; leader election
gets its own unthrottled wrapper so loop traffic cannot starve the lease.

An upstream sidecar builds one clientset for the built-in kinds and one for
the snapshot CRDs, each with its own limiter; `ThrottledAPI` given a
`snapshot_limiter` does the same, so a loop's snapshot traffic does not wait
behind its PVC traffic (and the other way round).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

from csi_kit.k8s.runtime.api import KubeAPI, Obj, ObjectList, Resource, WatchEvent

#: The API groups upstream reaches through its second (snapshot) clientset.
SNAPSHOT_GROUPS = frozenset({"snapshot.storage.k8s.io", "groupsnapshot.storage.k8s.io"})


class TokenBucket:
    """`qps` tokens a second, at most `burst` saved up; `acquire` waits for one."""

    def __init__(self, qps: float, burst: int) -> None:
        self.qps = qps
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    @property
    def unlimited(self) -> bool:
        return self.qps <= 0

    async def acquire(self) -> None:
        if self.unlimited:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / self.qps)


class ThrottledAPI:
    """A `KubeAPI` that takes a token before each request and counts requests by verb.

    With `snapshot_limiter`, requests to `SNAPSHOT_GROUPS` take their token
    from it instead of from `limiter`.
    """

    def __init__(
        self, inner: KubeAPI, limiter: TokenBucket, *, snapshot_limiter: TokenBucket | None = None
    ) -> None:
        self.inner = inner
        self.limiter = limiter
        self.snapshot_limiter = snapshot_limiter or limiter
        self.requests: Counter[str] = Counter()

    async def _take(self, verb: str, res: Resource) -> None:
        self.requests[verb] += 1
        bucket = self.snapshot_limiter if res.group in SNAPSHOT_GROUPS else self.limiter
        await bucket.acquire()

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> Obj:
        await self._take("get", res)
        return await self.inner.get(res, name, namespace)

    async def list(
        self,
        res: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> ObjectList:
        await self._take("list", res)
        return await self.inner.list(res, namespace, label_selector)

    async def watch(
        self,
        res: Resource,
        resource_version: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        timeout_seconds: int | None = None,
    ) -> AsyncIterator[WatchEvent]:
        await self._take("watch", res)
        async for ev in self.inner.watch(res, resource_version, namespace, label_selector, timeout_seconds):
            yield ev

    async def create(self, res: Resource, obj: Obj, namespace: str | None = None) -> Obj:
        await self._take("create", res)
        return await self.inner.create(res, obj, namespace)

    async def update(self, res: Resource, obj: Obj) -> Obj:
        await self._take("update", res)
        return await self.inner.update(res, obj)

    async def update_status(self, res: Resource, obj: Obj) -> Obj:
        await self._take("update_status", res)
        return await self.inner.update_status(res, obj)

    async def patch(
        self,
        res: Resource,
        name: str,
        patch: Obj,
        namespace: str | None = None,
        *,
        status: bool = False,
    ) -> Obj:
        await self._take("patch", res)
        return await self.inner.patch(res, name, patch, namespace, status=status)

    async def delete(
        self,
        res: Resource,
        name: str,
        namespace: str | None = None,
        *,
        uid: str | None = None,
    ) -> None:
        await self._take("delete", res)
        await self.inner.delete(res, name, namespace, uid=uid)
