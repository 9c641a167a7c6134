"""Shared pieces of the lvm backend tests: a backend on the module's VG, requests, staging."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from csi_kit.backend import BackendContext
from csi_kit.linux import mounts
from csi_kit.types import (
    AccessMode,
    CapacityRange,
    MountAccess,
    StageRequest,
    Volume,
    VolumeCapability,
    VolumeRequest,
)
from csi_kit_backends.lvm.backend import LvmBackend, LvmConfig

MiB = 1 << 20


def make_backend(vg: str, state_dir: str, **options: object) -> LvmBackend:
    config = LvmConfig(volume_group=vg, thin_pool=str(options.pop("thin_pool", "pool")), **options)
    backend = LvmBackend(config, BackendContext("lvm.csi-kit.io", "node-1", state_dir))
    backend.start()
    return backend


def capability(kind: str) -> VolumeCapability:
    """``ext4``, ``xfs`` or ``block``."""
    if kind == "block":
        return VolumeCapability("block", AccessMode.SINGLE_NODE_WRITER)
    return VolumeCapability("mount", AccessMode.SINGLE_NODE_WRITER, MountAccess(fs_type=kind))


def request(name: str, size: int, kind: str = "ext4", **parameters: str) -> VolumeRequest:
    return VolumeRequest(name, size, CapacityRange(size, 0), (capability(kind),), parameters)


def volume(volume_id: str, size: int, kind: str = "ext4", **parameters: str) -> Volume:
    return Volume(volume_id, volume_id, size, "block" if kind == "block" else "mount", parameters)


@contextlib.contextmanager
def staged(backend: LvmBackend, volume_id: str, kind: str, where: str) -> Iterator[str]:
    """Stage the volume at a fresh directory; yield the mount point (or the device, for block)."""
    path = os.path.join(where, f"stage-{volume_id}")
    os.makedirs(path, exist_ok=True)
    backend.node_stage(StageRequest(volume_id, path, capability(kind)))
    try:
        if kind == "block":
            device = backend.device_of(volume_id)
            assert device is not None
            yield device
        else:
            yield path
    finally:
        backend.node_unstage(volume_id, path)
        assert not mounts.mounts_at(path)
