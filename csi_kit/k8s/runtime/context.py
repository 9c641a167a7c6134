"""What a loop's factory is given: one process's settings and shared clients (`LoopContext`).

Every loop module ends with `async def build(ctx) -> list[Planned]`, written
once per loop: it reads its options from `ctx.args`, takes its API from
`ctx.clients.api_for("<loop>")` (its own budget and User-Agent), its
informers from `ctx.clients.informers` (shared by the whole process), its
Events recorder from `ctx.clients.recorder(...)` (a no-op with `--no-events`:
the wiring builds `Clients` with `events=args.events`) and the one CSI client
`ctx.csi`, and says what to run and under which Lease.  `k8s/registry.py`
lists the factories; the wiring (`k8s/cli.py`) builds a context and runs the plans.

Rule: this module holds values and the few questions several factories ask
alike (retry timing, per-node mode); no loop, no option parsing.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypedDict

import attrs

from csi_kit.k8s.runtime.clients import Clients
from csi_kit.k8s.runtime.csi import CSIClient, DriverInfo


class Timing(TypedDict):
    """A loop's retry backoff, as the keywords every loop takes."""

    base_delay: float
    max_delay: float


class Runnable(Protocol):
    """What a plan runs: a `Loop`, or a service shaped like one (runs until cancelled)."""

    @property
    def name(self) -> str: ...

    async def run(self) -> None: ...


@attrs.frozen
class Service:
    """A server that is not a loop (kubelet registration, /healthz), run like one.

    Started when its plan runs, kept until cancelled, then stopped.
    """

    name: str
    start: Callable[[], Awaitable[None]]
    stop: Callable[[], Awaitable[None]]

    async def run(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            await self.stop()


@attrs.frozen
class Planned:
    """One thing to run and the Lease it runs under (None: on every replica, no election)."""

    loop: Runnable
    lease: str | None


@attrs.frozen(kw_only=True)
class LoopContext:
    """One process's settings and shared clients, handed to every loop factory."""

    args: argparse.Namespace
    info: DriverInfo
    csi: CSIClient
    csi_endpoint: str
    clients: Clients
    #: The leader-election namespace (also where CSIStorageCapacity objects go by default).
    namespace: str
    stop: asyncio.Event
    #: Loop names as --controllers spelt them (before groups like `all` were expanded).
    named: frozenset[str] = frozenset()
    #: Extra checks for the liveness endpoint, added by services built before it (registration).
    health_checks: list[Callable[[], tuple[bool, str]]] = attrs.field(factory=list)
    _node: dict[str, tuple[str, dict[str, str]]] = attrs.field(factory=dict, init=False)

    @property
    def timing(self) -> Timing:
        """A loop's retry backoff (`--retry-interval-start`, `--retry-interval-max`) as keywords."""
        return {"base_delay": self.args.retry_interval_start, "max_delay": self.args.retry_interval_max}

    def node_name(self) -> str | None:
        """Per-node mode's node (`--node-deployment`), None when central; a missing name is a ValueError."""
        if not self.args.node_deployment:
            return None
        if not self.args.node_name:
            raise ValueError("--node-deployment needs --node-name (or NODE_NAME)")
        return str(self.args.node_name)

    async def node(self) -> tuple[str, dict[str, str]] | None:
        """Per-node mode's (node, topology from the driver's NodeGetInfo, asked once); None when central."""
        name = self.node_name()
        if name is None:
            return None
        if "topology" not in self._node:
            _, topology = await self.csi.node_info()
            self._node["topology"] = (name, topology)
        return self._node["topology"]
