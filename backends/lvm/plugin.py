"""Entry point (``csi_kit`` group): registers the lvm backend."""

from __future__ import annotations

from csi_kit.plugin import BackendRegistry, hookimpl
from csi_kit_backends.lvm.backend import LvmBackend, LvmConfig


@hookimpl
def csi_kit_register_backends(registry: BackendRegistry) -> None:
    registry.add("lvm", LvmBackend, config=LvmConfig)
