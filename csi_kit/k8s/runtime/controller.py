"""What every loop shares: informers feeding work queues drained by workers.

A loop declares its informers and queues, maps informer events to queue keys,
and implements one `sync` per queue that reads the cache and converges the
world one step.  Syncs are level-triggered: they look at the current objects,
never at the event that woke them, which is what makes a restart (or a lost
event) harmless -- the next sync redoes whatever was not recorded in the API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from csi_kit.k8s.objects.resources import Resource
from csi_kit.k8s.runtime import metrics
from csi_kit.k8s.runtime.api import KubeAPI
from csi_kit.k8s.runtime.informer import Informer, InformerFactory, wait_synced
from csi_kit.k8s.runtime.workqueue import WorkQueue, run_workers

log = logging.getLogger(__name__)


class Retry(Exception):
    """Not a failure: come back later with backoff (e.g. a snapshot that is not ready yet)."""


class Loop:
    name = "loop"

    def __init__(
        self,
        *,
        informers: InformerFactory | None = None,
        workers: int = 10,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
    ) -> None:
        self.factory = informers or InformerFactory()
        self.workers = workers
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.informers: list[Informer] = []
        self.queues: list[tuple[WorkQueue, Callable[[str], Awaitable[None]]]] = []
        self.started = asyncio.Event()

    def informer(
        self,
        api: KubeAPI,
        res: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        resync_period: float = 0.0,
    ) -> Informer:
        """This loop's registration on the process's shared informer for `res` (`self.informers` lists it).

        `api` lists and watches only when the factory has no API of its own (a loop's private factory).
        """
        inf = self.factory.informer(
            api, res, namespace=namespace, label_selector=label_selector, resync_period=resync_period
        )
        self.informers.append(inf)
        return inf

    def queue(self, name: str, sync: Callable[[str], Awaitable[None]]) -> WorkQueue:
        q = WorkQueue(f"{self.name}/{name}", base_delay=self.base_delay, max_delay=self.max_delay)
        self.queues.append((q, sync))
        return q

    def _timed(
        self, q: WorkQueue, sync: Callable[[str], Awaitable[None]]
    ) -> Callable[[str], Awaitable[None]]:
        async def run(key: str) -> None:
            metrics.QUEUE_DEPTH.labels(q.name).set(len(q))
            with metrics.timed(self.name, q.name.rsplit("/", 1)[-1]):
                await sync(key)

        return run

    def _on_error(self, q: WorkQueue) -> Callable[[str, BaseException], None]:
        def report(key: str, e: BaseException) -> None:
            level = logging.DEBUG if isinstance(e, Retry) else logging.WARNING
            log.log(level, "%s: %s: %s (retry in %.1fs)", q.name, key, e, q.backoff(key))

        return report

    async def run(self) -> None:
        """Run informers and workers until cancelled; cancellation stops everything cleanly.

        A loop may be run again after it stopped (leader election does that when
        the lease comes back): its queues start empty, and its informers hand
        every object to its handlers again (a fresh list, or the cache of a
        shared informer that other loops kept running).  While it is stopped
        its handlers are not called.
        """
        self.started.clear()
        for q, _ in self.queues:
            q.reset()
        tasks = [asyncio.create_task(i.run()) for i in self.informers]
        synced = asyncio.ensure_future(wait_synced(self.informers))
        try:
            # Until every informer has synced -- or one failed: then say why instead of waiting forever.
            await asyncio.wait([synced, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                if t.done() and not synced.done():
                    t.result()
            self.started.set()
            await asyncio.gather(
                *tasks,
                *(
                    run_workers(q, self._timed(q, sync), self.workers, on_error=self._on_error(q))
                    for q, sync in self.queues
                ),
            )
        finally:
            for q, _ in self.queues:
                q.shutdown()
            for t in [synced, *tasks]:
                t.cancel()
            await asyncio.gather(synced, *tasks, return_exceptions=True)
