"""kill -9 of a real driver process, then a restart on the same state:
nothing acknowledged is lost, nothing half-made survives, retries agree.

Two forms: a deterministic one (the driver is held inside the backend at a
known point, then killed) and a randomised one (many concurrent creates,
snapshots and deletes, killed after a random number of acknowledgements,
over several rounds; the seed is printed so that a failure can be replayed
with CSI_KIT_CRASH_SEED, and CSI_KIT_CRASH_ROUNDS runs more rounds).

Both run at every ``--durability`` that claims to survive a killed driver:
``power`` (flushed before the answer) and ``process`` (page cache only)."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator

import attrs
import grpc
import pytest
from helpers import (
    Csi,
    create_req,
    enter_gate,
    gated_process_argv,
    make_gates,
    pass_gate,
    short_dir,
)

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.driver import DriverProcess, driver_process

pytestmark = pytest.mark.slow

#: Every durability mode that claims to survive kill -9.
DURABILITIES = ("power", "process")


@pytest.fixture
def state() -> Iterator[str]:
    with short_dir() as d:
        yield d


@pytest.fixture(params=DURABILITIES)
def durability(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _args(durability: str) -> list[str]:
    return ["--durability", durability]


def _rows(state: str, table: str) -> list[tuple[str, str]]:
    db = sqlite3.connect(f"file:{os.path.join(state, 'state.db')}?mode=ro", uri=True)
    try:
        return list(db.execute(f"SELECT name, state FROM {table} ORDER BY seq"))
    finally:
        db.close()


def _ls(state: str, sub: str) -> set[str]:
    return set(os.listdir(os.path.join(state, "hostpath", sub)))


def _new_log(path: str, offset: int) -> str:
    with open(path, errors="replace") as f:
        f.seek(offset)
        return f.read()


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


# -- deterministic ----------------------------------------------------------------------------------


def test_kill_inside_the_backend_then_restart(state: str, durability: str) -> None:
    gates = os.path.join(state, "gates")
    make_gates(gates)
    log = os.path.join(state, "driver.log")
    argv = gated_process_argv(state, gates, *_args(durability))
    proc = DriverProcess(argv, os.path.join(state, "csi.sock"), log)
    proc.start()
    try:
        with Csi(proc.endpoint) as csi:
            src_call = csi.controller.CreateVolume.future(create_req("source"), timeout=60)
            pass_gate(gates, "volume")
            source = src_call.result(timeout=60).volume
            vol_call = csi.controller.CreateVolume.future(create_req("half-volume"), timeout=60)
            snap_call = csi.controller.CreateSnapshot.future(
                pb.CreateSnapshotRequest(name="half-snapshot", source_volume_id=source.volume_id), timeout=60
            )
            held = [enter_gate(gates, "volume"), enter_gate(gates, "snapshot")]
            # Both calls are inside the backend: intent recorded, copies half-made.
            assert set(_rows(state, "volumes")) == {("source", "ready"), ("half-volume", "creating")}
            assert _rows(state, "snapshots") == [("half-snapshot", "creating")]
            assert len(os.listdir(os.path.join(state, "hostpath", ".incoming"))) == 2
            proc.kill()
            for fd in held:
                os.close(fd)
            for call in (vol_call, snap_call):
                with pytest.raises(grpc.RpcError):
                    call.result(timeout=60)
    finally:
        proc.stop()

    offset = _size(log)
    with driver_process(state, extra_args=_args(durability)) as plain, Csi(plain.endpoint) as csi:
        # Reconciled at start: the half-made objects are gone, the acknowledged one stays.
        assert csi.list_volume_ids() == [source.volume_id]
        assert csi.list_snapshot_ids() == []
        assert _ls(state, "volumes") == {source.volume_id}
        assert _ls(state, "snapshots") == set()
        assert _ls(state, ".incoming") == set()
        assert _rows(state, "volumes") == [("source", "ready")]
        assert _rows(state, "snapshots") == []
        out = _new_log(log, offset)
        assert "cleaned volumes" in out and "cleaned snapshots" in out
        assert "orphan" not in out
        # The CO retries: new objects, and the same ones on a second retry.
        assert csi.create("source").volume_id == source.volume_id
        vol = csi.create("half-volume")
        snap = csi.snapshot("half-snapshot", source.volume_id)
        assert csi.create("half-volume").volume_id == vol.volume_id
        assert csi.snapshot("half-snapshot", source.volume_id).snapshot_id == snap.snapshot_id
        assert _ls(state, "volumes") == {source.volume_id, vol.volume_id}
        assert _ls(state, "snapshots") == {snap.snapshot_id}


# -- randomised ---------------------------------------------------------------------------------------


@attrs.define
class Ledger:
    """What the client was told, and what it tried."""

    volumes: dict[str, str] = attrs.field(factory=dict)  # acknowledged name -> id
    snapshots: dict[str, str] = attrs.field(factory=dict)  # acknowledged name -> id
    snapshot_sources: dict[str, str] = attrs.field(factory=dict)  # tried name -> source id
    tried_volumes: set[str] = attrs.field(factory=set)
    deleted: set[str] = attrs.field(factory=set)  # ids whose DeleteVolume was acknowledged
    deleting: set[str] = attrs.field(factory=set)  # ids whose DeleteVolume was sent
    deleting_names: set[str] = attrs.field(factory=set)
    errors: list[BaseException] = attrs.field(factory=list)
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def acks(self) -> int:
        with self.lock:
            return len(self.volumes) + len(self.snapshots) + len(self.deleted)


def _worker(csi: Csi, ledger: Ledger, prefix: str, rng: random.Random, stop: threading.Event) -> None:
    mine: list[str] = []
    i = 0
    try:
        while not stop.is_set():
            i += 1
            name = f"{prefix}-v{i}"
            with ledger.lock:
                ledger.tried_volumes.add(name)
            vid = csi.create(name, required=1 << 20)
            with ledger.lock:
                ledger.volumes[name] = vid.volume_id
            mine.append(name)
            roll = rng.random()
            if roll < 0.35:
                source = ledger.volumes[rng.choice(mine)]
                sname = f"{prefix}-s{i}"
                with ledger.lock:
                    ledger.snapshot_sources[sname] = source
                snap = csi.snapshot(sname, source)
                with ledger.lock:
                    ledger.snapshots[sname] = snap.snapshot_id
            elif roll < 0.5 and len(mine) > 1:
                victim = mine.pop(0)
                victim_id = ledger.volumes[victim]
                with ledger.lock:
                    ledger.deleting.add(victim_id)
                    ledger.deleting_names.add(victim)
                csi.delete(victim_id)
                with ledger.lock:
                    ledger.deleted.add(victim_id)
    except grpc.RpcError as e:
        if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            ledger.errors.append(e)
    except BaseException as e:  # pragma: no cover - reported by the test
        ledger.errors.append(e)


def _check(csi: Csi, state: str, ledger: Ledger) -> None:
    """The invariants after a restart; then every name retried, twice."""
    listed_v = set(csi.list_volume_ids(page=7))
    listed_s = set(csi.list_snapshot_ids(page=7))
    assert _ls(state, ".incoming") == set()
    # No directory without a record, no ready record without its directory.
    assert _ls(state, "volumes") == listed_v
    assert _ls(state, "snapshots") == listed_s
    assert {s for _, s in _rows(state, "volumes")} <= {"ready"}
    # A volume whose delete was sent but not answered may be there or not.
    live = {n: v for n, v in ledger.volumes.items() if v not in ledger.deleting}
    assert set(live.values()) <= listed_v, "an acknowledged volume was lost"
    assert not ledger.deleted & listed_v, "an acknowledged delete came back"
    assert set(ledger.snapshots.values()) <= listed_s, "an acknowledged snapshot was lost"

    for attempt in range(2):
        for name in sorted(ledger.tried_volumes - ledger.deleting_names):
            vid = csi.create(name, required=1 << 20).volume_id
            if name in ledger.volumes:
                assert vid == ledger.volumes[name], f"retry of {name} gave another volume (attempt {attempt})"
            ledger.volumes[name] = vid
        for name, source in sorted(ledger.snapshot_sources.items()):
            try:
                sid = csi.snapshot(name, source).snapshot_id
            except grpc.RpcError as e:
                # Only a snapshot never acknowledged, of a volume deleted since, may be missing.
                assert e.code() == grpc.StatusCode.NOT_FOUND and source in ledger.deleting, e.details()
                assert name not in ledger.snapshots
                continue
            if name in ledger.snapshots:
                assert sid == ledger.snapshots[name], f"retry of {name} gave another snapshot"
            ledger.snapshots[name] = sid
    assert _ls(state, "volumes") == set(csi.list_volume_ids())
    assert _ls(state, "snapshots") == set(csi.list_snapshot_ids())


def test_random_kill_9_rounds(state: str, durability: str) -> None:
    seed = int(os.environ.get("CSI_KIT_CRASH_SEED", time.time_ns() % 1_000_000))
    print(f"crash test seed: {seed} (CSI_KIT_CRASH_SEED={seed} replays it)")
    rng = random.Random(seed)
    ledger = Ledger()
    log = os.path.join(state, "driver.log")
    rounds = int(os.environ.get("CSI_KIT_CRASH_ROUNDS", "2"))
    for round_no in range(rounds + 1):
        offset = _size(log)
        with driver_process(state, extra_args=_args(durability)) as proc, Csi(proc.endpoint) as csi:
            if round_no:
                out = _new_log(log, offset)
                assert "orphan" not in out, out
                cleaned = [
                    ln.split("reconcile: ", 1)[1] for ln in out.splitlines() if "reconcile: cleaned" in ln
                ]
                print(f"round {round_no}: {ledger.acks()} acknowledged; reconcile {cleaned or 'had nothing'}")
                _check(csi, state, ledger)
            if round_no == rounds:
                break
            stop = threading.Event()
            threads = [
                threading.Thread(
                    target=_worker, args=(csi, ledger, f"r{round_no}t{t}", random.Random(rng.random()), stop)
                )
                for t in range(6)
            ]
            for t in threads:
                t.start()
            kill_after = ledger.acks() + rng.randint(8, 40)
            while ledger.acks() < kill_after and any(t.is_alive() for t in threads):
                time.sleep(0.005)
            proc.kill()
            stop.set()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)
            assert not ledger.errors, ledger.errors
    assert len(ledger.volumes) >= rounds * 8
