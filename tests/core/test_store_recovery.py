"""The store cannot silently reset (issue 11, finding 6).

An emptied ``state.db`` used to be taken for a fresh install: every volume
became an "orphan", vanished from ListVolumes, and new creates were accepted
on top; a truncated or garbage store gave a raw traceback.  Now a missing,
empty, truncated or garbage store while the backend holds objects is one
line and exit 2 naming the file and ``csi-kit store rebuild``, which moves the
bad file aside and brings the backend's volumes and snapshots back.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import Csi, short_dir

from csi_kit._core.store import Store
from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.driver import driver_process

DAMAGE = ("missing", "empty", "truncated", "garbage")


@pytest.fixture
def state() -> Iterator[str]:
    with short_dir() as d:
        yield d


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "csi_kit.cli", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _serve(state: str) -> subprocess.CompletedProcess[str]:
    """A serve that is expected to refuse (it would otherwise run until killed)."""
    return _cli("serve", "--state-dir", state, "--node-id", "node-1")


def _populate(state: str) -> tuple[list[str], list[str]]:
    with driver_process(state) as proc, Csi(proc.endpoint) as csi:
        a, b = csi.create("a"), csi.create("b")
        snap = csi.snapshot("s", a.volume_id)
    return sorted([a.volume_id, b.volume_id]), [snap.snapshot_id]


def _damage(path: str, how: str) -> bytes:
    """Damage the store as an accident would; returns what the file then holds."""
    if how == "missing":
        os.remove(path)
        return b""
    if how == "empty":
        os.truncate(path, 0)
    elif how == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        with open(path, "wb") as f:
            f.write(b"not a database\n" * 300)
    with open(path, "rb") as f:
        return f.read()


def _volume_dirs(state: str) -> set[str]:
    return set(os.listdir(os.path.join(state, "hostpath", "volumes")))


@pytest.mark.parametrize("how", DAMAGE)
def test_a_lost_store_refuses_to_start_then_rebuild_brings_the_volumes_back(state: str, how: str) -> None:
    volumes, snapshots = _populate(state)
    path = os.path.join(state, "state.db")
    content = _damage(path, how)

    refused = _serve(state)
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("csi-kit: ")]
    assert len(errors) == 1, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == errors[0]
    assert f"state store {path}" in errors[0]
    assert f"csi-kit store rebuild --state-dir {state} --backend hostpath" in errors[0]
    # Nothing was made over it and nothing of the backend's was touched.
    assert _volume_dirs(state) == set(volumes)
    if how == "missing":
        assert not os.path.exists(path)
    else:
        with open(path, "rb") as f:
            assert f.read() == content
    assert not os.path.exists(os.path.join(state, "csi.sock"))

    rebuilt = _cli("store", "rebuild", "--state-dir", state, "--backend", "hostpath", "--node-id", "node-1")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "recorded 2 volume(s) and 1 snapshot(s)" in rebuilt.stdout
    # The bad file was moved aside, never deleted.
    aside = [n for n in os.listdir(state) if n.startswith("state.db.")]
    if how == "missing":
        assert aside == []
    else:
        assert len(aside) == 1, aside
        with open(os.path.join(state, aside[0]), "rb") as f:
            assert f.read() == content

    with driver_process(state) as proc, Csi(proc.endpoint) as csi:
        assert sorted(csi.list_volume_ids()) == volumes
        assert csi.list_snapshot_ids() == snapshots
        entry = csi.controller.ListVolumes(pb.ListVolumesRequest(), timeout=30).entries[0]
        assert entry.volume.capacity_bytes == 0  # unknown, as the spec spells it
        # The recovered objects are the driver's again: a restore and a delete work.
        restored = csi.create("restored", snapshot=snapshots[0])
        csi.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshots[0]), timeout=30)
        csi.delete(volumes[0])
        assert _volume_dirs(state) == {volumes[1], restored.volume_id}
        assert csi.list_snapshot_ids() == []


def test_rebuild_keeps_a_healthy_store_and_adopts_only_what_it_lacks(state: str) -> None:
    volumes, _ = _populate(state)
    stray = os.path.join(state, "hostpath", "volumes", "made-behind-the-driver")
    os.mkdir(stray)
    done = _cli("store", "rebuild", "--state-dir", state, "--backend", "hostpath", "--node-id", "node-1")
    assert done.returncode == 0, done.stderr
    assert "recorded 1 volume(s) and 0 snapshot(s)" in done.stdout
    assert [n for n in os.listdir(state) if n.startswith("state.db.")] == []
    db = sqlite3.connect(f"file:{os.path.join(state, 'state.db')}?mode=ro", uri=True)
    try:
        rows = dict(db.execute("SELECT id, name FROM volumes WHERE state='ready'"))
    finally:
        db.close()
    assert {rows[v] for v in volumes} == {"a", "b"}  # the real names are kept
    assert rows["made-behind-the-driver"] == "recovered-made-behind-the-driver"
    again = _cli("store", "rebuild", "--state-dir", state, "--backend", "hostpath", "--node-id", "node-1")
    assert again.returncode == 0 and "records everything" in again.stdout


def test_rebuild_refuses_while_a_driver_serves_the_directory(state: str) -> None:
    with driver_process(state) as proc:
        busy = _cli("store", "rebuild", "--state-dir", state, "--backend", "hostpath")
        assert busy.returncode == 2
        assert busy.stderr.count("\n") == 1 and f"pid {proc.proc.pid}" in busy.stderr  # type: ignore[union-attr]
    assert [n for n in os.listdir(state) if n.startswith("state.db.")] == []


@pytest.mark.parametrize("how", ("missing", "empty"))
def test_a_fresh_install_still_just_starts(state: str, how: str) -> None:
    if how == "empty":
        open(os.path.join(state, "state.db"), "wb").close()
    with driver_process(state) as proc, Csi(proc.endpoint) as csi:
        assert csi.list_volume_ids() == []
        csi.create("first")


def test_store_without_create_writes_nothing(state: str) -> None:
    """The refusal must leave the evidence: opening a missing or empty store
    for reading neither creates it nor turns it into a valid empty store."""
    from csi_kit._core.store import StoreMissing

    path = os.path.join(state, "state.db")
    with pytest.raises(StoreMissing, match="does not exist"):
        Store(path, create=False)
    assert not os.path.exists(path)
    open(path, "wb").close()
    with pytest.raises(StoreMissing, match="empty"):
        Store(path, create=False)
    assert os.path.getsize(path) == 0
