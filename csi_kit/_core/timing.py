"""Where a call's time goes: opt-in counters for the per-call breakdown.

Off unless the driver process starts with ``CSI_KIT_TIMING=<file>``; then
the engine, the store and the gRPC wrapper add the nanoseconds each part of
a call took (validation, per-object locks, the hand-off to a worker thread
and back, store reads, writes and flushes, the backend, metrics, the log
line, the whole handler) to process-wide counters, which are written to
``<file>`` as JSON when the process exits normally (SIGTERM drains and
exits).  ``benchmarks/create_delete_profile.py`` reads it and sets it beside
what the client measured, which gives the time spent in gRPC itself.

When off, each measuring site costs one test of the module constant
`ENABLED`; nothing is timed, counted or allocated.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["ENABLED", "add", "totals", "timed", "now"]

T = TypeVar("T")

#: Where the counters go at exit; "" when timing is off.
_PATH = os.environ.get("CSI_KIT_TIMING", "")
ENABLED = bool(_PATH)
now = time.perf_counter_ns

_lock = threading.Lock()
_totals: dict[str, list[int]] = {}


def add(part: str, ns: int) -> None:
    """Count ``ns`` nanoseconds (one occurrence) against ``part``."""
    with _lock:
        entry = _totals.get(part)
        if entry is None:
            _totals[part] = [ns, 1]
        else:
            entry[0] += ns
            entry[1] += 1


def totals() -> dict[str, tuple[int, int]]:
    """part → (nanoseconds, occurrences) so far."""
    with _lock:
        return {part: (ns, n) for part, (ns, n) in _totals.items()}


def timed(part: str, fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, counting each call's time against ``part``."""

    def call(*args: Any, **kwargs: Any) -> T:
        start = now()
        try:
            return fn(*args, **kwargs)
        finally:
            add(part, now() - start)

    return call


def _dump() -> None:
    with open(_PATH, "w") as f:
        json.dump({part: {"ns": ns, "count": n} for part, (ns, n) in totals().items()}, f, indent=1)


if ENABLED:
    atexit.register(_dump)
