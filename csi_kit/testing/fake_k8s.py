"""An in-memory Kubernetes API with the semantics the loops depend on.

Not a mock: it keeps objects, hands out a monotonically increasing
resourceVersion, answers 409 Conflict to a stale update and 410 Gone to a watch
from a version older than its (bounded) history, honours finalizers and
deletionTimestamp (a delete with finalizers only marks the object; it goes when
the last finalizer is removed), generateName, and status as a subresource.
Every request is counted (`requests`) so benchmarks can report API cost, and
`reactors` let a test fail or delay a chosen request deterministically.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

from csi_kit.k8s.api import (
    ApiError,
    Obj,
    ObjectList,
    Resource,
    WatchEvent,
    already_exists,
    conflict,
    gone,
    invalid,
    match_labels,
    merge_patch,
    not_found,
)

Reactor = Callable[[str, Resource, str, "Obj | None"], "Awaitable[None] | None"]
"""Called before each request as (verb, resource, name, body); raise to fail the request."""

_WATCH_CLOSED = object()
_T = TypeVar("_T")


def _copy(o: _T) -> _T:
    """Deep copy of JSON-shaped data (dicts, lists, scalars): what the API server's (de)serialisation does.

    Several times faster than `copy.deepcopy`, which matters when a benchmark
    pushes thousands of objects through the fake.
    """
    if isinstance(o, dict):
        return cast(_T, {k: _copy(v) for k, v in o.items()})
    if isinstance(o, list):
        return cast(_T, [_copy(v) for v in o])
    return o


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Watcher:
    def __init__(self, res: Resource, namespace: str | None, selector: str | None) -> None:
        self.res = res
        self.namespace = namespace
        self.selector = selector
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def wants(self, res: Resource, obj: Obj) -> bool:
        if res != self.res:
            return False
        if self.namespace and obj["metadata"].get("namespace") != self.namespace:
            return False
        return match_labels(obj, self.selector)


class FakeKubeAPI:
    """Implements `csi_kit.k8s.api.KubeAPI` in memory.

    `history` bounds the number of events kept for watch resumption: a watch
    from a version older than the oldest kept event gets 410, as from an API
    server whose etcd was compacted; `compact()` drops all of it at once.
    """

    def __init__(self, *, history: int = 10_000) -> None:
        self._objects: dict[tuple[Resource, str, str], Obj] = {}
        self._rv = itertools.count(1)
        self._last_rv = 0
        self._history: deque[tuple[int, Resource, WatchEvent]] = deque(maxlen=history)
        self._compacted_rv = 0
        self._watchers: list[_Watcher] = []
        self.requests: Counter[tuple[str, str]] = Counter()
        self.reactors: list[Reactor] = []

    # ----------------------------------------------------------- test helpers

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def objects(self, res: Resource) -> list[Obj]:
        """Every stored object of a kind (copies; no request is counted)."""
        return [_copy(o) for (r, _, _), o in self._objects.items() if r == res]

    def view(self, res: Resource) -> Iterator[Obj]:
        """Stored objects of a kind without copying or counting: read them, never change them."""
        return (o for (r, _, _), o in list(self._objects.items()) if r == res)

    def peek(self, res: Resource, name: str, namespace: str | None = None) -> Obj | None:
        """One stored object without counting a request, or None."""
        o = self._objects.get((res, namespace or "", name))
        return _copy(o) if o is not None else None

    def compact(self) -> None:
        """Forget every event so far: any watch resumed from an older version gets 410."""
        self._history.clear()
        self._compacted_rv = self._last_rv

    def expire_watches(self) -> None:
        """End every open watch with 410 Gone, as an API server does after compaction."""
        self.compact()
        for w in self._watchers:
            w.queue.put_nowait(gone("too old resource version"))

    def close_watches(self) -> None:
        """End every open watch normally, as a server-side watch timeout does."""
        for w in self._watchers:
            w.queue.put_nowait(_WATCH_CLOSED)

    def fail(
        self,
        verb: str,
        res: Resource | None = None,
        error: BaseException | None = None,
        *,
        times: int = 1,
        name: str | None = None,
    ) -> None:
        """Make the next `times` matching requests fail with `error` (default 500)."""
        left = [times]
        err = error or ApiError(500, "InternalError", "injected")

        def reactor(v: str, r: Resource, n: str, _body: Obj | None) -> None:
            if v == verb and (res is None or r == res) and (name is None or n == name) and left[0] > 0:
                left[0] -= 1
                raise err

        self.reactors.append(reactor)

    # -------------------------------------------------------------- internals

    async def _request(self, verb: str, res: Resource, name: str, body: Obj | None = None) -> None:
        self.requests[(verb, res.plural)] += 1
        for reactor in list(self.reactors):
            r = reactor(verb, res, name, body)
            if r is not None:
                await r
        await asyncio.sleep(0)

    def _next_rv(self) -> str:
        self._last_rv = next(self._rv)
        return str(self._last_rv)

    def _emit(self, res: Resource, type_: str, obj: Obj) -> None:
        ev = WatchEvent(type_, _copy(obj))
        self._history.append((int(obj["metadata"]["resourceVersion"]), res, ev))
        for w in self._watchers:
            if w.wants(res, obj):
                w.queue.put_nowait(WatchEvent(type_, _copy(obj)))

    def _key(self, res: Resource, name: str, namespace: str | None) -> tuple[Resource, str, str]:
        if res.namespaced and not namespace:
            raise invalid(f"{res.kind} {name}: namespace is required")
        return (res, namespace or "" if res.namespaced else "", name)

    def _lookup(self, res: Resource, name: str, namespace: str | None) -> Obj:
        o = self._objects.get(self._key(res, name, namespace))
        if o is None:
            raise not_found(f'{res} "{name}" not found')
        return o

    def _store(self, res: Resource, old: Obj, new: Obj) -> Obj:
        """Commit `new` over `old`: bump resourceVersion, finish a pending deletion."""
        m = new["metadata"]
        if m.get("deletionTimestamp") and not m.get("finalizers"):
            m["resourceVersion"] = self._next_rv()
            del self._objects[self._key(res, m["name"], m.get("namespace"))]
            self._emit(res, "DELETED", new)
            return _copy(new)
        if new == old:
            return _copy(old)  # a no-op write does not bump the version, as in the real API
        m["resourceVersion"] = self._next_rv()
        if res.has_status and {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
            k: v for k, v in old.items() if k not in ("metadata", "status")
        }:
            m["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self._objects[self._key(res, m["name"], m.get("namespace"))] = new
        self._emit(res, "MODIFIED", new)
        return _copy(new)

    @staticmethod
    def _check_meta(old: Obj, new: Obj) -> None:
        om, nm = old["metadata"], new["metadata"]
        rv = nm.get("resourceVersion")
        if rv and rv != om["resourceVersion"]:
            raise conflict(
                f'Operation cannot be fulfilled on "{om["name"]}": the object has been modified; '
                "please apply your changes to the latest version and try again"
            )
        for immutable in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "namespace",
            "name",
        ):
            if nm.get(immutable) is not None and nm.get(immutable) != om.get(immutable):
                raise invalid(f"metadata.{immutable} is immutable")
            if om.get(immutable) is not None:
                nm[immutable] = om[immutable]
        if om.get("deletionTimestamp"):
            added = set(nm.get("finalizers") or []) - set(om.get("finalizers") or [])
            if added:
                raise invalid(
                    f"no new finalizers can be added if the object is being deleted: {sorted(added)}"
                )
        nm["generation"] = om.get("generation", 1)
        if not nm.get("finalizers"):
            nm.pop("finalizers", None)

    # ---------------------------------------------------------------- the API

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> Obj:
        await self._request("get", res, name)
        return _copy(self._lookup(res, name, namespace))

    async def list(
        self,
        res: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> ObjectList:
        await self._request("list", res, "")
        items = [
            _copy(o)
            for (r, ns, _), o in sorted(self._objects.items(), key=lambda kv: (kv[0][1], kv[0][2]))
            if r == res and (not namespace or ns == namespace) and match_labels(o, label_selector)
        ]
        return ObjectList(items, str(self._last_rv))

    async def watch(
        self,
        res: Resource,
        resource_version: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        timeout_seconds: int | None = None,
    ) -> AsyncIterator[WatchEvent]:
        await self._request("watch", res, "")
        start = int(resource_version or 0)
        if start < self._compacted_rv or (self._history and start < self._history[0][0] - 1):
            raise gone(f"too old resource version: {start} ({self._compacted_rv})")
        w = _Watcher(res, namespace, label_selector)
        for rv, r, ev in self._history:
            if rv > start and w.wants(r, ev.object):
                w.queue.put_nowait(WatchEvent(ev.type, _copy(ev.object)))
        self._watchers.append(w)
        try:
            while True:
                item = await w.queue.get()
                if item is _WATCH_CLOSED:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._watchers.remove(w)

    async def create(self, res: Resource, obj: Obj, namespace: str | None = None) -> Obj:
        new = _copy(obj)
        m = new.setdefault("metadata", {})
        await self._request("create", res, m.get("name") or m.get("generateName", ""), new)
        if res.namespaced:
            ns = namespace or m.get("namespace")
            if not ns:
                raise invalid(f"{res.kind}: namespace is required")
            if m.get("namespace") and namespace and m["namespace"] != namespace:
                raise invalid("namespace of the object does not match the request")
            m["namespace"] = ns
        else:
            m.pop("namespace", None)
        if not m.get("name"):
            if not m.get("generateName"):
                raise invalid(f"{res.kind}: metadata.name or metadata.generateName is required")
            while True:
                m["name"] = m["generateName"] + uuid.uuid4().hex[:5]
                if self._key(res, m["name"], m.get("namespace")) not in self._objects:
                    break
        key = self._key(res, m["name"], m.get("namespace"))
        if key in self._objects:
            raise already_exists(f'{res} "{m["name"]}" already exists')
        if m.get("resourceVersion"):
            raise invalid("resourceVersion should not be set on objects to be created")
        m.pop("deletionTimestamp", None)
        if res.has_status:
            new.pop("status", None)  # status is a subresource: only its own endpoint writes it
        m["uid"] = str(uuid.uuid4())
        m["creationTimestamp"] = _now()
        m["generation"] = 1
        m["resourceVersion"] = self._next_rv()
        new["apiVersion"] = res.api_version
        new["kind"] = res.kind
        self._objects[key] = new
        self._emit(res, "ADDED", new)
        return _copy(new)

    async def update(self, res: Resource, obj: Obj) -> Obj:
        m = obj.get("metadata", {})
        await self._request("update", res, m.get("name", ""), obj)
        old = self._lookup(res, m.get("name", ""), m.get("namespace"))
        new = _copy(obj)
        self._check_meta(old, new)
        if res.has_status:
            if "status" in old:
                new["status"] = _copy(old["status"])
            else:
                new.pop("status", None)
        return self._store(res, old, new)

    async def update_status(self, res: Resource, obj: Obj) -> Obj:
        m = obj.get("metadata", {})
        await self._request("update_status", res, m.get("name", ""), obj)
        if not res.has_status:
            raise not_found(f"{res} has no status subresource")
        old = self._lookup(res, m.get("name", ""), m.get("namespace"))
        rv = m.get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise conflict(
                f'Operation cannot be fulfilled on "{m.get("name")}": the object has been modified'
            )
        new = _copy(old)
        if obj.get("status") is None:
            new.pop("status", None)
        else:
            new["status"] = _copy(obj["status"])
        return self._store(res, old, new)

    async def patch(
        self,
        res: Resource,
        name: str,
        patch: Obj,
        namespace: str | None = None,
        *,
        status: bool = False,
    ) -> Obj:
        await self._request("patch_status" if status else "patch", res, name, patch)
        old = self._lookup(res, name, namespace)
        if status:
            if not res.has_status:
                raise not_found(f"{res} has no status subresource")
            rv = (patch.get("metadata") or {}).get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise conflict(f'Operation cannot be fulfilled on "{name}": the object has been modified')
            new = _copy(old)
            if "status" in patch:
                st = merge_patch(old.get("status"), patch["status"])
                if st is None:
                    new.pop("status", None)
                else:
                    new["status"] = st
            return self._store(res, old, new)
        new = merge_patch(old, patch)
        new.setdefault("metadata", {})
        self._check_meta(old, new)
        if res.has_status:
            if "status" in old:
                new["status"] = _copy(old["status"])
            else:
                new.pop("status", None)
        return self._store(res, old, new)

    async def delete(
        self,
        res: Resource,
        name: str,
        namespace: str | None = None,
        *,
        uid: str | None = None,
    ) -> None:
        await self._request("delete", res, name)
        old = self._lookup(res, name, namespace)
        if uid and old["metadata"]["uid"] != uid:
            raise conflict(
                f"Precondition failed: UID in precondition: {uid}, "
                f"UID in object meta: {old['metadata']['uid']}"
            )
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return
            new = _copy(old)
            new["metadata"]["deletionTimestamp"] = _now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            self._store(res, old, new)
            return
        gone_obj = _copy(old)
        gone_obj["metadata"]["resourceVersion"] = self._next_rv()
        del self._objects[self._key(res, name, namespace)]
        self._emit(res, "DELETED", gone_obj)
