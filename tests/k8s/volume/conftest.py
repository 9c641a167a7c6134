"""Fixtures for the volume loops: the scripted driver and a client of it over real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from volume_peer import VolumeCSI, served

from csi_kit.k8s.runtime.csi import CSIClient


@pytest.fixture
def volume_csi() -> VolumeCSI:
    """The scripted driver; a test or fixture may script it (capabilities, errors) before using it."""
    return VolumeCSI()


@pytest.fixture
async def csi_client(volume_csi: VolumeCSI, tmp_path: Any) -> AsyncIterator[CSIClient]:
    """A client of `volume_csi`, served on a socket in `tmp_path`; its `endpoint` is the driver's."""
    async with served(volume_csi, str(tmp_path / "csi.sock")) as endpoint:
        client = CSIClient(endpoint, timeout=5)
        try:
            yield client
        finally:
            await client.close()
