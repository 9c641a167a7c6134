"""Durability as the operator's choice (``--durability power|process``) and the store's group commit.

``power`` (the default): a change is on the disk before the call returns,
and concurrent changes share one ``fdatasync`` of the WAL.  ``process``: no
flush at all, which still survives kill -9 (tests/core/test_crash.py runs in
both modes).  A failed flush poisons the store until the driver restarts.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import Csi, short_dir

from csi_kit._core import store as store_module
from csi_kit._core.store import Store
from csi_kit._pb import csi_pb2 as pb
from csi_kit.errors import Internal, ResourceExhausted
from csi_kit.testing.driver import driver_process
from csi_kit.types import Volume


@pytest.fixture
def db_path(tmp_path: os.PathLike[str]) -> str:
    return os.path.join(str(tmp_path), "state.db")


def _volume(i: int) -> Volume:
    return Volume(volume_id=f"id-{i}", name=f"name-{i}", capacity_bytes=1, created_ns=i)


class SlowDisk:
    """Stands in for os.fdatasync: slow, and records which rows each flush made durable."""

    def __init__(self, db_path: str, delay: float = 0.05) -> None:
        self.db_path = db_path
        self.delay = delay
        self.calls = 0
        self.durable: set[str] = set()
        self.lock = threading.Lock()

    def _committed_names(self) -> set[str]:
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        try:
            return {r[0] for r in db.execute("SELECT name FROM volumes")}
        finally:
            db.close()

    def __call__(self, fd: int) -> None:
        before = self._committed_names()  # what the flush covers: committed when it began
        time.sleep(self.delay)
        with self.lock:
            self.calls += 1
            self.durable |= before


@pytest.fixture
def slow_disk(db_path: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowDisk]:
    disk = SlowDisk(db_path)
    monkeypatch.setattr(store_module.os, "fdatasync", disk)
    yield disk


def test_concurrent_commits_share_flushes_and_each_returns_durable(db_path: str, slow_disk: SlowDisk) -> None:
    store = Store(db_path)
    returned_durable: dict[str, bool] = {}
    start = threading.Barrier(16)

    def one(i: int) -> None:
        start.wait()
        store.begin_volume(_volume(i), {})
        with slow_disk.lock:
            returned_durable[f"name-{i}"] = f"name-{i}" in slow_disk.durable

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    store.close()
    assert returned_durable == {f"name-{i}": True for i in range(16)}
    assert slow_disk.calls < 16  # shared: one flush per batch, not per commit
    assert slow_disk.calls == store._group.flushes


def test_a_lone_commit_is_flushed_before_it_returns(db_path: str, slow_disk: SlowDisk) -> None:
    store = Store(db_path)
    try:
        store.begin_volume(_volume(1), {})
        assert "name-1" in slow_disk.durable
        store.finish_volume("id-1", 2, {})
        assert slow_disk.calls == 2
    finally:
        store.close()


def test_a_removal_whose_intent_is_durable_is_not_flushed(db_path: str, slow_disk: SlowDisk) -> None:
    store = Store(db_path)
    try:
        store.begin_volume(_volume(1), {})
        store.set_volume_state("id-1", "deleting")
        calls = slow_disk.calls
        store.remove_volume("id-1")
        assert slow_disk.calls == calls
        assert store.volume("id-1") is None
    finally:
        store.close()


def test_process_durability_never_flushes(db_path: str, slow_disk: SlowDisk) -> None:
    store = Store(db_path, synchronous="NORMAL")
    try:
        assert store.durability == "process"
        store.begin_volume(_volume(1), {})
        store.finish_volume("id-1", 2, {})
        assert slow_disk.calls == 0
    finally:
        store.close()
    reopened = Store(db_path, create=False)
    try:
        assert reopened.durability == "power"
        assert reopened.volume("id-1").state == "ready"  # type: ignore[union-attr]
    finally:
        reopened.close()


@pytest.mark.parametrize(
    ("error", "first"),
    [(errno.EIO, OSError), (errno.ENOSPC, ResourceExhausted)],
    ids=["EIO", "ENOSPC"],
)
def test_a_failed_flush_refuses_every_later_change(
    db_path: str, monkeypatch: pytest.MonkeyPatch, error: int, first: type[Exception]
) -> None:
    store = Store(db_path)
    failures = [OSError(error, os.strerror(error))]

    def flaky(fd: int) -> None:
        if failures:
            raise failures.pop()

    monkeypatch.setattr(store_module.os, "fdatasync", flaky)
    try:
        with pytest.raises(first):
            store.begin_volume(_volume(1), {})
        # The disk "works" again, but what the failed flush held may be gone: no more changes.
        with pytest.raises(Internal, match="restart the driver"):
            store.begin_volume(_volume(2), {})
        assert store.volume("id-1") is not None  # reads still answer
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["power", "process"])
def test_the_driver_says_which_durability_is_in_force(durability: str) -> None:
    args = [] if durability == "power" else ["--durability", durability]
    with short_dir() as state, driver_process(state, extra_args=args) as proc, Csi(proc.endpoint) as csi:
        info = csi.identity.GetPluginInfo(pb.GetPluginInfoRequest())
        assert info.manifest["durability"] == durability
        with open(proc.log_path) as f:
            assert f"durability {durability} (" in f.read()


def test_an_unknown_durability_is_refused() -> None:
    from csi_kit.driver import DriverConfig

    with pytest.raises(ValueError, match="durability"):
        DriverConfig(durability="eventually")  # type: ignore[arg-type]
