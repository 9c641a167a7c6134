"""Per-object locks that answer ABORTED instead of waiting.

The spec wants a second operation on an object that is still being worked on
to fail fast with ABORTED ("operation pending"), so the CO retries later; a
global lock would serialise unrelated volumes.  Keys are strings such as
``volume:<id>`` or ``volume-name:<name>``.  Readers (a snapshot or clone of a
volume) may share a key; a writer (delete, expand, stage) needs it alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import attrs

from csi_kit.errors import Aborted

__all__ = ["KeyLocks", "Held"]


@attrs.frozen
class Held:
    """A set of keys taken together; give it back with `KeyLocks.release`."""

    exclusive: tuple[str, ...]
    shared: tuple[str, ...]


class KeyLocks:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._exclusive: set[str] = set()
        self._shared: dict[str, int] = {}

    def acquire(self, exclusive: Iterable[str] = (), shared: Iterable[str] = ()) -> Held:
        """Take every key or none; raise Aborted naming the busy key."""
        ex = tuple(dict.fromkeys(exclusive))
        sh = tuple(k for k in dict.fromkeys(shared) if k not in ex)
        with self._mutex:
            for key in ex:
                if key in self._exclusive or self._shared.get(key):
                    raise Aborted(f"an operation on {key} is already in progress; retry later")
            for key in sh:
                if key in self._exclusive:
                    raise Aborted(f"an operation on {key} is already in progress; retry later")
            self._exclusive.update(ex)
            for key in sh:
                self._shared[key] = self._shared.get(key, 0) + 1
        return Held(ex, sh)

    def release(self, held: Held) -> None:
        with self._mutex:
            self._exclusive.difference_update(held.exclusive)
            for key in held.shared:
                left = self._shared.get(key, 0) - 1
                if left > 0:
                    self._shared[key] = left
                else:
                    self._shared.pop(key, None)

    def busy(self) -> int:
        with self._mutex:
            return len(self._exclusive) + len(self._shared)
