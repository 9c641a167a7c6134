"""One driver per state directory (issue 11, finding 5).

A second ``csi-kit serve`` on a live state directory used to run the
backend's start-up cleanup and the store reconcile before it found the live
socket and refused: it removed the live driver's in-flight work from
``.incoming``.  Now the state directory's lock is the first thing a driver
takes; the second one exits 2 at once, naming the holder, having touched
nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import Csi, create_req, enter_gate, gated_process_argv, make_gates, pass_gate, short_dir, tree

from csi_kit._core.statedir import LOCK_FILE, StateDirBusy, StateDirLock
from csi_kit._pb import csi_pb2 as pb
from csi_kit.backend import BackendContext
from csi_kit.driver import Driver, DriverConfig, StartupError
from csi_kit.testing.driver import DriverProcess, running_driver
from csi_kit_backends.hostpath.backend import HostPathBackend, HostPathConfig


@pytest.fixture
def state() -> Iterator[str]:
    with short_dir() as d:
        yield d


def _serve(state: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """A second ``csi-kit serve`` with its defaults on ``state`` (as running run-example.sh twice)."""
    argv = [sys.executable, "-m", "csi_kit.cli", "serve", "--state-dir", state, "--node-id", "node-1", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_second_serve_exits_at_once_naming_the_pid_and_the_live_work_survives(state: str) -> None:
    gates = os.path.join(state, "gates")
    make_gates(gates)
    live = DriverProcess(
        gated_process_argv(state, gates), os.path.join(state, "csi.sock"), os.path.join(state, "driver.log")
    )
    live.start()
    try:
        with Csi(live.endpoint) as csi:
            created = csi.controller.CreateVolume.future(create_req("source"), timeout=60)
            pass_gate(gates, "volume")
            source = created.result(timeout=60).volume
            snap_call = csi.controller.CreateSnapshot.future(
                pb.CreateSnapshotRequest(name="in-flight", source_volume_id=source.volume_id), timeout=60
            )
            held = enter_gate(gates, "snapshot")  # the snapshot is half-made in .incoming
            try:
                incoming = os.path.join(state, "hostpath", ".incoming")
                assert len(os.listdir(incoming)) == 1
                before = tree(os.path.join(state, "hostpath"))

                second = _serve(state)

                assert second.returncode == 2, second.stderr
                lines = second.stderr.strip().splitlines()
                assert len(lines) == 1, second.stderr
                assert lines[0].startswith("csi-kit: ") and "Traceback" not in second.stderr
                assert f"pid {live.proc.pid}" in lines[0] and state in lines[0]  # type: ignore[union-attr]
                assert second.stdout == ""
                # Nothing of the live driver's was touched: the half-made snapshot is still there.
                assert tree(os.path.join(state, "hostpath")) == before
                assert len(os.listdir(incoming)) == 1
                os.write(held, b"go\n")
            finally:
                os.close(held)
            snapshot = snap_call.result(timeout=60).snapshot
            assert snapshot.ready_to_use
            assert csi.list_snapshot_ids() == [snapshot.snapshot_id]
            assert csi.identity.Probe(pb.ProbeRequest(), timeout=10).ready.value
    finally:
        live.stop()
    # The lock went with the process: the directory serves again.
    with running_driver(state) as ep, Csi(ep) as csi:
        assert csi.list_volume_ids() == [source.volume_id]


def test_two_drivers_in_one_process_cannot_share_a_state_dir(state: str) -> None:
    with running_driver(state) as ep, Csi(ep) as csi, short_dir() as other:
        config = DriverConfig(state_dir=state, node_id="node-1", endpoints=(f"unix://{other}/csi.sock",))
        with pytest.raises(StateDirBusy, match=f"pid {os.getpid()}"):
            Driver(config)
        assert not os.path.exists(os.path.join(other, "csi.sock"))
        assert csi.identity.Probe(pb.ProbeRequest(), timeout=10).ready.value
    # Released at stop.
    with running_driver(state) as ep, Csi(ep) as csi:
        assert csi.list_volume_ids() == []


class _FailingStart(HostPathBackend):
    def start(self) -> None:
        raise RuntimeError("storage is on fire")


def test_a_driver_that_fails_to_start_releases_the_lock(state: str) -> None:
    config = DriverConfig(state_dir=state, node_id="node-1", endpoints=(f"unix://{state}/csi.sock",))
    backend = _FailingStart(HostPathConfig(), BackendContext(config.driver_name, "node-1", state))
    with pytest.raises(
        StartupError, match=r"_FailingStart.*failed to start: RuntimeError: storage is on fire"
    ):
        Driver(config, backend=backend)
    with running_driver(state) as ep, Csi(ep) as csi:
        assert csi.list_volume_ids() == []


def test_lock_is_not_inherited_by_a_child_process(state: str) -> None:
    """A tool the driver runs (mkfs, mount, a hung lvcreate) must not keep the
    directory locked after the driver is gone."""
    lock = StateDirLock.acquire(state)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        close_fds=False,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"up\n"  # exec is complete: close-on-exec has run
        lock.release()
        again = StateDirLock.acquire(state)
        again.release()
    finally:
        child.kill()
        child.wait()


def test_lock_file_names_the_holder(state: str) -> None:
    lock = StateDirLock.acquire(state)
    try:
        with open(os.path.join(state, LOCK_FILE)) as f:
            assert f.read() == f"{os.getpid()}\n"
        with pytest.raises(StateDirBusy, match=f"pid {os.getpid()}"):
            StateDirLock.acquire(state)
    finally:
        lock.release()
