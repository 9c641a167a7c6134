"""The state directory: one driver per directory, and a store that never silently starts over.

A driver's state directory holds its store (``state.db``), usually its unix
socket, and for the hostPath and loopfile backends by default their data.
Two drivers on one directory destroy each other's work: the second one's
start-up cleanup (a backend's ``start``, the store reconcile) removes what the
live one has in flight.  So the very first thing a driver takes, before a
backend is built or started, before the store is opened, before a socket is
bound, is `StateDirLock`: an ``flock`` on ``STATE_DIR/csi-kit.lock`` held for
the process's life (the kernel drops it when the process dies, ``kill -9``
included, so a crash never leaves a stale lock).  The holder writes its pid
into the file, and a second driver refuses at once naming it.

The store is the driver's memory of what it made (names, sizes, sources).
`open_existing_store` and `create_store` refuse to start when the store is missing, empty or unreadable
while the backend still holds objects: starting on a fresh store would
forget them (they would vanish from ListVolumes and their names could be
reused).  A store file that is not SQLite, truncated or damaged is refused
whatever the backend holds.  The way back is `rebuild_store` (``csi-kit
store rebuild``): it moves the bad file aside, never deleting it, and records
each volume and snapshot id the backend's ``inventory()`` reports as a ready
object — what the backend can still tell; the rest (names, sizes, snapshot
sources) is unknown and recorded as such (``capacity_bytes`` 0 is the spec's
"unknown").  A brand-new install — no store and an empty backend — just starts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Sequence
from typing import Literal

import attrs

from csi_kit._core.store import Store, StoreMissing, StoreUnreadable, set_aside
from csi_kit.backend import Backend
from csi_kit.errors import FailedPrecondition, InvalidArgument
from csi_kit.types import AccessType, Inventory, Snapshot, Volume

__all__ = [
    "LOCK_FILE",
    "STORE_FILE",
    "StateDirBusy",
    "StateDirUnusable",
    "StoreRefused",
    "StateDirLock",
    "RebuildReport",
    "open_existing_store",
    "create_store",
    "rebuild_store",
]

LOCK_FILE = "csi-kit.lock"
STORE_FILE = "state.db"


class StateDirBusy(FailedPrecondition):
    """Another live driver holds the state directory's lock."""


class StateDirUnusable(FailedPrecondition):
    """The state directory cannot be created, written or locked."""


class StoreRefused(FailedPrecondition):
    """The store is missing, empty or unreadable and starting would forget what the backend holds."""


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


class StateDirLock:
    """The exclusive lock on one state directory; `acquire` it, `release` it at exit.

    ``flock`` locks belong to the open file description, so a second lock in
    the same process (two `csi_kit.Driver` objects on one directory) is
    refused as well.  The descriptor is close-on-exec: a tool the driver runs
    must not inherit it and keep the directory locked after the driver is gone.
    """

    def __init__(self, state_dir: str, fd: int) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, LOCK_FILE)
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: str) -> StateDirLock:
        """Create the directory (0700) if needed and lock it, or raise at once."""
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StateDirUnusable(
                f"cannot create the state directory {state_dir}: {_reason(e)} "
                "(choose one this user can write with --state-dir or CSI_KIT_STATE_DIR)"
            ) from None
        path = os.path.join(state_dir, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise StateDirUnusable(
                f"cannot use the state directory {state_dir}: {_reason(e)} on {path} "
                "(choose one this user can write with --state-dir or CSI_KIT_STATE_DIR)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateDirBusy(
                    f"state directory {state_dir} is in use by another driver "
                    f"(pid {holder or 'unknown'}, lock {path}); refusing to start a second one on it"
                ) from None
            raise StateDirUnusable(f"cannot lock {path}: {_reason(e)}") from None
        lock = cls(state_dir, fd)
        lock._write_pid()
        return lock

    def _write_pid(self) -> None:
        """Record the holder's pid; written over the old one, then cut to length (never empty)."""
        assert self._fd is not None
        data = f"{os.getpid()}\n".encode()
        try:
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))
        except OSError:
            pass  # a full filesystem: the lock holds all the same, the pid is only a courtesy

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (closing the descriptor); the file stays for the next holder."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _holdings(inventory: Inventory) -> str:
    parts = []
    for count, what in ((len(inventory.volume_ids), "volume"), (len(inventory.snapshot_ids), "snapshot")):
        if count:
            parts.append(f"{count} {what}{'' if count == 1 else 's'}")
    return " and ".join(parts)


