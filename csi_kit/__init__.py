"""csi_kit: write a Kubernetes CSI driver by writing only the part that talks to your storage.

Subclass `Backend`, register it through the ``csi_kit`` entry-point group
(`csi_kit.plugin.hookimpl` on ``csi_kit_register_backends``), and serve it
with ``csi-kit serve --backend NAME`` or `run_driver`.
"""

from __future__ import annotations

from csi_kit import errors, types
from csi_kit._version import __version__
from csi_kit.backend import Backend, BackendContext, Capabilities, GiB, MiB, capabilities_of
from csi_kit.block import BlockDeviceBackend
from csi_kit.driver import Driver, DriverConfig, run_driver
from csi_kit.plugin import BackendRegistry, hookimpl
from csi_kit.types import (
    AccessMode,
    CapacityRange,
    ContentSource,
    CreatedSnapshot,
    CreatedVolume,
    ExpandResult,
    Inventory,
    MountAccess,
    PublishRequest,
    Snapshot,
    StageRequest,
    Topology,
    Volume,
    VolumeCapability,
    VolumeCondition,
    VolumeRequest,
    VolumeStats,
    VolumeUsage,
)

__all__ = [
    "__version__",
    "errors",
    "types",
    "Backend",
    "BackendContext",
    "BlockDeviceBackend",
    "BackendRegistry",
    "Capabilities",
    "capabilities_of",
    "hookimpl",
    "Driver",
    "DriverConfig",
    "run_driver",
    "GiB",
    "MiB",
    "AccessMode",
    "CapacityRange",
    "ContentSource",
    "CreatedSnapshot",
    "CreatedVolume",
    "ExpandResult",
    "Inventory",
    "MountAccess",
    "PublishRequest",
    "Snapshot",
    "StageRequest",
    "Topology",
    "Volume",
    "VolumeCapability",
    "VolumeCondition",
    "VolumeRequest",
    "VolumeStats",
    "VolumeUsage",
]
