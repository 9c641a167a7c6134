"""Backend discovery: pluggy hooks, the registry they fill, entry-point loading."""

from __future__ import annotations

from csi_kit.plugin.hookspecs import hookimpl, hookspec
from csi_kit.plugin.manager import BackendEntry, BackendRegistry, load_registry

__all__ = ["hookimpl", "hookspec", "BackendEntry", "BackendRegistry", "load_registry"]
