"""Registers the backend through csi_kit's ``csi_kit`` entry-point group."""

from __future__ import annotations

from csi_kit.plugin import BackendRegistry, hookimpl
from csi_kit_scratch.backend import ScratchBackend, ScratchConfig


@hookimpl
def csi_kit_register_backends(registry: BackendRegistry) -> None:
    registry.add("scratch", ScratchBackend, config=ScratchConfig)
