"""Optional Kubernetes Events, what `kubectl describe` shows under "Events".

Off by default: each Event is an API write, and everything an Event says is
also in the objects' status and in our logs and metrics.  When on, an Event is
written once per (object, reason, message) per process -- retries of the same
failure do not repeat it -- and in the background, so a slow or forbidden
Event write never delays a sync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from csi_kit.k8s.objects.resources import EVENT
from csi_kit.k8s.objects.times import rfc3339
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj, name_of, namespace_of, uid_of

log = logging.getLogger(__name__)

NORMAL = "Normal"
WARNING = "Warning"


class EventRecorder:
    def __init__(self, api: KubeAPI, component: str, *, remember: int = 4096) -> None:
        self.api = api
        self.component = component
        self._seen: OrderedDict[tuple[str, str, str, str], None] = OrderedDict()
        self._remember = remember
        self._tasks: set[asyncio.Task[None]] = set()

    def event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        key = (uid_of(obj), type_, reason, message)
        if key in self._seen:
            return
        self._seen[key] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        task = asyncio.create_task(self._write(obj, type_, reason, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, obj: Obj) -> None:
        """Let the next Event about `obj` be written even if it repeats one already sent.

        For a loop whose Events report a state that can clear and come back
        (the health monitor): a repeat after the state changed is news.
        """
        uid = uid_of(obj)
        for key in [key for key in self._seen if key[0] == uid]:
            del self._seen[key]

    async def _write(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        now = rfc3339()
        # Cluster-scoped objects' events go to "default", as client-go's recorder does.
        ns = namespace_of(obj) or "default"
        involved = {
            "apiVersion": obj.get("apiVersion", ""),
            "kind": obj.get("kind", ""),
            "name": name_of(obj),
            "uid": uid_of(obj),
            "resourceVersion": str(obj.get("metadata", {}).get("resourceVersion", "")),
        }
        if namespace_of(obj):
            involved["namespace"] = ns
        body: Obj = {
            "apiVersion": EVENT.api_version,
            "kind": EVENT.kind,
            "metadata": {"name": f"{name_of(obj)}.{time.time_ns():x}", "namespace": ns},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.api.create(EVENT, body, ns)
        except (ApiError, OSError) as e:
            log.debug("event %s on %s not recorded: %s", reason, name_of(obj), e)

    async def flush(self) -> None:
        """Wait for the Events still being written (tests, clean shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
