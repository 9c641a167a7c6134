"""List + watch into a local cache, the way client-go's reflector and shared informers do.

A `SharedInformer` lists once, then watches from the list's resourceVersion and
keeps the last version it saw, so a watch that ends (server timeout, dropped
connection) resumes where it stopped without a re-list.  Only 410 Gone (the
version was compacted away) forces a re-list; the re-list is diffed against
what the handlers were told, so they see the adds, updates and deletes they
missed.

One process has one `SharedInformer` per (resource, namespace, selector),
from its `InformerFactory` (client-go's shared informer factory): the loops
that read PVCs share one list and one watch.  What a loop holds is an
`Informer`, its registration on the shared one (client-go's
AddEventHandlerWithResyncPeriod): its own handlers and resync period, the
shared cache.  While a loop runs its informers are attached; an attaching
informer gets every cached object replayed to its handlers as ADDED (a loop
restarted by leader election starts from the whole world again) and its
`synced` is set once that is done; a detached informer's handlers are not
called.  The shared informer lists and watches while at least one informer is
attached, through the API it was made with (`Clients` gives the factory its
own, outside every loop's budget); the last one detaching stops it, and the
next start lists afresh.

Handlers are plain callables (event, old, new) that must not block: they
normally just put a key on a work queue.  `old` is the version the handlers
were last told of (a loop's own writes, put in the cache by `store_update`,
do not change what the next watch event looks like to the other loops).

Rule: loops read the objects they react to from informers (never a list of
their own), and get them from the process's factory, so each (resource,
namespace, selector) is listed and watched once.
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


class SharedInformer:
    """One list+watch of a resource (in a namespace, with a selector) feeding every attached `Informer`."""

    def __init__(
        self,
        api: KubeAPI,
        res: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        watch_timeout: int = 300,
        retry_delay: float = 1.0,
    ) -> None:
        self.api = api
        self.res = res
        self.namespace = namespace
        self.label_selector = label_selector
        self.watch_timeout = watch_timeout
        self.retry_delay = retry_delay
        self.cache: dict[str, Obj] = {}
        self.synced = asyncio.Event()
        self.relists = 0
        self.starts = 0
        self._told: dict[str, Obj] = {}  # the version the handlers last saw, by key
        self._attached: list[Informer] = []
        self._task: asyncio.Task[None] | None = None
        self._last_rv = ""

    # ------------------------------------------------------------ attaching

    def attach(self, informer: Informer) -> asyncio.Task[None]:
        """Start delivering to `informer`; replay the cache to it when already synced.

        Returns the list+watch task, which ends only by failing (or when the
        last informer detaches): an attached informer waits on it, so a
        failure ends the loops that read it, as a loop's own informer did.
        """
        if informer not in self._attached:
            self._attached.append(informer)
            if self._task is not None and not self._task.done() and self.synced.is_set():
                informer._replay(list(self.cache.values()))
        if self._task is None or self._task.done():
            self.starts += 1
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._task

    def detach(self, informer: Informer) -> asyncio.Task[None] | None:
        """Stop delivering to `informer`; stop listing and watching when nobody is attached.

        Synchronous, so that a detaching informer cancelled once more (as a
        stopping loop's tasks are) cannot leave itself attached; returns the
        list+watch task it cancelled, for the caller to wait on.
        """
        if informer in self._attached:
            self._attached.remove(informer)
        if self._attached or self._task is None:
            return None
        task, self._task = self._task, None
        self.synced.clear()  # a later start must not replay this run's cache as if synced
        task.cancel()
        return task

    @property
    def running(self) -> bool:
        return self._task is not None

    # ----------------------------------------------------------------- cache

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
        for informer in list(self._attached):
            informer._deliver(event, old, new)

    def _keep(self, key: str, obj: Obj) -> Obj:
        """Cache `obj` unless this process wrote a newer version (an older event must not roll it back)."""
        cached = self.cache.get(key)
        if cached is not None and rv_newer(rv_of(cached), rv_of(obj)):
            return cached
        self.cache[key] = obj
        return obj

    def _replace(self, items: list[Obj]) -> None:
        fresh = {key_of(o): o for o in items}
        for key in [key for key in {**self._told, **self.cache} if key not in fresh]:
            old = self._told.pop(key, None) or self.cache.get(key)
            self.cache.pop(key, None)
            self._notify("DELETED", old, None)
        for key, obj in fresh.items():
            told = self._told.get(key)
            self._told[key] = obj
            new = self._keep(key, obj)
            if told is None:
                self._notify("ADDED", None, new)
            elif rv_of(told) != rv_of(obj):
                self._notify("MODIFIED", told, new)

    def _apply(self, event: str, obj: Obj) -> None:
        key = key_of(obj)
        told = self._told.get(key)
        if event == "DELETED":
            self.cache.pop(key, None)
            self._told.pop(key, None)
            self._notify("DELETED", told, obj)
            return
        self._told[key] = obj
        self._notify("ADDED" if told is None else "MODIFIED", told, self._keep(key, obj))

    # ------------------------------------------------------------ list+watch

    async def _list(self) -> None:
        lst = await self.api.list(self.res, self.namespace, self.label_selector)
        self._replace(lst.items)
        self._last_rv = lst.resource_version
        if not self.synced.is_set():
            self.synced.set()
            for informer in list(self._attached):
                informer.synced.set()

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

    async def _run(self) -> None:
        """List and watch until cancelled; each start begins from an empty cache, so every object is added."""
        self.cache.clear()
        self._told.clear()
        self.synced.clear()
        self._last_rv = ""
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


class Informer:
    """One loop's registration on a `SharedInformer`: its handlers and resync period over the shared cache.

    Built without `shared`, it has a shared informer of its own (tests,
    embedders, a loop without a factory).  `run()` attaches it until cancelled.
    """

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
        shared: SharedInformer | None = None,
    ) -> None:
        self.shared = shared or SharedInformer(
            api,
            res,
            namespace=namespace,
            label_selector=label_selector,
            watch_timeout=watch_timeout,
            retry_delay=retry_delay,
        )
        self.resync_period = resync_period
        self.synced = asyncio.Event()
        self._handlers: list[Handler] = []

    @property
    def res(self) -> Resource:
        return self.shared.res

    @property
    def cache(self) -> dict[str, Obj]:
        return self.shared.cache

    @property
    def relists(self) -> int:
        return self.shared.relists

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def get(self, key: str) -> Obj | None:
        return self.shared.cache.get(key)

    def items(self) -> list[Obj]:
        return list(self.shared.cache.values())

    def store_update(self, obj: Obj) -> None:
        self.shared.store_update(obj)

    def store_delete(self, obj: Obj) -> None:
        self.shared.store_delete(obj)

    def _deliver(self, event: str, old: Obj | None, new: Obj | None) -> None:
        for h in self._handlers:
            try:
                h(event, old, new)
            except Exception:  # a faulty handler must not stop the informer
                log.exception("informer %s: handler failed", self.res)

    def _replay(self, objs: list[Obj]) -> None:
        for obj in objs:
            self._deliver("ADDED", None, obj)
        self.synced.set()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_period)
            for obj in list(self.shared.cache.values()):
                self._deliver("SYNC", obj, obj)

    async def run(self) -> None:
        """Receive events until cancelled (`synced` is set once the cache has been handed over)."""
        self.synced.clear()
        watching = self.shared.attach(self)
        resync = asyncio.create_task(self._resync()) if self.resync_period > 0 else None
        try:
            await asyncio.shield(watching)  # returns only if the list+watch failed: raises its error
        finally:
            self.synced.clear()
            stopped = [t for t in (resync, self.shared.detach(self)) if t is not None]
            for t in stopped:
                t.cancel()
            await asyncio.gather(*stopped, return_exceptions=True)


class InformerFactory:
    """Hands out one process's informers: one `SharedInformer` per (resource, namespace, selector).

    With `api`, every shared informer lists and watches through it (the
    loops' own API handles, and their budgets, are not used); without, through
    the API of the first loop that asks (a loop's private factory).
    """

    def __init__(self, api: KubeAPI | None = None) -> None:
        self.api = api
        self._shared: dict[tuple[Resource, str, str], SharedInformer] = {}

    def informer(
        self,
        api: KubeAPI,
        res: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        resync_period: float = 0.0,
    ) -> Informer:
        key = (res, namespace or "", label_selector or "")
        shared = self._shared.get(key)
        if shared is None:
            shared = self._shared[key] = SharedInformer(
                self.api or api, res, namespace=namespace or None, label_selector=label_selector or None
            )
        return Informer(api, res, resync_period=resync_period, shared=shared)

    @property
    def shared(self) -> list[SharedInformer]:
        return list(self._shared.values())


async def wait_synced(informers: list[Informer]) -> None:
    await asyncio.gather(*(i.synced.wait() for i in informers))
