"""An in-memory Kubernetes API with the semantics the loops depend on.

Not a mock: it keeps objects, hands out a monotonically increasing
resourceVersion, answers 409 Conflict to a stale update and 410 Gone to a watch
from a version older than its (bounded) history, honours finalizers and
deletionTimestamp (a delete with finalizers only marks the object; it goes when
the last finalizer is removed), generateName, and status as a subresource.
Every request is counted (`requests`, and `requests_by_agent` by the
User-Agent of the handle that sent it: `with_agent` gives a handle on the same
store, as the lightkube adapter opens a client per agent) so benchmarks can
report API cost, and `reactors` let a test fail or delay a chosen request
deterministically.

Where kube-apiserver (v1.36, checked against a real one) behaves in a way a
loop can notice, the fake does the same:

- A write carrying `metadata.resourceVersion` -- update or merge patch, main
  resource or status -- is refused with 409 Conflict, reason "Conflict",
  message "Operation cannot be fulfilled on <resource> "<name>": the object
  has been modified; please apply your changes to the latest version and try
  again", when the object changed since.  Without a version an update of a
  built-in kind is unconditional; a custom resource (the snapshot kinds)
  requires one (422).
- Status subresource writes change only `.status` of a custom resource; for
  the core kinds (PVC, PV, Node) they also take metadata changes (labels,
  annotations, finalizers) -- only the spec is reset -- which the upstream
  resizer relies on to set an annotation in the same write.  Main-resource
  writes never change `.status` of a kind with a status subresource.
- PersistentVolumeClaim validation and admission: after binding the spec is
  immutable but for `resources.requests` (`volumeName` may be set once); the
  request may be lowered only to a size still above `status.capacity` (the
  recovery from a failed expansion), and raised only when the claim's
  StorageClass has `allowVolumeExpansion` (403 otherwise).
- A label-selected watch sees an object that stops matching as DELETED and one
  that starts matching as ADDED; a watch from version "" or "0" starts with
  the current objects as ADDED (not a replay of history).
- generateName appends five characters of the API server's alphabet to at
  most 58 characters of prefix.
- 404/409/422 messages read as kube-apiserver's do (`persistentvolumeclaims
  "x" not found`, `PersistentVolumeClaim "x" is invalid: <field>: <detail>`).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import random
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

from csi_kit.k8s.objects.quantity import parse_quantity
from csi_kit.k8s.objects.times import rfc3339
from csi_kit.k8s.runtime.api import (
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

#: API groups served by kube-apiserver itself; any other group is a custom resource (CRD).
_BUILTIN_GROUPS = frozenset(
    {
        "",
        "apps",
        "batch",
        "coordination.k8s.io",
        "events.k8s.io",
        "rbac.authorization.k8s.io",
        "storage.k8s.io",
    }
)
#: utilrand's alphabet for generateName: no vowels, no look-alikes.
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_MAX_GENERATED_PREFIX = 63 - 5
#: Metadata a core kind's status write may change (its status strategy resets only the spec).
_STATUS_WRITABLE_META = ("labels", "annotations", "finalizers", "ownerReferences")
_MODIFIED_MESSAGE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def _is_crd(res: Resource) -> bool:
    return res.group not in _BUILTIN_GROUPS


def _stale(res: Resource, name: str) -> ApiError:
    return conflict(f'Operation cannot be fulfilled on {res} "{name}": {_MODIFIED_MESSAGE}')


def _invalid(res: Resource, name: str, field: str, detail: str) -> ApiError:
    return invalid(f'{res.kind} "{name}" is invalid: {field}: {detail}')


def _storage(obj: Obj, *path: str) -> int | None:
    cur: Any = obj
    for p in path:
        cur = cur.get(p) if isinstance(cur, dict) else None
    if not isinstance(cur, dict) or cur.get("storage") is None:
        return None
    try:
        return parse_quantity(cur["storage"])
    except ValueError:
        return None


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
    return rfc3339()


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

    def event_for(self, res: Resource, type_: str, obj: Obj, prev: Obj | None) -> WatchEvent | None:
        """What this watch sees of a change, as the API server's watch cache filters it.

        An object leaving the selector is DELETED (its previous content at the
        new version), one entering it is ADDED.
        """
        now = type_ != "DELETED" and self.wants(res, obj)
        before = self.wants(res, prev) if prev is not None else type_ == "DELETED" and self.wants(res, obj)
        if now and (before or prev is None):
            return WatchEvent(type_, _copy(obj))
        if now:
            return WatchEvent("ADDED", _copy(obj))
        if before:
            gone_obj = _copy(prev if prev is not None else obj)
            gone_obj["metadata"]["resourceVersion"] = obj["metadata"]["resourceVersion"]
            return WatchEvent("DELETED", gone_obj)
        return None


class _Versions:
    """The store's resourceVersion clock, one object shared by every agent's handle."""

    def __init__(self) -> None:
        # Versions start above 0, as an etcd revision does: "0" asks a watch for "any version".
        self.counter = itertools.count(2)
        self.last = 1
        self.compacted = 0


class FakeKubeAPI:
    """Implements `csi_kit.k8s.runtime.api.KubeAPI` in memory.

    `history` bounds the number of events kept for watch resumption: a watch
    from a version older than the oldest kept event gets 410, as from an API
    server whose etcd was compacted; `compact()` drops all of it at once.
    """

    def __init__(self, *, history: int = 10_000, agent: str = "") -> None:
        self._objects: dict[tuple[Resource, str, str], Obj] = {}
        self._versions = _Versions()
        self._history: deque[tuple[int, Resource, str, Obj, Obj | None]] = deque(maxlen=history)
        self._watchers: list[_Watcher] = []
        self.agent = agent
        self.requests: Counter[tuple[str, str]] = Counter()
        self.requests_by_agent: Counter[tuple[str, str, str]] = Counter()
        self.reactors: list[Reactor] = []

    def with_agent(self, agent: str) -> FakeKubeAPI:
        """A handle on the same objects, watches, counters and reactors whose requests count as `agent`."""
        handle = copy.copy(self)  # shares every container; the clock is one shared object too
        handle.agent = agent
        return handle

    # ----------------------------------------------------------- test helpers

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def requests_of(self, agent: str) -> Counter[tuple[str, str]]:
        """(verb, plural) counts of the requests one User-Agent sent."""
        return Counter({(v, p): n for (a, v, p), n in self.requests_by_agent.items() if a == agent})

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
        self._versions.compacted = self._versions.last

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
        self.requests_by_agent[(self.agent, verb, res.plural)] += 1
        for reactor in list(self.reactors):
            r = reactor(verb, res, name, body)
            if r is not None:
                await r
        await asyncio.sleep(0)

    def _next_rv(self) -> str:
        self._versions.last = next(self._versions.counter)
        return str(self._versions.last)

    def _emit(self, res: Resource, type_: str, obj: Obj, prev: Obj | None = None) -> None:
        obj, prev = _copy(obj), _copy(prev) if prev is not None else None
        self._history.append((int(obj["metadata"]["resourceVersion"]), res, type_, obj, prev))
        for w in self._watchers:
            ev = w.event_for(res, type_, obj, prev)
            if ev is not None:
                w.queue.put_nowait(ev)

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
            self._emit(res, "DELETED", new, old)
            return _copy(new)
        if new == old:
            return _copy(old)  # a no-op write does not bump the version, as in the real API
        m["resourceVersion"] = self._next_rv()
        if res.has_status and {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
            k: v for k, v in old.items() if k not in ("metadata", "status")
        }:
            m["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self._objects[self._key(res, m["name"], m.get("namespace"))] = new
        self._emit(res, "MODIFIED", new, old)
        return _copy(new)

    @staticmethod
    def _check_meta(res: Resource, old: Obj, new: Obj) -> None:
        om, nm = old["metadata"], new["metadata"]
        rv = nm.get("resourceVersion")
        if rv and rv != om["resourceVersion"]:
            raise _stale(res, om["name"])
        for immutable in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "namespace",
            "name",
        ):
            if nm.get(immutable) is not None and nm.get(immutable) != om.get(immutable):
                raise _invalid(
                    res,
                    om["name"],
                    f"metadata.{immutable}",
                    f'Invalid value: "{nm[immutable]}": field is immutable',
                )
            if om.get(immutable) is not None:
                nm[immutable] = om[immutable]
        if om.get("deletionTimestamp"):
            added = set(nm.get("finalizers") or []) - set(om.get("finalizers") or [])
            if added:
                raise _invalid(
                    res,
                    om["name"],
                    "metadata.finalizers",
                    f"Forbidden: no new finalizers can be added if the object is being deleted, "
                    f"found new finalizers {sorted(added)}",
                )
        nm["generation"] = om.get("generation", 1)
        if not nm.get("finalizers"):
            nm.pop("finalizers", None)

    def _status_write(self, res: Resource, old: Obj, status: Any, meta: Obj | None) -> Obj:
        """The object after a status write: `status`; for a core kind also `meta`'s labels, annotations...

        `meta` is the metadata the write asks for (the sent object's, or the
        old one with the patch merged in); None when the write sends none.
        """
        new = _copy(old)
        if status is None:
            new.pop("status", None)
        else:
            new["status"] = _copy(status)
        if meta is not None and res.group == "":
            nm = new["metadata"]
            for key in _STATUS_WRITABLE_META:  # `meta` is the whole metadata the write asks for
                if meta.get(key):
                    nm[key] = _copy(meta[key])
                else:
                    nm.pop(key, None)
            self._check_meta(res, old, new)
        return new

    def _admit(self, res: Resource, old: Obj, new: Obj) -> None:
        """kube-apiserver's validation and admission of a main-resource write (PVC rules only)."""
        if res.kind != "PersistentVolumeClaim" or res.group != "":
            return
        name = old["metadata"]["name"]
        ospec, nspec = dict(old.get("spec") or {}), dict(new.get("spec") or {})
        bound = (old.get("status") or {}).get("phase") == "Bound"
        if not ospec.get("volumeName"):
            ospec["volumeName"] = nspec.get("volumeName")  # the binder sets it once
        if bound:
            for spec in (ospec, nspec):
                spec["resources"] = dict(spec.get("resources") or {})
                spec["resources"].pop("requests", None)
                spec.pop("volumeAttributesClassName", None)
        if {k: v for k, v in ospec.items() if v is not None} != {
            k: v for k, v in nspec.items() if v is not None
        }:
            raise _invalid(
                res,
                name,
                "spec",
                "Forbidden: spec is immutable after creation except resources.requests and "
                "volumeAttributesClassName for bound claims",
            )
        was = _storage(old, "spec", "resources", "requests")
        want = _storage(new, "spec", "resources", "requests")
        if was is None or want is None or want == was:
            return
        if want < was and want <= (_storage(old, "status", "capacity") or 0):
            raise _invalid(
                res,
                name,
                "spec.resources.requests.storage",
                "Forbidden: field can not be less than status.capacity",
            )
        if want > was:
            cls_name = str((new.get("spec") or {}).get("storageClassName") or "")
            cls = next(
                (
                    o
                    for (r, _, n), o in self._objects.items()
                    if r.plural == "storageclasses" and r.group == "storage.k8s.io" and n == cls_name
                ),
                None,
            )
            if cls is None or cls.get("allowVolumeExpansion") is not True:
                raise ApiError(
                    403,
                    "Forbidden",
                    f'{res} "{name}" is forbidden: only dynamically provisioned pvc can be resized and '
                    "the storageclass that provisions the pvc must support resize",
                )

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
        return ObjectList(items, str(self._versions.last))

    async def watch(
        self,
        res: Resource,
        resource_version: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        timeout_seconds: int | None = None,
    ) -> AsyncIterator[WatchEvent]:
        await self._request("watch", res, "")
        w = _Watcher(res, namespace, label_selector)
        if resource_version in ("", "0"):
            # "Any version": the current state as ADDED events, then what follows.
            for (r, _, _), o in sorted(self._objects.items(), key=lambda kv: kv[0][1:]):
                if w.wants(r, o):
                    w.queue.put_nowait(WatchEvent("ADDED", _copy(o)))
        else:
            start = int(resource_version)
            compacted = self._versions.compacted
            if start < compacted or (self._history and start < self._history[0][0] - 1):
                raise gone(f"too old resource version: {start} ({compacted})")
            for rv, r, type_, obj, prev in self._history:
                if rv > start:
                    ev = w.event_for(r, type_, obj, prev)
                    if ev is not None:
                        w.queue.put_nowait(ev)
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
            prefix = str(m["generateName"])[:_MAX_GENERATED_PREFIX]
            while True:
                m["name"] = prefix + "".join(random.choice(_NAME_ALPHABET) for _ in range(5))
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
        if _is_crd(res) and not m.get("resourceVersion"):
            raise _invalid(
                res,
                old["metadata"]["name"],
                "metadata.resourceVersion",
                "Invalid value: 0x0: must be specified for an update",
            )
        self._check_meta(res, old, new)
        if res.has_status:
            if "status" in old:
                new["status"] = _copy(old["status"])
            else:
                new.pop("status", None)
        self._admit(res, old, new)
        return self._store(res, old, new)

    async def update_status(self, res: Resource, obj: Obj) -> Obj:
        m = obj.get("metadata", {})
        await self._request("update_status", res, m.get("name", ""), obj)
        if not res.has_status:
            raise not_found(f"{res} has no status subresource")
        old = self._lookup(res, m.get("name", ""), m.get("namespace"))
        rv = m.get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise _stale(res, old["metadata"]["name"])
        if _is_crd(res) and not rv:
            raise _invalid(
                res,
                old["metadata"]["name"],
                "metadata.resourceVersion",
                "Invalid value: 0x0: must be specified for an update",
            )
        return self._store(res, old, self._status_write(res, old, obj.get("status"), m))

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
            meta = patch.get("metadata") or {}
            rv = meta.get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise _stale(res, name)
            new_status = (
                merge_patch(old.get("status"), patch["status"]) if "status" in patch else old.get("status")
            )
            merged_meta = merge_patch(old["metadata"], meta) if meta else None
            return self._store(res, old, self._status_write(res, old, new_status, merged_meta))
        new = merge_patch(old, patch)
        new.setdefault("metadata", {})
        self._check_meta(res, old, new)
        if res.has_status:
            if "status" in old:
                new["status"] = _copy(old["status"])
            else:
                new.pop("status", None)
        self._admit(res, old, new)
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
