"""Entry point (``csi_kit`` group): registers the loopfile backend."""

from __future__ import annotations

from csi_kit.plugin import BackendRegistry, hookimpl
from csi_kit_backends.loopfile.backend import LoopfileBackend, LoopfileConfig


@hookimpl
def csi_kit_register_backends(registry: BackendRegistry) -> None:
    registry.add("loopfile", LoopfileBackend, config=LoopfileConfig)
