"""A volume group with a thin pool for the real-LVM tests (VM harness or a device-mapper kernel)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vm"))
from scratch import block_device, cmd, remove_vg, unique_vg_name

from csi_kit.linux import lvm

POOL = "pool"


@pytest.fixture(scope="module")
def vg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh VG with a 1 GiB thin pool, shared by a module: lvm calls are slow under TCG."""
    with block_device(tmp_path_factory.mktemp("lvm")) as device:
        name = unique_vg_name()
        cmd("pvcreate", "-q", device)
        try:
            cmd("vgcreate", "-q", name, device)
            lvm.create_thin_pool(name, POOL, 1 << 30, tags=[f"{lvm.TAG_PREFIX}pool"])
            yield name
        finally:
            remove_vg(name)
