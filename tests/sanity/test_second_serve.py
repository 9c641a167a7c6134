"""One driver per state directory: a second `csi-kit serve` on the state
directory of a live driver must leave at once and harm nothing.

The issue: a second serve ran the backend's start (which empties hostPath's
`.incoming`) and the start-up reconcile before it found the live socket, so
the live driver's in-flight snapshot vanished.  Here the live driver is a
real `csi-kit serve` process with volumes; its in-flight work is stood in
for by an entry in `.incoming`; the second serve is started with the live
one's own command line (the same socket, as running an example script
twice does) and with another socket (nothing to collide on but the state
directory).  It must exit 2 naming the live driver's pid, and the live
driver must still answer, list the same volumes and keep `.incoming` as it
was.

This sits in tests/sanity rather than in the generic suite: only here is
it known how the driver was started.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit.errors import DeadlineExceeded
from csi_kit.linux.run import run
from csi_kit.testing.driver import DriverProcess, driver_process

#: A hang bound, not a speed check: a second serve that does not exit within
#: it is serving on the live driver's state.
HANG_BOUND = 120.0


@pytest.fixture
def live(tmp_path: object) -> Iterator[tuple[DriverProcess, str]]:
    """A live hostPath driver with two volumes; yields (process, state dir)."""
    state = os.path.join(str(tmp_path), "state")
    with driver_process(state, backend="hostpath") as proc:
        with grpc.insecure_channel(proc.endpoint) as ch:
            ctrl = pbg.ControllerStub(ch)
            cap = pb.VolumeCapability(
                access_mode=pb.VolumeCapability.AccessMode(
                    mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
                )
            )
            cap.mount.SetInParent()
            for name in ("live-a", "live-b"):
                req = pb.CreateVolumeRequest(name=name, volume_capabilities=[cap])
                req.capacity_range.required_bytes = 1 << 20
                ctrl.CreateVolume(req, timeout=60)
        yield proc, state


def _volume_ids(endpoint: str) -> set[str]:
    with grpc.insecure_channel(endpoint) as ch:
        pbg.IdentityStub(ch).Probe(pb.ProbeRequest(), timeout=30)
        resp = pbg.ControllerStub(ch).ListVolumes(pb.ListVolumesRequest(), timeout=30)
    return {e.volume.volume_id for e in resp.entries}


@pytest.mark.parametrize("socket", ["same-socket", "other-socket"])
def test_second_serve_on_live_state_dir(live: tuple[DriverProcess, str], socket: str) -> None:
    proc, state = live
    assert proc.proc is not None
    before = _volume_ids(proc.endpoint)
    assert len(before) == 2
    incoming = os.path.join(state, "hostpath", ".incoming")
    in_flight = os.path.join(incoming, "snap-in-flight")
    os.mkdir(in_flight)
    argv = list(proc.argv)
    if socket == "other-socket":
        at = argv.index("--endpoint") + 1
        argv[at] = f"unix://{os.path.join(state, 'other.sock')}"
    try:
        result = run(argv, check=False, timeout=HANG_BOUND)
    except DeadlineExceeded:
        pytest.fail(f"a second serve on a live state directory was still running after {HANG_BOUND:g} s")
    output = result.stdout + result.stderr
    # What the live driver lost first, then how the second one said no.
    assert proc.proc.poll() is None, "the live driver died"
    assert _volume_ids(proc.endpoint) == before, "the live driver's volumes changed"
    assert os.path.isdir(in_flight), (
        f"the second serve removed the live driver's in-flight work in .incoming:\n{output[-3000:]}"
    )
    assert result.returncode == 2, f"the second serve exited {result.returncode}:\n{output[-3000:]}"
    assert str(proc.proc.pid) in output, f"the refusal does not name the live pid {proc.proc.pid}:\n{output}"
    assert "Traceback" not in output, output
    os.rmdir(in_flight)