def open_existing_store(
    state_dir: str, *, recovery: str, synchronous: Literal["FULL", "NORMAL"] = "FULL"
) -> Store | StoreMissing:
    """Open the store if there is one; touches nothing when there is none.

    Call before the backend starts: an unreadable store is refused (with
    ``recovery``, the sentence telling the operator what to do) before
    anything else happens.  A missing or empty one is returned as the
    `StoreMissing` for `create_store` to judge once the backend can be asked.
    """
    try:
        return Store(os.path.join(state_dir, STORE_FILE), synchronous=synchronous, create=False)
    except StoreUnreadable as e:
        raise StoreRefused(f"{e}; refusing to start. {recovery}") from None
    except StoreMissing as e:
        return e


def create_store(
    missing: StoreMissing,
    backend: Backend,
    *,
    backend_name: str,
    recovery: str,
    synchronous: Literal["FULL", "NORMAL"] = "FULL",
) -> Store:
    """Make a new store, unless the (started) backend holds objects it would forget."""
    inventory = backend.inventory()
    if inventory is not None and (inventory.volume_ids or inventory.snapshot_ids):
        raise StoreRefused(
            f"{missing} but the {backend_name} backend holds {_holdings(inventory)}; refusing to start "
            f"on an empty store, which would forget them. {recovery}"
        )
    return Store(missing.path, synchronous=synchronous)


@attrs.frozen
class RebuildReport:
    """What `rebuild_store` did."""

    #: Why the old store could not be used ("" when it was healthy and kept).
    problem: str
    #: Where the old store's files were moved (never deleted).
    moved_aside: tuple[str, ...]
    #: Ids recorded as ready objects.
    volumes: tuple[str, ...]
    snapshots: tuple[str, ...]


def rebuild_store(
    state_dir: str,
    backend: Backend,
    *,
    backend_name: str,
    access_type: AccessType | None = None,
    synchronous: Literal["FULL", "NORMAL"] = "FULL",
) -> RebuildReport:
    """Make the store usable again from what the backend can still tell.

    A missing, empty or unreadable store is moved aside (with its WAL
    companions) and a new one made; a healthy one is kept.  Then every id in
    the backend's inventory without a row is recorded as a ready volume or
    snapshot: name ``recovered-<id>``, capacity/size 0 (unknown), no source,
    the backend's node topology.  ``access_type`` is needed only when the
    backend serves both mount and block.  The lock must be held and the
    backend started.
    """
    inventory = backend.inventory()
    if inventory is None:
        raise FailedPrecondition(
            f"the {backend_name} backend cannot list what it holds (its inventory() returns None); "
            "there is nothing to rebuild the store from"
        )
    kinds: Sequence[AccessType] = sorted(type(backend).access_types)
    if access_type is None:
        if len(kinds) != 1:
            raise InvalidArgument(
                f"the {backend_name} backend serves {' and '.join(kinds)} volumes and the store does not "
                "say which each one was: pass --access-type for the volumes to record"
            )
        access_type = kinds[0]
    elif access_type not in kinds:
        raise InvalidArgument(f"the {backend_name} backend does not serve {access_type} volumes")
    path = os.path.join(state_dir, STORE_FILE)
    problem, moved = "", []
    try:
        store = Store(path, synchronous=synchronous, create=False)
    except (StoreMissing, StoreUnreadable) as e:
        problem = str(e)
        moved = set_aside(path, "unreadable" if isinstance(e, StoreUnreadable) else "empty")
        store = Store(path, synchronous=synchronous)
    try:
        now = time.time_ns()
        topology = backend.node_topology() if type(backend).node_local else None
        new_v = sorted(inventory.volume_ids - store.volume_ids())
        new_s = sorted(inventory.snapshot_ids - store.snapshot_ids())
        store.adopt(
            [
                Volume(
                    volume_id=vid,
                    name=f"recovered-{vid}",
                    capacity_bytes=0,
                    access_type=access_type,
                    topology=(topology,) if topology is not None else (),
                    created_ns=now,
                )
                for vid in new_v
            ],
            [
                Snapshot(
                    snapshot_id=sid,
                    name=f"recovered-{sid}",
                    source_volume_id="",
                    size_bytes=0,
                    created_ns=now,
                )
                for sid in new_s
            ],
        )
    finally:
        store.close()
    return RebuildReport(problem, tuple(moved), tuple(new_v), tuple(new_s))
