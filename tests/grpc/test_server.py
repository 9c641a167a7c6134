"""The server: unix socket rules, TCP, identity, health, metrics, and the
graceful drain of a real driver process on SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import stat
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from helpers import (
    Csi,
    Gate,
    GatedHostPath,
    create_req,
    enter_gate,
    expect,
    gated_process_argv,
    make_gates,
    short_dir,
)

from csi_kit._grpc.server import parse_endpoint, prepare_unix_socket
from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit._version import __version__
from csi_kit.driver import Driver, DriverConfig
from csi_kit.errors import FailedPrecondition, InvalidArgument
from csi_kit.testing.driver import DriverProcess, driver_process, running_driver

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def state() -> Iterator[str]:
    with short_dir() as d:
        yield d


# -- unix sockets ------------------------------------------------------------------------------


def test_socket_is_created_0600(state: str) -> None:
    with running_driver(state) as ep:
        st = os.stat(ep[len("unix://") :])
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    assert not os.path.exists(ep[len("unix://") :])  # removed at stop


async def test_socket_mode_is_configurable_and_tcp_is_served(state: str) -> None:
    sock = os.path.join(state, "other.sock")
    config = DriverConfig(
        state_dir=state, node_id="n1", endpoints=(f"unix://{sock}", "127.0.0.1:0"), socket_mode=0o660
    )
    driver = Driver(config)
    await driver.start()
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        tcp = next(e for e in driver.endpoints if e.scheme == "tcp")
        assert not tcp.address.endswith(":0")
        async with grpc.aio.insecure_channel(tcp.grpc_target) as ch:
            info = await pbg.IdentityStub(ch).GetPluginInfo(pb.GetPluginInfoRequest(), timeout=30)
        assert info.name == "hostpath.csi-kit.io"
    finally:
        await driver.stop(grace=1)


def test_stale_socket_is_replaced(state: str) -> None:
    sock = os.path.join(state, "csi.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock)
    stale.close()  # the file stays, nobody listens: what a killed driver leaves
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    with running_driver(state) as ep, Csi(ep) as csi:
        assert csi.identity.GetPluginInfo(pb.GetPluginInfoRequest()).name == "hostpath.csi-kit.io"


def test_live_socket_is_refused(state: str) -> None:
    with running_driver(state) as ep, Csi(ep) as csi, short_dir() as other:
        sock = ep[len("unix://") :]
        inode = os.stat(sock).st_ino
        with (
            pytest.raises(FailedPrecondition, match="another process is serving"),
            running_driver(other, socket_path=sock),
        ):
            pass  # pragma: no cover
        # The first driver keeps its socket and keeps answering.
        assert os.stat(sock).st_ino == inode
        assert csi.identity.Probe(pb.ProbeRequest()).ready.value


def test_a_file_that_is_not_a_socket_is_never_replaced(state: str) -> None:
    path = os.path.join(state, "precious")
    with open(path, "w") as f:
        f.write("data")
    with pytest.raises(FailedPrecondition, match="not a socket"):
        prepare_unix_socket(path)
    with open(path) as f:
        assert f.read() == "data"


def test_endpoint_parsing() -> None:
    assert parse_endpoint("unix:///run/x.sock").address == "/run/x.sock"
    assert parse_endpoint("/run/x.sock").scheme == "unix"
    assert parse_endpoint("tcp://0.0.0.0:10000").address == "0.0.0.0:10000"
    assert parse_endpoint("localhost:9").scheme == "tcp"
    for bad in ("unix://relative.sock", "nonsense"):
        with pytest.raises(InvalidArgument):
            parse_endpoint(bad)


# -- identity and health ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def csi() -> Iterator[Csi]:
    with short_dir() as state, running_driver(state, driver_name="hp.example.io") as ep, Csi(ep) as c:
        c.state = state  # type: ignore[attr-defined]
        yield c


def test_plugin_info(csi: Csi) -> None:
    info = csi.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "hp.example.io"
    assert info.vendor_version == __version__
    assert info.manifest["backend"] == "HostPathBackend"


def test_plugin_info_manifest_describes_the_backend(csi: Csi) -> None:
    manifest = csi.identity.GetPluginInfo(pb.GetPluginInfoRequest()).manifest
    assert manifest["capacity"] == "advisory"
    assert manifest["copy"] in ("reflink", "copy_file_range")


def test_plugin_capabilities(csi: Csi) -> None:
    caps = csi.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    svc = pb.PluginCapability.Service
    assert svc.CONTROLLER_SERVICE in services
    assert svc.VOLUME_ACCESSIBILITY_CONSTRAINTS in services
    expansion = [c.volume_expansion.type for c in caps if c.HasField("volume_expansion")]
    assert expansion == [pb.PluginCapability.VolumeExpansion.ONLINE]


def test_probe_follows_the_backend(csi: Csi) -> None:
    assert csi.identity.Probe(pb.ProbeRequest()).ready.value is True
    volumes = os.path.join(csi.state, "hostpath", "volumes")  # type: ignore[attr-defined]
    os.rename(volumes, volumes + ".away")
    try:
        assert csi.identity.Probe(pb.ProbeRequest()).ready.value is False
    finally:
        os.rename(volumes + ".away", volumes)
    assert csi.identity.Probe(pb.ProbeRequest()).ready.value is True


def test_health_service_answers_serving(csi: Csi) -> None:
    assert csi.serving() == SERVING


def test_node_only_mode_serves_no_controller(state: str) -> None:
    with running_driver(state, mode="node") as ep, Csi(ep) as csi:
        expect(grpc.StatusCode.UNIMPLEMENTED, csi.controller.CreateVolume, create_req("v"))
        caps = csi.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
        assert pb.PluginCapability.Service.CONTROLLER_SERVICE not in {c.service.type for c in caps}
        assert csi.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id == "node-1"


# -- metrics -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_endpoint_has_latency_by_method_and_code(state: str) -> None:
    port = _free_port()
    with driver_process(state, extra_args=["--metrics-address", f"127.0.0.1:{port}"]) as proc:
        with Csi(proc.endpoint) as csi:
            csi.create("m1")
            csi.create("m1")
            expect(grpc.StatusCode.INVALID_ARGUMENT, csi.controller.CreateVolume, create_req(""))
            csi.identity.Probe(pb.ProbeRequest())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            text = resp.read().decode()
    assert 'csi_kit_operation_duration_seconds_count{code="OK",method="CreateVolume"} 2.0' in text
    assert (
        'csi_kit_operation_duration_seconds_count{code="INVALID_ARGUMENT",method="CreateVolume"} 1.0' in text
    )
    assert 'csi_kit_operation_duration_seconds_count{code="OK",method="Probe"} 1.0' in text
    assert 'csi_kit_operation_duration_seconds_bucket{code="OK",le="0.001",method="CreateVolume"}' in text
    assert 'csi_kit_operations_in_flight{method="CreateVolume"} 0.0' in text


def test_a_cancelled_call_is_not_recorded_as_ok(state: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="csi_kit.rpc")
    gate = Gate()
    backend = GatedHostPath(state, gate)
    try:
        with running_driver(state, backend_object=backend) as ep, Csi(ep) as csi:
            call = csi.controller.CreateVolume.future(create_req("cancelled"), timeout=60)
            assert gate.entered.wait(30)
            call.cancel()
            for _ in range(600):
                lines = [r for r in caplog.records if getattr(r, "object_name", "") == "cancelled"]
                if lines:
                    break
                time.sleep(0.05)
            gate.open()
            assert lines[0].status == "CANCELLED"  # type: ignore[attr-defined]
    finally:
        gate.open()


# -- graceful drain ------------------------------------------------------------------------------


def test_sigterm_drains_an_in_flight_call_and_exits_0(state: str) -> None:
    gates = os.path.join(state, "gates")
    make_gates(gates)
    sock = os.path.join(state, "csi.sock")
    proc = DriverProcess(gated_process_argv(state, gates), sock, os.path.join(state, "driver.log"))
    proc.start()
    try:
        assert proc.proc is not None
        with Csi(proc.endpoint) as csi:
            assert csi.serving() == SERVING
            call = csi.controller.CreateVolume.future(create_req("in-flight"), timeout=60)
            fd = enter_gate(gates, "volume")
            try:
                proc.proc.send_signal(signal.SIGTERM)
                for _ in range(1200):
                    with open(proc.log_path) as f:
                        if "draining in-flight calls" in f.read():
                            break
                    time.sleep(0.025)
                else:
                    raise AssertionError("the driver never started draining")
                assert proc.proc.poll() is None  # still running: the call is not done
                os.write(fd, b"go\n")
            finally:
                os.close(fd)
            volume = call.result(timeout=60).volume
        assert proc.proc.wait(60) == 0
    finally:
        proc.stop()
    assert volume.volume_id
    db = sqlite3.connect(os.path.join(state, "state.db"))
    assert db.execute("SELECT id, state FROM volumes").fetchall() == [(volume.volume_id, "ready")]
    db.close()
    assert os.listdir(os.path.join(state, "hostpath", "volumes")) == [volume.volume_id]
    assert not os.path.exists(sock)
