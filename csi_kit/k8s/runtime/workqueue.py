"""A work queue with client-go's guarantees, for asyncio.

- A key is in the queue at most once (adding it again while queued is a no-op).
- A key is processed by one worker at a time: re-added while in flight, it is
  queued again only when that worker calls `done`, so a handler never races
  itself on one object.
- Failed keys come back after a per-key exponential backoff (1 s doubling to
  5 min by default, as upstream) until `forget` resets it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class WorkQueue:
    def __init__(self, name: str = "", *, base_delay: float = 1.0, max_delay: float = 300.0) -> None:
        self.name = name
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._queue: deque[str] = deque()
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        self._failures: dict[str, int] = {}
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._wakeup = asyncio.Event()
        self._shutdown = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._processing)

    def add(self, key: str) -> None:
        if self._shutdown or key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._wakeup.set()

    def add_after(self, key: str, delay: float) -> None:
        """Add `key` after `delay` seconds; an earlier pending add of the same key wins."""
        if self._shutdown:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= when:
                return
            pending[1].cancel()

        def fire() -> None:
            self._timers.pop(key, None)
            self.add(key)

        self._timers[key] = (when, loop.call_at(when, fire))

    def backoff(self, key: str) -> float:
        """The delay the next `add_rate_limited(key)` will use."""
        n = min(self._failures.get(key, 0), 62)  # 2**1024 overflows a float; max_delay rules long before
        return float(min(self.base_delay * (2**n), self.max_delay))

    def add_rate_limited(self, key: str) -> None:
        delay = self.backoff(key)
        self._failures[key] = self._failures.get(key, 0) + 1
        self.add_after(key, delay)

    def num_requeues(self, key: str) -> int:
        return self._failures.get(key, 0)

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)

    async def get(self) -> str | None:
        """The next key to process (now owned by the caller until `done`), or None after shutdown."""
        while not self._queue:
            if self._shutdown:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        key = self._queue.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.append(key)
            self._wakeup.set()

    def reset(self) -> None:
        """Empty and re-open the queue, for a loop that starts again (e.g. after regaining its lease)."""
        self.shutdown()
        self._queue.clear()
        self._dirty.clear()
        self._processing.clear()
        self._failures.clear()
        self._wakeup = asyncio.Event()
        self._shutdown = False

    def shutdown(self) -> None:
        self._shutdown = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._wakeup.set()


async def run_workers(
    queue: WorkQueue,
    handler: Callable[[str], Awaitable[None]],
    workers: int,
    *,
    on_error: Callable[[str, BaseException], None] | None = None,
) -> None:
    """Run `workers` coroutines pulling keys until the queue shuts down.

    A handler that returns marks the key successful (its backoff is reset); one
    that raises has the key re-queued with backoff.
    """

    async def worker() -> None:
        while True:
            key = await queue.get()
            if key is None:
                return
            try:
                await handler(key)
            except asyncio.CancelledError:
                queue.done(key)
                raise
            except Exception as e:  # every failure of one key is retried with backoff
                if on_error is not None:
                    on_error(key, e)
                else:
                    log.warning(
                        "%s: %s failed, retrying in %.0fs: %s",
                        queue.name,
                        key,
                        queue.backoff(key),
                        e,
                    )
                queue.add_rate_limited(key)
            else:
                queue.forget(key)
            queue.done(key)

    await asyncio.gather(*(worker() for _ in range(max(1, workers))))
