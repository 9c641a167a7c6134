"""Entry point (``csi_kit`` group) for the loopfile backend."""

from __future__ import annotations

from csi_kit.plugin import BackendRegistry, hookimpl


@hookimpl
def csi_kit_register_backends(registry: BackendRegistry) -> None:
    # Registered once the backend module lands; kept importable meanwhile so
    # the entry point never breaks discovery of the other backends.
    try:
        from csi_kit_backends.loopfile.backend import BACKEND, CONFIG
    except ImportError:
        return
    registry.add("loopfile", BACKEND, config=CONFIG)
