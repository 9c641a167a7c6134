"""The durable metadata store: SQLite in WAL mode, one file per driver.

What lives here is what the spec makes the driver remember between calls:
name → id (idempotency), the parameters, size, source and topology of each
volume and snapshot, group snapshots, and the node's stage/publish records.

Crash safety comes from recording *intent* before the backend acts: a row is
written with state ``creating`` (or ``deleting``) and committed, the backend
does its work, then the row becomes ``ready`` (or goes).  A restart finds any
row left half-way and finishes the job (`csi_kit._core.engine.reconcile`).
An acknowledged object is always a committed ``ready`` row.

All calls are synchronous and thread-safe: the engine calls them from its
worker threads next to the backend call.  Changes go through one connection
behind a lock (SQLite has one writer at a time anyway); reads go through a
connection of the calling thread's own (WAL lets readers run beside the
writer, and each read sees every change committed before it), so a read
never queues behind another thread's write, or behind a thread that holds
the lock while it waits for the GIL.

Durability is the ``synchronous`` argument, chosen by the operator through
the driver's ``--durability``: ``"FULL"`` (``power``, the default) returns
from a state change only once it is on the disk, so it survives a power cut;
``"NORMAL"`` (``process``) returns once it is in the WAL in the kernel's page
cache, which survives a killed driver (kill -9) but not a power cut.  Either
way SQLite itself runs with ``synchronous=NORMAL`` (it flushes the WAL before
each checkpoint and the database after it) and, for ``FULL``, the store
flushes the WAL with ``fdatasync`` after the commit: a **group commit**
(`_GroupCommit`), where one flush covers every commit made before it began,
so that concurrent callers share a flush instead of queueing for one each.
A failed flush poisons the store: every later durable change fails until the
driver restarts (after a failed fsync the kernel may already have dropped the
dirty pages, so a second flush "succeeding" would prove nothing).

The store never silently starts over.  ``Store(path, create=False)`` opens
only a store that is already there: a missing or empty file, or a valid
SQLite file without our tables, raises `StoreMissing` and writes nothing (so
the evidence stays for the caller to judge against what the backend holds —
`csi_kit._core.statedir`); a file that is not SQLite, truncated or failing
SQLite's ``quick_check`` raises `StoreUnreadable`.  A full filesystem is
`csi_kit.errors.ResourceExhausted` naming the store and its directory, from
every method (`_storage_errors` is the one place that maps it).
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import attrs

from csi_kit._core import timing
from csi_kit.errors import FailedPrecondition, Internal, ResourceExhausted
from csi_kit.linux import fs
from csi_kit.types import ContentSource, GroupSnapshot, Snapshot, Topology, Volume

__all__ = [
    "Store",
    "VolumeRecord",
    "SnapshotRecord",
    "GroupRecord",
    "PublishRecord",
    "Attachment",
    "State",
    "StoreMissing",
    "StoreUnreadable",
    "set_aside",
    "Synchronous",
    "Durability",
    "DURABILITY",
]

State = Literal["creating", "ready", "deleting"]
#: "FULL": a change is on the disk when the call returns; "NORMAL": in the page cache.
Synchronous = Literal["FULL", "NORMAL"]
#: The operator's names for them (``--durability``): what each survives.
Durability = Literal["power", "process"]
DURABILITY: dict[Durability, Synchronous] = {"power": "FULL", "process": "NORMAL"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    access_type TEXT NOT NULL,
    parameters TEXT NOT NULL,
    mutable TEXT NOT NULL,
    context TEXT NOT NULL,
    source_kind TEXT,
    source_id TEXT,
    topology TEXT NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    source_volume_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    ready INTEGER NOT NULL,
    group_id TEXT NOT NULL,
    parameters TEXT NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_source ON snapshots (source_volume_id);
CREATE INDEX IF NOT EXISTS snapshots_by_group ON snapshots (group_id);
CREATE TABLE IF NOT EXISTS groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    source_volume_ids TEXT NOT NULL,
    parameters TEXT NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS publishes (
    target_path TEXT PRIMARY KEY,
    volume_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    readonly INTEGER NOT NULL,
    access_type TEXT NOT NULL,
    access_mode INTEGER NOT NULL,
    fs_type TEXT NOT NULL,
    mount_flags TEXT NOT NULL,
    created INTEGER NOT NULL DEFAULT 0,
    dev INTEGER,
    ino INTEGER
);
CREATE INDEX IF NOT EXISTS publishes_by_volume ON publishes (volume_id);
CREATE TABLE IF NOT EXISTS attachments (
    volume_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    readonly INTEGER NOT NULL,
    access_mode INTEGER NOT NULL,
    context TEXT NOT NULL,
    PRIMARY KEY (volume_id, node_id)
);
"""


