"""Entry point (``csi_kit`` group): registers the hostPath backend."""

from __future__ import annotations

from csi_kit.plugin import BackendRegistry, hookimpl
from csi_kit_backends.hostpath.backend import HostPathBackend, HostPathConfig


@hookimpl
def csi_kit_register_backends(registry: BackendRegistry) -> None:
    registry.add("hostpath", HostPathBackend, config=HostPathConfig)
