"""Fixtures for the loops on the in-memory API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from csi_peer import ScriptedCSI, serve
from k8s_helpers import DRIVER, Loops

from csi_kit.testing.fake_k8s import FakeKubeAPI


@pytest.fixture
async def api() -> FakeKubeAPI:
    return FakeKubeAPI()


@pytest.fixture
async def peer(tmp_path: Any) -> AsyncIterator[tuple[ScriptedCSI, str]]:
    p = ScriptedCSI(DRIVER)
    sock = str(tmp_path / "csi.sock")
    server = await serve(p, sock)
    try:
        yield p, "unix://" + sock
    finally:
        await server.stop(None)


@pytest.fixture
async def loops(api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]) -> AsyncIterator[Loops]:
    lp = Loops(api, peer[1])
    await lp.start()
    try:
        yield lp
    finally:
        await lp.stop()