@attrs.frozen
class VolumeRecord:
    volume: Volume
    state: State
    mutable_parameters: Mapping[str, str]
    seq: int


@attrs.frozen
class SnapshotRecord:
    snapshot: Snapshot
    state: State
    seq: int


@attrs.frozen
class GroupRecord:
    group_snapshot_id: str
    name: str
    state: State
    source_volume_ids: tuple[str, ...]
    parameters: Mapping[str, str]
    created_ns: int


@attrs.frozen
class PublishRecord:
    """A stage (kind "stage") or publish (kind "publish") made on this node."""

    target_path: str
    volume_id: str
    kind: Literal["stage", "publish"]
    readonly: bool
    access_type: str
    access_mode: int
    fs_type: str
    mount_flags: tuple[str, ...]
    #: The framework created the target (so unpublish removes it; the spec: "the SP MUST delete
    #: the file or directory it created").
    created: bool = False
    #: (st_dev, st_ino) the path showed once mounted: ties the mount to the volume.  None while
    #: the stage/publish is in flight (the row is written before the mount, so a crash leaves a
    #: record that unpublish/unstage can finish).
    identity: tuple[int, int] | None = None


@attrs.frozen
class Attachment:
    volume_id: str
    node_id: str
    readonly: bool
    access_mode: int
    context: Mapping[str, str]


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class StoreMissing(FailedPrecondition):
    """``create=False`` and there is no store at ``path`` (absent, empty, or without our tables)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"state store {path} {reason}")
        self.path = path
        self.reason = reason


class StoreUnreadable(FailedPrecondition):
    """The file at ``path`` is not a readable store: not SQLite, truncated, corrupt or unopenable."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"state store {path} is unreadable: {reason}")
        self.path = path
        self.reason = reason


#: The files SQLite keeps for one WAL-mode database; they only make sense together.
_COMPANIONS = ("", "-wal", "-shm")


def _is_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorname", "") == "SQLITE_FULL"


def _full(path: str) -> ResourceExhausted:
    where = os.path.dirname(os.path.abspath(path))
    return ResourceExhausted(f"state store {path}: no space left on the filesystem holding {where}")


@contextmanager
def _storage_errors(path: str) -> Iterator[None]:
    """Turn "database or disk is full" (SQLITE_FULL) and ENOSPC/EDQUOT into RESOURCE_EXHAUSTED.

    The caller then sees the spec's code and a message naming the full
    filesystem; the gRPC layer logs one line for it, no traceback.
    """
    try:
        yield
    except (sqlite3.Error, OSError) as e:
        if _is_full(e):
            raise _full(path) from e
        raise


