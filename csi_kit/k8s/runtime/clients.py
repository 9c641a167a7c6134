"""One process's API access: a budget and a User-Agent per loop, shared informers, one events path.

An upstream deployment runs one sidecar per concern, each a process with its
own client-go limiter (`--kube-api-qps 5 --kube-api-burst 10`), its own
User-Agent (`csi-provisioner/v5...`) and its own informers.  csi_kit runs them
all in one process; `Clients` gives each loop what its sidecar would have had,
so the all-in-one process is never slower than the sidecars it replaces and
the audit log and API Priority and Fairness can still tell the loops apart:

- `api_for(loop)`: the loop's own budget -- like a sidecar, which builds one
  clientset for the built-in kinds and one for the snapshot CRDs, a loop draws
  requests to `snapshot.storage.k8s.io`/`groupsnapshot.storage.k8s.io` from a
  second bucket -- and its User-Agent `csi-kit-<loop>/<version>`.
- `informers`: one informer per (resource, namespace, selector) for the whole
  process, listing and watching as `csi-kit-informers/<version>` outside every
  loop's budget (a bounded number of lists and watches, once per start), so
  the loops reach their first sync without waiting for tokens.
- `recorder(component)`: the one Events path, `csi-kit-events/<version>` with a
  budget of its own, so an Event never holds up the object write it describes.
- `lease_api(api)`: the Lease traffic's own unthrottled connection, tagged
  `csi-kit-leader-election/<version>`.

`api` is the raw connection, owned by the caller; `close()` closes what
`Clients` opened on top of it (per-agent connections, the Events queue).

Rule: in a process that has a `Clients`, a loop's requests go through the
handle `api_for(<its name>)` gives it, and nothing else builds a client,
a limiter, an informer factory or an Events queue.
"""

from __future__ import annotations

import re
from typing import Any

from csi_kit._version import __version__
from csi_kit.k8s.runtime.api import KubeAPI
from csi_kit.k8s.runtime.events import EventRecorder, EventSink
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.runtime.ratelimit import ThrottledAPI, TokenBucket

_AGENT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def user_agent(name: str, version: str = __version__) -> str:
    """`csi-kit-<name>/<version>`, the User-Agent of one loop (or the informers, events, leader election)."""
    if not _AGENT_NAME.fullmatch(name):
        raise ValueError(f"agent name {name!r}: lower-case letters, digits and '-' only")
    return f"csi-kit-{name}/{version}"


def with_agent(api: KubeAPI, agent: str) -> KubeAPI:
    """`api` sending `agent` as its User-Agent, when the adapter can (lightkube, the fake); else `api`."""
    make: Any = getattr(api, "with_agent", None)
    if make is None:
        return api
    tagged: KubeAPI = make(agent)
    return tagged


class Clients:
    """One process's API access: a budget and a User-Agent per loop, shared informers, one events path."""

    def __init__(
        self,
        api: KubeAPI,
        *,
        qps: float,
        burst: int,
        events: bool = True,
        version: str = __version__,
    ) -> None:
        self.raw = api
        self.qps = qps
        self.burst = burst
        self.version = version
        self._agents: dict[str, KubeAPI] = {}
        self._apis: dict[str, ThrottledAPI] = {}
        self._opened: list[KubeAPI] = []  # agents opened on other connections (the Lease's)
        self.informers = InformerFactory(self._agent("informers"))
        self._events = EventSink(self.api_for("events"), enabled=events)

    def _agent(self, name: str) -> KubeAPI:
        """The raw connection tagged `csi-kit-<name>/<version>` (one per name)."""
        got = self._agents.get(name)
        if got is None:
            got = self._agents[name] = with_agent(self.raw, user_agent(name, self.version))
        return got

    def api_for(self, loop: str) -> KubeAPI:
        """`loop`'s API: its own budget (built-in kinds and snapshot CRDs apart) and User-Agent."""
        got = self._apis.get(loop)
        if got is None:
            got = self._apis[loop] = ThrottledAPI(
                self._agent(loop),
                TokenBucket(self.qps, self.burst),
                snapshot_limiter=TokenBucket(self.qps, self.burst),
            )
        return got

    def lease_api(self, api: KubeAPI) -> KubeAPI:
        """The Lease traffic's own connection `api`, unthrottled, tagged `csi-kit-leader-election/<v>`.

        What this opens on `api` (lightkube: a sibling client) `close()` closes; `api` stays the caller's.
        """
        tagged = with_agent(api, user_agent("leader-election", self.version))
        if tagged is not api:
            self._opened.append(tagged)
        return tagged

    def recorder(self, component: str) -> EventRecorder:
        """A recorder reporting as `component`, writing through the one Events queue (no-op when off)."""
        return self._events.recorder(component)

    @property
    def requests(self) -> dict[str, int]:
        """Requests so far by loop (the informers' and the lease's are not throttled and not here)."""
        return {loop: sum(api.requests.values()) for loop, api in self._apis.items()}

    async def close(self) -> None:
        """Flush and stop the Events queue, close the per-agent connections (not the raw one)."""
        await self._events.close()
        for agent in [*self._agents.values(), *self._opened]:
            if agent is not self.raw:
                close: Any = getattr(agent, "close", None)
                if close is not None:
                    await close()
        self._agents.clear()
        self._opened.clear()
        self._apis.clear()
