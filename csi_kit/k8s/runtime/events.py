"""Kubernetes Events, what `kubectl describe` shows under "Events": the one recorder of every loop.

client-go's model: a loop hands an Event to a recorder and goes on; a
broadcaster writes it in the background, through a path of its own, so a slow
or forbidden Event write never delays a sync nor the object write the Event
describes; a correlator turns repeats into a `count` bump on the Event already
written instead of a new object.  Here:

- `EventSink` is the process's one queue, drained by one background task
  through its own API handle (`Clients` gives it its own budget and the
  User-Agent `csi-kit-events/<v>`).  A repeat of an Event still queued only
  bumps the queued count (no extra request); a repeat of one already written
  is one PATCH of `count` and `lastTimestamp`.
- Memory is bounded: at most `queue_size` distinct Events wait (more are
  dropped and logged, as client-go drops when its queue is full), and the
  Events already written are remembered for `remember` keys (least recently
  used first out).
- `EventRecorder` is what a loop holds: the sink plus the `component` it
  reports as.  `event()` returns at once; it may also be awaited (the volume
  loops' call sites do), which waits for nothing.
- Disabled (`--no-events`), a recorder makes no request at all.

Rule: every loop's Events go through this module, never by a create of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Generator
from typing import Any

import attrs

from csi_kit.k8s.objects.resources import EVENT
from csi_kit.k8s.objects.times import rfc3339
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj, is_not_found, name_of, namespace_of, uid_of

log = logging.getLogger(__name__)

NORMAL = "Normal"
WARNING = "Warning"

# (component, involved object's uid, type, reason, message): client-go's correlator key, less the host.
_Key = tuple[str, str, str, str, str]


@attrs.define
class _Pending:
    """An Event waiting to be written; repeats while it waits only bump `count`."""

    obj: Obj
    count: int
    first: str
    last: str


@attrs.define
class _Written:
    """Where an Event went, so a repeat bumps its count instead of creating another."""

    name: str
    namespace: str
    count: int


class _Posted:
    """What `EventRecorder.event` returns: already done, so awaiting it waits for nothing."""

    def __await__(self) -> Generator[Any, None, None]:
        yield from ()


_POSTED = _Posted()


class EventSink:
    """The one Events queue of a process, written in the background through `api`."""

    def __init__(
        self, api: KubeAPI, *, enabled: bool = True, queue_size: int = 1024, remember: int = 4096
    ) -> None:
        self.api = api
        self.enabled = enabled
        self.queue_size = queue_size
        self.remember = remember
        self.dropped = 0
        self._pending: OrderedDict[_Key, _Pending] = OrderedDict()
        self._written: OrderedDict[_Key, _Written] = OrderedDict()
        self._task: asyncio.Task[None] | None = None

    def recorder(self, component: str) -> EventRecorder:
        return EventRecorder(component=component, sink=self)

    def post(self, component: str, obj: Obj, type_: str, reason: str, message: str) -> None:
        """Queue an Event about `obj` (never blocks, never raises for the API's sake)."""
        if not self.enabled:
            return
        key = (component, uid_of(obj), type_, reason, message)
        now = rfc3339()
        queued = self._pending.get(key)
        if queued is not None:
            queued.count += 1
            queued.last = now
            queued.obj = obj
            return
        if len(self._pending) >= self.queue_size:
            self.dropped += 1
            log.debug("event %s on %s dropped: %d events queued", reason, name_of(obj), len(self._pending))
            return
        self._pending[key] = _Pending(obj, 1, now, now)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    def forget(self, obj: Obj) -> None:
        """Let the next Event about `obj` be a new object, even if it repeats one already written.

        For a loop whose Events report a state that can clear and come back
        (the health monitor): a repeat after the state changed is news, not a
        count on the old Event.
        """
        uid = uid_of(obj)
        for key in [key for key in self._written if key[1] == uid]:
            del self._written[key]

    async def _drain(self) -> None:
        while self._pending:
            key, item = self._pending.popitem(last=False)
            try:
                await self._write(key, item)
            except (ApiError, OSError, ConnectionError) as e:
                log.debug("event %s on %s not recorded: %s", key[3], name_of(item.obj), e)
            except Exception:  # a malformed object must not stop the queue for everyone else
                log.warning("event %s on %s not recorded", key[3], name_of(item.obj), exc_info=True)

    async def _write(self, key: _Key, item: _Pending) -> None:
        done = self._written.get(key)
        if done is not None:
            count = done.count + item.count
            try:
                bump = {"count": count, "lastTimestamp": item.last}
                await self.api.patch(EVENT, done.name, bump, done.namespace)
            except ApiError as e:
                if not is_not_found(e):
                    raise
                item.count = count  # the Event expired (events have a TTL): a new one, as client-go does
            else:
                done.count = count
                self._written.move_to_end(key)
                return
        created = await self.api.create(EVENT, _body(key, item), _namespace(item.obj))
        self._written[key] = _Written(name_of(created), _namespace(item.obj), item.count)
        while len(self._written) > self.remember:
            self._written.popitem(last=False)

    async def flush(self) -> None:
        """Wait until every queued Event has been written (tests, clean shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for at most `timeout` seconds), then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._pending.clear()


def _namespace(obj: Obj) -> str:
    # Cluster-scoped objects' events go to "default", as client-go's recorder does.
    return namespace_of(obj) or "default"


def _body(key: _Key, item: _Pending) -> Obj:
    component, _, type_, reason, message = key
    obj = item.obj
    ns = _namespace(obj)
    involved = {
        "apiVersion": obj.get("apiVersion", ""),
        "kind": obj.get("kind", ""),
        "name": name_of(obj),
        "uid": uid_of(obj),
        "resourceVersion": str((obj.get("metadata") or {}).get("resourceVersion", "")),
    }
    if namespace_of(obj):
        involved["namespace"] = ns
    return {
        "apiVersion": EVENT.api_version,
        "kind": EVENT.kind,
        "metadata": {"name": f"{name_of(obj) or 'object'}.{time.time_ns():x}", "namespace": ns},
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": type_,
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": item.first,
        "lastTimestamp": item.last,
        "count": item.count,
    }


class EventRecorder:
    """Writes Events about the objects a loop works on, as `component` (best effort: never fails a sync).

    Built from an API (`EventRecorder(api, component)`), it has a sink of its
    own; `Clients.recorder` hands out recorders that share the process's one.
    """

    def __init__(
        self,
        api: KubeAPI | None = None,
        component: str = "csi-kit",
        *,
        enabled: bool = True,
        sink: EventSink | None = None,
    ) -> None:
        if sink is None:
            if api is None:
                raise TypeError("EventRecorder needs an api or a sink")
            sink = EventSink(api, enabled=enabled)
        self.sink = sink
        self.component = component

    @property
    def enabled(self) -> bool:
        return self.sink.enabled

    def event(self, obj: Obj, type_: str, reason: str, message: str) -> _Posted:
        """Queue an Event and return at once (the result may be awaited; it is already done)."""
        self.sink.post(self.component, obj, type_, reason, message)
        return _POSTED

    def forget(self, obj: Obj) -> None:
        self.sink.forget(obj)

    async def flush(self) -> None:
        """Wait for the Events still being written (tests, clean shutdown)."""
        await self.sink.flush()