def set_aside(path: str, label: str) -> list[str]:
    """Move the store at ``path`` and its ``-wal``/``-shm`` companions aside; never delete them.

    They move as a set (a WAL replayed onto another database corrupts it) to
    ``PATH.LABEL-<UTC time>`` (+ ``-wal``/``-shm``).  Returns the new paths.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = f"{path}.{label}-{stamp}"
    n = 1
    while any(os.path.lexists(base + c) for c in _COMPANIONS):
        n += 1
        base = f"{path}.{label}-{stamp}.{n}"
    moved = []
    for companion in _COMPANIONS:
        if os.path.lexists(path + companion):
            os.rename(path + companion, base + companion)
            moved.append(base + companion)
    return moved


class _GroupCommit:
    """Make WAL commits durable with as few ``fdatasync`` calls as possible.

    Every commit takes a sequence number (`committed`, called under the
    store's lock right after ``COMMIT``, so the commit's WAL frames are
    written when the number exists).  `wait` returns once a flush that began
    after that commit has finished: the first waiter with no flush running
    becomes the leader and flushes the WAL, covering every commit numbered
    so far; waiters that arrive meanwhile sleep, and one of them leads the
    next flush for all of them.  With ``flush=False`` (``NORMAL``) `wait`
    returns at once.
    """

    def __init__(self, wal_path: str, *, flush: bool) -> None:
        self.wal_path = wal_path
        self.flush = flush
        self._cond = threading.Condition(threading.Lock())
        self._committed = 0
        self._flushed = 0
        self._flushing = False
        self._failed: str | None = None
        self._fd = -1
        self._identity: tuple[int, int] | None = None
        if flush:
            self._reopen()
        #: Flushes done (the group commit's count, for tests and benchmarks).
        self.flushes = 0

    def _reopen(self) -> None:
        """Open the WAL file SQLite uses now (it exists once a connection has read the database)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        fd = os.open(self.wal_path, os.O_RDONLY | os.O_CLOEXEC | os.O_CREAT, 0o600)
        st = os.fstat(fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)

    def close(self) -> None:
        with self._cond:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def committed(self) -> int:
        with self._cond:
            self._committed += 1
            return self._committed

    def wait(self, seq: int) -> None:
        """Return once commit ``seq`` is on the disk; raise if the flush failed."""
        if not self.flush:
            return
        with self._cond:
            while True:
                if self._failed is not None:
                    raise Internal(self._failed)
                if self._flushed >= seq:
                    return
                if self._flushing:
                    self._cond.wait()
                    continue
                self._flushing = True
                target = self._committed
                break
        error: BaseException | None = None
        try:
            self._flush()
        except BaseException as e:
            error = e
        with self._cond:
            self._flushing = False
            if error is None:
                self._flushed = max(self._flushed, target)
                self.flushes += 1
            else:
                self._failed = (
                    f"state store {self.wal_path}: flushing the log to disk failed ({error}); changes "
                    "since the last flush may not be durable, so no more are accepted: restart the driver"
                )
            self._cond.notify_all()
        if error is not None:
            raise error

    def _flush(self) -> None:
        # SQLite keeps its WAL file while a connection is open; should it ever be replaced,
        # flush the file that holds the commits now, not a stale inode.
        st = os.stat(self.wal_path)
        if (st.st_dev, st.st_ino) != self._identity:
            self._reopen()
        os.fdatasync(self._fd)


