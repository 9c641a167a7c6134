"""The /healthz endpoint, over real HTTP, against a scripted driver's Probe over real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from k8s_helpers import http_get
from volume_peer import VolumeCSI

from csi_kit.k8s.runtime.csi import CSIClient
from csi_kit.k8s.volume.liveness import LivenessServer


class Env:
    def __init__(self, peer: VolumeCSI, server: LivenessServer) -> None:
        self.peer = peer
        self.server = server
        self.port = server.bound_port
        self.extra: list[tuple[bool, str]] = []


@pytest.fixture
async def env(volume_csi: VolumeCSI, csi_client: CSIClient) -> AsyncIterator[Env]:
    holder: list[Env] = []

    def extra() -> tuple[bool, str]:
        return holder[0].extra[-1] if holder and holder[0].extra else (True, "")

    server = LivenessServer(csi_client.probe, host="127.0.0.1", port=0, probe_timeout=0.5, checks=[extra])
    await server.start()
    e = Env(volume_csi, server)
    holder.append(e)
    try:
        yield e
    finally:
        await server.stop()


async def test_healthy_driver_answers_ok(env: Env) -> None:
    assert await http_get(env.port) == (200, "ok")
    assert env.peer.calls["Probe"] == 1


async def test_not_ready_driver_fails(env: Env) -> None:
    env.peer.ready = False
    code, body = await http_get(env.port)
    assert code == 500 and "not ready" in body


async def test_probe_error_fails(env: Env) -> None:
    env.peer.fail("Probe", grpc.StatusCode.FAILED_PRECONDITION, "backend root vanished")
    code, body = await http_get(env.port)
    assert code == 500 and "backend root vanished" in body
    assert (await http_get(env.port))[0] == 200


async def test_hanging_driver_fails_within_the_probe_timeout(env: Env) -> None:
    gate = env.peer.hold("Probe")
    code, body = await http_get(env.port)
    gate.set()
    assert code == 500 and "within 0.5s" in body


async def test_failed_extra_check_fails_without_probing(env: Env) -> None:
    env.extra.append((False, "kubelet registration failed: nope"))
    code, body = await http_get(env.port)
    assert code == 500 and "registration failed" in body
    assert env.peer.calls["Probe"] == 0


async def test_other_paths_and_methods(env: Env) -> None:
    assert (await http_get(env.port, "/metrics"))[0] == 404
    assert (await http_get(env.port, "/healthz", "POST"))[0] == 405
    assert (await http_get(env.port, "/healthz?verbose=1"))[0] == 200
    code, body = await http_get(env.port, "/healthz", "HEAD")
    assert code == 200 and body == ""
