"""A volume group with a thin pool for the real-LVM tests (VM harness or a device-mapper kernel)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vm"))
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the conformance tests outside a module's ``FOCUS`` set.

    Deselected rather than skipped: under TCG every collected test costs
    setup time even when it skips, and the harness's --preselect then leaves
    them on the host.  ``CSI_KIT_LVM_SANITY=full`` keeps every test.
    """
    if os.environ.get("CSI_KIT_LVM_SANITY") == "full":
        return
    keep, drop = [], []
    for item in items:
        focus = getattr(getattr(item, "module", None), "FOCUS", None)
        cls = getattr(item, "cls", None)
        name = f"{cls.__name__ if cls else ''}::{getattr(item, 'originalname', item.name)}"
        (drop if focus is not None and name not in focus else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
