"""Registers the tutorial backend under the name ``dirs``."""

from __future__ import annotations

from csi_kit.plugin import BackendRegistry, hookimpl
from csi_kit_tutorial.backend import DirBackend, DirConfig


@hookimpl
def csi_kit_register_backends(registry: BackendRegistry) -> None:
    registry.add("dirs", DirBackend, config=DirConfig)
