"""List + watch into a local cache, the way client-go's reflector does.

The informer lists once, then watches from the list's resourceVersion and
keeps the last version it saw, so a watch that ends (server timeout, dropped
connection) resumes where it stopped without a re-list.  Only 410 Gone (the
version was compacted away) forces a re-list; the re-list is diffed against the
cache, so handlers see the adds, updates and deletes they missed.  With a
resync period, every cached object is handed to the handlers again
periodically, which is how level-triggered loops recover from a lost update.

Handlers are plain callables (event, old, new) that must not block: they
normally just put a key on a work queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from csi_kit.k8s.runtime.api import (
    ApiError,
    KubeAPI,
    Obj,
    Resource,
    finalizers_of,
    is_deleting,
    is_gone,
    key_of,
    rv_newer,
    rv_of,
)

log = logging.getLogger(__name__)

Handler = Callable[[str, "Obj | None", "Obj | None"], None]
"""(event, old, new) with event one of ADDED, MODIFIED, DELETED, SYNC."""


class Informer:
    def __init__(
        self,
        api: KubeAPI,
        res: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        resync_period: float = 0.0,
        watch_timeout: int = 300,
        retry_delay: float = 1.0,
    ) -> None:
        self.api = api
        self.res = res
        self.namespace = namespace
        self.label_selector = label_selector
        self.resync_period = resync_period
        self.watch_timeout = watch_timeout
        self.retry_delay = retry_delay
        self.cache: dict[str, Obj] = {}
        self.synced = asyncio.Event()
        self.relists = 0
        self._handlers: list[Handler] = []
        self._last_rv = ""

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def get(self, key: str) -> Obj | None:
        return self.cache.get(key)

    def items(self) -> list[Obj]:
        return list(self.cache.values())

    def store_update(self, obj: Obj) -> None:
        """Put an object this process just wrote into the cache if it is newer.

        Upstream controllers do the same (storeObjectUpdate) so the next sync
        of the key does not act on the version it has just replaced.  Handlers
        are not called: the watch event that follows will do that.
        """
        key = key_of(obj)
        old = self.cache.get(key)
        if old is None or rv_newer(rv_of(obj), rv_of(old)):
            if is_deleting(obj) and not finalizers_of(obj):
                # The write removed the last finalizer: the object is gone.
                self.cache.pop(key, None)
            else:
                self.cache[key] = obj

    def store_delete(self, obj: Obj) -> None:
        self.cache.pop(key_of(obj), None)

    def _notify(self, event: str, old: Obj | None, new: Obj | None) -> None:
        for h in self._handlers:
            try:
                h(event, old, new)
            except Exception:  # a faulty handler must not stop the informer
                log.exception("informer %s: handler failed", self.res)

    def _replace(self, items: list[Obj]) -> None:
        fresh = {key_of(o): o for o in items}
        for key, old in list(self.cache.items()):
            if key not in fresh:
                del self.cache[key]
                self._notify("DELETED", old, None)
        for key, obj in fresh.items():
            prev = self.cache.get(key)
            self.cache[key] = obj
            if prev is None:
                self._notify("ADDED", None, obj)
            elif rv_of(prev) != rv_of(obj):
                self._notify("MODIFIED", prev, obj)

    def _apply(self, event: str, obj: Obj) -> None:
        key = key_of(obj)
        old = self.cache.get(key)
        if event == "DELETED":
            self.cache.pop(key, None)
            self._notify("DELETED", old, obj)
            return
        if old is not None and rv_newer(rv_of(old), rv_of(obj)):
            # This process already wrote a newer version (store_update); an event
            # for an older one must not roll the cache back.
            self._notify("MODIFIED", old, old)
            return
        self.cache[key] = obj
        self._notify("ADDED" if old is None else "MODIFIED", old, obj)

    async def _list(self) -> None:
        lst = await self.api.list(self.res, self.namespace, self.label_selector)
        self._replace(lst.items)
        self._last_rv = lst.resource_version
        self.synced.set()

    async def _watch(self) -> None:
        """Watch from the last version until the stream ends; raises ApiError(410) to ask for a re-list."""
        async for ev in self.api.watch(
            self.res,
            self._last_rv,
            self.namespace,
            self.label_selector,
            self.watch_timeout,
        ):
            rv = rv_of(ev.object)
            if ev.type != "BOOKMARK":
                self._apply(ev.type, ev.object)
            if rv:
                self._last_rv = rv

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_period)
            for obj in list(self.cache.values()):
                self._notify("SYNC", obj, obj)

    async def run(self) -> None:
        """Run until cancelled; each run starts from an empty cache, so every object is seen as added."""
        self.cache.clear()
        self.synced.clear()
        self._last_rv = ""
        resync = asyncio.create_task(self._resync()) if self.resync_period > 0 else None
        try:
            need_list = True
            while True:
                try:
                    if need_list:
                        await self._list()
                        need_list = False
                    await self._watch()
                except ApiError as e:
                    if is_gone(e):
                        log.info("informer %s: watch expired (410), re-listing", self.res)
                        self.relists += 1
                        need_list = True
                        continue
                    log.warning("informer %s: %s; retrying", self.res, e)
                    await asyncio.sleep(self.retry_delay)
                except (OSError, ConnectionError, TimeoutError) as e:
                    log.warning("informer %s: %s; retrying", self.res, e)
                    await asyncio.sleep(self.retry_delay)
        finally:
            if resync is not None:
                resync.cancel()


class InformerFactory:
    """Hands out the informers of one process's loops.

    Today every call makes its own informer; the runtime makes them shared
    (one list+watch per resource and selector for the whole process).
    """

    def informer(
        self,
        api: KubeAPI,
        res: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        resync_period: float = 0.0,
    ) -> Informer:
        return Informer(
            api, res, namespace=namespace, label_selector=label_selector, resync_period=resync_period
        )


async def wait_synced(informers: list[Informer]) -> None:
    await asyncio.gather(*(i.synced.wait() for i in informers))
