"""Kubelet plugin registration, exercised the way the kubelet does it: over the socket."""

from __future__ import annotations

import os
import socket
from typing import Any

import grpc
import grpc.aio
import pytest

from csi_kit._pb import pluginregistration_pb2 as rpb
from csi_kit._pb import pluginregistration_pb2_grpc as rpbg
from csi_kit.k8s.volume.registration import RegistrationServer, socket_path


def test_wire_names_and_numbers_are_the_kubelets() -> None:
    d = rpb.DESCRIPTOR
    assert d.package == "pluginregistration"
    svc = d.services_by_name["Registration"]
    assert svc.full_name == "pluginregistration.Registration"
    assert {m.name: (m.input_type.name, m.output_type.name) for m in svc.methods} == {
        "GetInfo": ("InfoRequest", "PluginInfo"),
        "NotifyRegistrationStatus": ("RegistrationStatus", "RegistrationStatusResponse"),
    }
    info = {f.name: (f.number, f.type, f.is_repeated) for f in rpb.PluginInfo.DESCRIPTOR.fields}
    string = 9
    assert info == {
        "type": (1, string, False),
        "name": (2, string, False),
        "endpoint": (3, string, False),
        "supported_versions": (4, string, True),
    }
    status = {f.name: (f.number, f.type) for f in rpb.RegistrationStatus.DESCRIPTOR.fields}
    assert status == {"plugin_registered": (1, 8), "error": (2, string)}
    # Bytes as the kubelet's Go code decodes them: tag (field<<3|2), length, payload.
    raw = rpb.PluginInfo(
        type="CSIPlugin", name="d", endpoint="/s", supported_versions=["1.0.0"]
    ).SerializeToString()
    assert raw == b"\x0a\x09CSIPlugin" + b"\x12\x01d" + b"\x1a\x02/s" + b"\x22\x051.0.0"


async def _kubelet(path: str) -> tuple[grpc.aio.Channel, Any]:
    ch = grpc.aio.insecure_channel("unix://" + path)
    return ch, rpbg.RegistrationStub(ch)


async def test_kubelet_gets_info_and_reports_success(tmp_path: Any) -> None:
    seen: list[tuple[bool, str]] = []
    srv = RegistrationServer(
        "hostpath.csi-kit.io",
        "/var/lib/kubelet/plugins/hostpath.csi-kit.io/csi.sock",
        str(tmp_path / "registry"),
        on_status=lambda ok, err: seen.append((ok, err)),
    )
    await srv.start()
    try:
        path = socket_path(str(tmp_path / "registry"), "hostpath.csi-kit.io")
        assert path.endswith("/hostpath.csi-kit.io-reg.sock") and os.path.exists(path)
        ch, stub = await _kubelet(path)
        info = await stub.GetInfo(rpb.InfoRequest())
        assert (info.type, info.name, info.endpoint) == (
            "CSIPlugin",
            "hostpath.csi-kit.io",
            "/var/lib/kubelet/plugins/hostpath.csi-kit.io/csi.sock",
        )
        assert list(info.supported_versions) == ["1.0.0"]
        assert srv.healthy() == (True, "")
        await stub.NotifyRegistrationStatus(rpb.RegistrationStatus(plugin_registered=True))
        assert srv.registered is True and seen == [(True, "")]
        await ch.close()
    finally:
        await srv.stop()
    assert not os.path.exists(path)


async def test_refused_registration_makes_the_plugin_unhealthy(tmp_path: Any) -> None:
    srv = RegistrationServer("d.example.com", "unix:///plugins/d/csi.sock", str(tmp_path))
    await srv.start()
    try:
        ch, stub = await _kubelet(srv.path)
        assert (await stub.GetInfo(rpb.InfoRequest())).endpoint == "/plugins/d/csi.sock"
        await stub.NotifyRegistrationStatus(
            rpb.RegistrationStatus(plugin_registered=False, error="version 1.0.0 not supported")
        )
        ok, why = srv.healthy()
        assert not ok and "version 1.0.0 not supported" in why
        await ch.close()
    finally:
        await srv.stop()


async def test_a_vanished_socket_is_unhealthy(tmp_path: Any) -> None:
    srv = RegistrationServer("d.example.com", "/plugins/d/csi.sock", str(tmp_path))
    await srv.start()
    try:
        os.unlink(srv.path)
        assert srv.healthy()[0] is False
    finally:
        await srv.stop()


async def test_stale_socket_is_replaced_but_other_files_are_not_touched(tmp_path: Any) -> None:
    path = socket_path(str(tmp_path), "d.example.com")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a dead socket file, as a crashed earlier run leaves it
    srv = RegistrationServer("d.example.com", "/plugins/d/csi.sock", str(tmp_path))
    await srv.start()
    try:
        ch, stub = await _kubelet(path)
        assert (await stub.GetInfo(rpb.InfoRequest())).name == "d.example.com"
        await ch.close()
    finally:
        await srv.stop()
    with open(path, "w") as f:
        f.write("not a socket")
    with pytest.raises(RuntimeError, match="not a socket"):
        await RegistrationServer("d.example.com", "/plugins/d/csi.sock", str(tmp_path)).start()
    with open(path) as f:
        assert f.read() == "not a socket"


def test_the_kubelet_path_is_required() -> None:
    with pytest.raises(ValueError):
        RegistrationServer("d.example.com", "", "/tmp")
