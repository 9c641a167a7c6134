"""What every volume loop holds: the API, its narrow CSI driver, the driver's name and capabilities.

Rule: only what the volume loops (provisioner, attacher, resizer, capacity,
health monitor) do alike, in one place -- their constructor's common part,
reading the Secrets that class parameters and PVs name, and the periodic
poll of the capacity tracker and the health monitor.  A loop's own
logic stays in its module; the object protocol is `volume.protocol`.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypedDict, TypeVar, Unpack

from csi_kit.k8s.runtime.api import KubeAPI, read_secret
from csi_kit.k8s.runtime.controller import Loop
from csi_kit.k8s.runtime.csi import DriverInfo
from csi_kit.k8s.runtime.events import EventRecorder
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.runtime.workqueue import WorkQueue

D = TypeVar("D")


class LoopArgs(TypedDict, total=False):
    """The `Loop` settings every volume loop takes as keywords and hands on as they are."""

    informers: InformerFactory | None
    workers: int
    base_delay: float
    max_delay: float


class VolumeLoop(Loop, Generic[D]):
    """A `Loop` working for one CSI driver through `driver` (the loop's narrow `*Driver` protocol)."""

    def __init__(self, api: KubeAPI, driver: D, info: DriverInfo, **loop: Unpack[LoopArgs]) -> None:
        super().__init__(**loop)
        self.api = api
        self.driver = driver
        self.info = info
        self.driver_name = info.name

    def controller_can(self, capability: str) -> bool:
        """Whether the driver's controller service offers `capability` (a csi.v1 RPC type name)."""
        return capability in self.info.controller_capabilities

    def recorder(self, events: EventRecorder | bool, source: str) -> EventRecorder:
        """The process's recorder when the wiring hands one in (one Events queue, its own budget),
        else one of the loop's own naming `source`, on or off as `events` says."""
        if isinstance(events, EventRecorder):
            return events
        return EventRecorder(self.api, source, enabled=events)

    async def read_secret(self, ref: tuple[str, str] | None) -> dict[str, str]:
        """The decoded data of Secret `ref` = (name, namespace); {} for no secret (ApiError if unreadable)."""
        return await read_secret(self.api, ref)

    async def run_polling(self, queue: WorkQueue, key: str, interval: float) -> None:
        """`Loop.run`, with `key` put on `queue` at once and every `interval` seconds after (a poll)."""

        async def tick() -> None:
            while True:
                queue.add(key)
                await asyncio.sleep(interval)

        ticker = asyncio.create_task(tick())
        try:
            await Loop.run(self)
        finally:
            ticker.cancel()
