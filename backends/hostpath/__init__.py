"""hostPath: volumes as directories (the model backend)."""

from __future__ import annotations

from csi_kit_backends.hostpath.backend import HostPathBackend, HostPathConfig

__all__ = ["HostPathBackend", "HostPathConfig"]