class Store:
    """SQLite-backed metadata.  ``path`` is created with mode 0600.

    ``create=False`` opens only an existing store (see the module docstring):
    `StoreMissing` when there is none, without writing anything.
    """

    def __init__(self, path: str, *, synchronous: Synchronous = "FULL", create: bool = True) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._closed = False
        #: FULL: every durable change is flushed before the call returns (see the module docstring).
        self.synchronous: Synchronous = synchronous
        try:
            with _storage_errors(path):
                self._db = self._open(path, create)
                self._group = _GroupCommit(path + "-wal", flush=synchronous == "FULL")
        except (sqlite3.Error, OSError) as e:
            if getattr(self, "_db", None) is not None:
                self._db.close()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise StoreUnreadable(path, reason) from e

    @property
    def durability(self) -> Durability:
        """``power`` (changes survive a power cut) or ``process`` (a killed driver only)."""
        return "power" if self.synchronous == "FULL" else "process"

    def _open(self, path: str, create: bool) -> sqlite3.Connection:
        if not create:
            if not os.path.lexists(path):
                raise StoreMissing(path, "does not exist")
            if os.stat(path).st_size == 0:
                raise StoreMissing(path, "is empty (0 bytes)")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            os.close(fd)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            # Before anything is written: a truncated or damaged file is refused, not built upon.
            problems = [str(r[0]) for r in db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise StoreUnreadable(path, f"SQLite's integrity check failed: {'; '.join(problems[:3])}")
            ours = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='volumes'"
            if db.execute(ours).fetchone() is None and not create:
                raise StoreMissing(path, "holds no csi-kit tables")
            db.execute("PRAGMA journal_mode=WAL")
            # The WAL is flushed by _GroupCommit (FULL) or left to the page cache (NORMAL);
            # SQLite still flushes around every checkpoint, so nothing is lost by moving it.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            self._migrate_publishes(db)
            if self.synchronous == "FULL":
                # The -wal file's directory entry is durable before any commit relies on it.
                fs.fsync_dir(os.path.dirname(os.path.abspath(path)))
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self._db.close()
            self._group.close()

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (opened on its first read)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA query_only=ON")
            with self._lock:
                if self._closed:
                    db.close()
                    raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
                self._readers.append(db)
            self._local.db = db
        return db

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction, durable (at ``FULL``) when this returns.

        The flush happens after the connection's lock is given back, so other
        threads commit while it runs and the next flush covers them all.
        ``durable=False`` skips the flush for this commit: only for removals
        whose ``deleting`` state is already durable — the next durable commit
        carries them (the WAL is sequential), and start-up finishes a lost one.
        """
        start = timing.now() if timing.ENABLED else 0
        with self._lock, _storage_errors(self.path):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (SQLITE_FULL does): a second
                # ROLLBACK would raise and hide the real error.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            seq = self._group.committed()
        if timing.ENABLED:
            flush_start = timing.now()
            timing.add("store: write", flush_start - start)
        if durable:
            with _storage_errors(self.path):
                self._group.wait(seq)
            if timing.ENABLED:
                timing.add("store: flush", timing.now() - flush_start)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        start = timing.now() if timing.ENABLED else 0
        with _storage_errors(self.path):
            rows: list[sqlite3.Row] = self._reader().execute(sql, args).fetchall()
        if timing.ENABLED:
            timing.add("store: read", timing.now() - start)
        return rows

    def max_seq(self, table: Literal["volumes", "snapshots"]) -> int:
        """The highest list position ever handed out for a table (validates page tokens)."""
        rows = self._query("SELECT seq FROM sqlite_sequence WHERE name=?", (table,))
        return int(rows[0][0]) if rows else 0

    def adopt(self, volumes: Sequence[Volume], snapshots: Sequence[Snapshot]) -> None:
        """Record objects the backend already holds as ``ready``, in one transaction.

        For recovery (`csi_kit._core.statedir.rebuild_store`): never a
        ``creating`` row, which the next start would destroy as unfinished work.
        """
        with self._tx() as db:
            for volume in volumes:
                self._insert_volume(db, volume, {}, "ready")
            for snap in snapshots:
                self._insert_snapshot(db, snap, "ready")

    # -- volumes -------------------------------------------------------------

    _VOLUME_COLUMNS = (
        "seq, id, name, state, capacity, access_type, parameters, mutable, context, "
        "source_kind, source_id, topology, created_ns"
    )

    @staticmethod
    def _volume_row(row: Any) -> VolumeRecord:
        (seq, vid, name, state, cap, atype, params, mutable, ctx, skind, sid, topo, created) = row
        source = ContentSource(skind, sid) if skind else None
        volume = Volume(
            volume_id=vid,
            name=name,
            capacity_bytes=cap,
            access_type=atype,
            parameters=json.loads(params),
            context=json.loads(ctx),
            source=source,
            topology=tuple(Topology(t) for t in json.loads(topo)),
            created_ns=created,
        )
        return VolumeRecord(volume, state, json.loads(mutable), seq)

    def begin_volume(self, volume: Volume, mutable_parameters: Mapping[str, str]) -> None:
        """Record a volume about to be made (state ``creating``)."""
        with self._tx() as db:
            self._insert_volume(db, volume, mutable_parameters, "creating")

    def _insert_volume(
        self, db: sqlite3.Connection, volume: Volume, mutable_parameters: Mapping[str, str], state: State
    ) -> None:
        src = volume.source
        db.execute(
            f"INSERT INTO volumes ({self._VOLUME_COLUMNS.replace('seq, ', '')}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                volume.volume_id,
                volume.name,
                state,
                volume.capacity_bytes,
                volume.access_type,
                _dump(dict(volume.parameters)),
                _dump(dict(mutable_parameters)),
                _dump(dict(volume.context)),
                src.kind if src else None,
                src.id if src else None,
                _dump([dict(t.segments) for t in volume.topology]),
                volume.created_ns,
            ),
        )

    def finish_volume(self, volume_id: str, capacity_bytes: int, context: Mapping[str, str]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE volumes SET state='ready', capacity=?, context=? WHERE id=?",
                (capacity_bytes, _dump(dict(context)), volume_id),
            )

    def set_volume_state(self, volume_id: str, state: State) -> None:
        with self._tx() as db:
            db.execute("UPDATE volumes SET state=? WHERE id=?", (state, volume_id))

    def set_volume_capacity(self, volume_id: str, capacity_bytes: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE volumes SET capacity=? WHERE id=?", (capacity_bytes, volume_id))

    def set_volume_mutable(self, volume_id: str, mutable: Mapping[str, str]) -> None:
        with self._tx() as db:
            db.execute("UPDATE volumes SET mutable=? WHERE id=?", (_dump(dict(mutable)), volume_id))

    def remove_volume(self, volume_id: str) -> None:
        with self._tx(durable=False) as db:
            db.execute("DELETE FROM volumes WHERE id=?", (volume_id,))

    def volume(self, volume_id: str) -> VolumeRecord | None:
        rows = self._query(f"SELECT {self._VOLUME_COLUMNS} FROM volumes WHERE id=?", (volume_id,))
        return self._volume_row(rows[0]) if rows else None

    def volume_by_name(self, name: str) -> VolumeRecord | None:
        rows = self._query(f"SELECT {self._VOLUME_COLUMNS} FROM volumes WHERE name=?", (name,))
        return self._volume_row(rows[0]) if rows else None

    def list_volumes(self, after_seq: int, limit: int) -> list[VolumeRecord]:
        """Ready volumes with seq > after_seq, oldest first (keyset pagination)."""
        rows = self._query(
            f"SELECT {self._VOLUME_COLUMNS} FROM volumes WHERE state='ready' AND seq>? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [self._volume_row(r) for r in rows]

    def volumes_in_state(self, *states: State) -> list[VolumeRecord]:
        marks = ",".join("?" * len(states))
        rows = self._query(f"SELECT {self._VOLUME_COLUMNS} FROM volumes WHERE state IN ({marks})", states)
        return [self._volume_row(r) for r in rows]

    def volume_ids(self) -> set[str]:
        return {r[0] for r in self._query("SELECT id FROM volumes")}

    def count_volumes(self) -> int:
        return int(self._query("SELECT count(*) FROM volumes")[0][0])

    # -- snapshots -----------------------------------------------------------

    _SNAPSHOT_COLUMNS = (
        "seq, id, name, state, source_volume_id, size, ready, group_id, parameters, created_ns"
    )

    @staticmethod
    def _snapshot_row(row: Any) -> SnapshotRecord:
        seq, sid, name, state, src, size, ready, group, params, created = row
        snap = Snapshot(
            snapshot_id=sid,
            name=name,
            source_volume_id=src,
            size_bytes=size,
            created_ns=created,
            ready_to_use=bool(ready),
            group_snapshot_id=group,
            parameters=json.loads(params),
        )
        return SnapshotRecord(snap, state, seq)

    def _insert_snapshot(self, db: sqlite3.Connection, snap: Snapshot, state: State = "creating") -> None:
        db.execute(
            "INSERT INTO snapshots "
            "(id, name, state, source_volume_id, size, ready, group_id, parameters, created_ns) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                snap.snapshot_id,
                snap.name,
                state,
                snap.source_volume_id,
                snap.size_bytes,
                int(snap.ready_to_use),
                snap.group_snapshot_id,
                _dump(dict(snap.parameters)),
                snap.created_ns,
            ),
        )

    def begin_snapshot(self, snap: Snapshot) -> None:
        with self._tx() as db:
            self._insert_snapshot(db, snap)

    def finish_snapshot(self, snapshot_id: str, size_bytes: int, ready: bool) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE snapshots SET state='ready', size=?, ready=? WHERE id=?",
                (size_bytes, int(ready), snapshot_id),
            )

    def set_snapshot_state(self, snapshot_id: str, state: State) -> None:
        with self._tx() as db:
            db.execute("UPDATE snapshots SET state=? WHERE id=?", (state, snapshot_id))

    def remove_snapshot(self, snapshot_id: str) -> None:
        with self._tx(durable=False) as db:
            db.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))

    def snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        rows = self._query(f"SELECT {self._SNAPSHOT_COLUMNS} FROM snapshots WHERE id=?", (snapshot_id,))
        return self._snapshot_row(rows[0]) if rows else None

    def snapshot_by_name(self, name: str) -> SnapshotRecord | None:
        rows = self._query(f"SELECT {self._SNAPSHOT_COLUMNS} FROM snapshots WHERE name=?", (name,))
        return self._snapshot_row(rows[0]) if rows else None

    def list_snapshots(
        self, after_seq: int, limit: int, *, snapshot_id: str = "", source_volume_id: str = ""
    ) -> list[SnapshotRecord]:
        sql = f"SELECT {self._SNAPSHOT_COLUMNS} FROM snapshots WHERE state='ready' AND seq>?"
        args: list[Any] = [after_seq]
        if snapshot_id:
            sql += " AND id=?"
            args.append(snapshot_id)
        if source_volume_id:
            sql += " AND source_volume_id=?"
            args.append(source_volume_id)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [self._snapshot_row(r) for r in self._query(sql, tuple(args))]

    def snapshots_in_state(self, *states: State) -> list[SnapshotRecord]:
        marks = ",".join("?" * len(states))
        rows = self._query(f"SELECT {self._SNAPSHOT_COLUMNS} FROM snapshots WHERE state IN ({marks})", states)
        return [self._snapshot_row(r) for r in rows]

    def snapshot_ids(self) -> set[str]:
        return {r[0] for r in self._query("SELECT id FROM snapshots")}

    def group_members(self, group_id: str) -> list[SnapshotRecord]:
        rows = self._query(
            f"SELECT {self._SNAPSHOT_COLUMNS} FROM snapshots WHERE group_id=? ORDER BY seq", (group_id,)
        )
        return [self._snapshot_row(r) for r in rows]

    # -- group snapshots -----------------------------------------------------

    @staticmethod
    def _group_row(row: Any) -> GroupRecord:
        gid, name, state, sources, params, created = row
        return GroupRecord(gid, name, state, tuple(json.loads(sources)), json.loads(params), created)

    def begin_group(
        self,
        group_id: str,
        name: str,
        members: list[Snapshot],
        parameters: Mapping[str, str],
        created_ns: int,
    ) -> None:
        """Record a group and its member snapshots in one transaction."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO groups (id, name, state, source_volume_ids, parameters, created_ns) "
                "VALUES (?, ?, 'creating', ?, ?, ?)",
                (
                    group_id,
                    name,
                    _dump([m.source_volume_id for m in members]),
                    _dump(dict(parameters)),
                    created_ns,
                ),
            )
            for snap in members:
                self._insert_snapshot(db, snap)

    def finish_group(self, group_id: str, sizes: Mapping[str, tuple[int, bool]]) -> None:
        with self._tx() as db:
            for sid, (size, ready) in sizes.items():
                db.execute(
                    "UPDATE snapshots SET state='ready', size=?, ready=? WHERE id=?", (size, int(ready), sid)
                )
            db.execute("UPDATE groups SET state='ready' WHERE id=?", (group_id,))

    def set_group_state(self, group_id: str, state: State) -> None:
        with self._tx() as db:
            db.execute("UPDATE groups SET state=? WHERE id=?", (state, group_id))
            db.execute("UPDATE snapshots SET state=? WHERE group_id=?", (state, group_id))

    def remove_group(self, group_id: str) -> None:
        with self._tx(durable=False) as db:
            db.execute("DELETE FROM snapshots WHERE group_id=?", (group_id,))
            db.execute("DELETE FROM groups WHERE id=?", (group_id,))

    def group(self, group_id: str) -> GroupRecord | None:
        rows = self._query(
            "SELECT id, name, state, source_volume_ids, parameters, created_ns FROM groups WHERE id=?",
            (group_id,),
        )
        return self._group_row(rows[0]) if rows else None

    def group_by_name(self, name: str) -> GroupRecord | None:
        rows = self._query(
            "SELECT id, name, state, source_volume_ids, parameters, created_ns FROM groups WHERE name=?",
            (name,),
        )
        return self._group_row(rows[0]) if rows else None

    def groups_in_state(self, *states: State) -> list[GroupRecord]:
        marks = ",".join("?" * len(states))
        rows = self._query(
            "SELECT id, name, state, source_volume_ids, parameters, created_ns FROM groups "
            f"WHERE state IN ({marks})",
            states,
        )
        return [self._group_row(r) for r in rows]

    def group_snapshot(self, record: GroupRecord) -> GroupSnapshot:
        members = tuple(m.snapshot for m in self.group_members(record.group_snapshot_id))
        return GroupSnapshot(
            group_snapshot_id=record.group_snapshot_id,
            name=record.name,
            snapshots=members,
            created_ns=record.created_ns,
            ready_to_use=all(m.ready_to_use for m in members),
        )

    # -- node stage / publish records ------------------------------------------

    _PUBLISH_COLUMNS = (
        "target_path, volume_id, kind, readonly, access_type, access_mode, fs_type, mount_flags, "
        "created, dev, ino"
    )

    @staticmethod
    def _migrate_publishes(db: sqlite3.Connection) -> None:
        """Stores made before publish rows carried `created` and the mount's identity gain the columns."""
        have = {row[1] for row in db.execute("PRAGMA table_info(publishes)")}
        columns = (("created", "INTEGER NOT NULL DEFAULT 0"), ("dev", "INTEGER"), ("ino", "INTEGER"))
        for column, decl in columns:
            if column not in have:
                db.execute(f"ALTER TABLE publishes ADD COLUMN {column} {decl}")

    @staticmethod
    def _publish_row(row: Any) -> PublishRecord:
        target, vid, kind, ro, atype, mode, fs, flags, created, dev, ino = row
        identity = (int(dev), int(ino)) if dev is not None and ino is not None else None
        return PublishRecord(
            target, vid, kind, bool(ro), atype, mode, fs, tuple(json.loads(flags)), bool(created), identity
        )

    def record_publish(self, rec: PublishRecord) -> None:
        with self._tx() as db:
            db.execute(
                f"INSERT OR REPLACE INTO publishes ({self._PUBLISH_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.target_path,
                    rec.volume_id,
                    rec.kind,
                    int(rec.readonly),
                    rec.access_type,
                    rec.access_mode,
                    rec.fs_type,
                    _dump(list(rec.mount_flags)),
                    int(rec.created),
                    rec.identity[0] if rec.identity else None,
                    rec.identity[1] if rec.identity else None,
                ),
            )

    def remove_publish(self, target_path: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM publishes WHERE target_path=?", (target_path,))

    def publish_at(self, target_path: str) -> PublishRecord | None:
        rows = self._query(
            f"SELECT {self._PUBLISH_COLUMNS} FROM publishes WHERE target_path=?", (target_path,)
        )
        return self._publish_row(rows[0]) if rows else None

    def publishes_of(self, volume_id: str) -> list[PublishRecord]:
        rows = self._query(f"SELECT {self._PUBLISH_COLUMNS} FROM publishes WHERE volume_id=?", (volume_id,))
        return [self._publish_row(r) for r in rows]

    # -- controller attachments ------------------------------------------------

    def record_attachment(self, att: Attachment) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO attachments (volume_id, node_id, readonly, access_mode, context) "
                "VALUES (?, ?, ?, ?, ?)",
                (att.volume_id, att.node_id, int(att.readonly), att.access_mode, _dump(dict(att.context))),
            )

    def remove_attachment(self, volume_id: str, node_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM attachments WHERE volume_id=? AND node_id=?", (volume_id, node_id))

    def attachments(self, volume_id: str) -> list[Attachment]:
        rows = self._query(
            "SELECT volume_id, node_id, readonly, access_mode, context FROM attachments WHERE volume_id=?",
            (volume_id,),
        )
        return [Attachment(r[0], r[1], bool(r[2]), r[3], json.loads(r[4])) for r in rows]
