"""csi_kit.linux.lvm against real LVM: thin pool, thin and linear LVs, thin snapshots.

Marked ``lvm``: runs in the VM harness, or natively where the kernel has
device-mapper.  The VG is per module; each test removes what it made.
"""

from __future__ import annotations

import os

import pytest

from csi_kit.errors import FailedPrecondition, NotFound
from csi_kit.linux import lvm

pytestmark = [pytest.mark.lvm, pytest.mark.privileged]

MiB = 1 << 20
OWNER = f"{lvm.TAG_PREFIX}owner"


def test_vg_and_pool_figures(vg: str) -> None:
    info = lvm.vg_info(vg)
    assert info.vg == vg
    assert info.extent_size == 4 * MiB
    assert info.size == info.extent_count * info.extent_size
    assert 0 < info.free < info.size
    pool = lvm.thin_pool(vg, "pool")
    assert pool.size == 1 << 30
    assert pool.metadata_size > 0
    assert 0 <= pool.data_percent < 1
    assert pool.tags == frozenset({f"{lvm.TAG_PREFIX}pool"})

    grown = lvm.extend_lv(vg, "pool", (1 << 30) + 256 * MiB)
    assert grown.is_thin_pool and grown.size == (1 << 30) + 256 * MiB
    assert lvm.thin_pool(vg, "pool").size == grown.size
    assert lvm.vg_info(vg).free == info.free - 256 * MiB


def test_thin_lv_create_tag_write_extend_remove(vg: str) -> None:
    name = lvm.lv_name_for("pvc/ä_1", "csi-v-", vg)
    lv = lvm.create_thin_lv(vg, "pool", name, 30 * MiB, tags=[OWNER])
    try:
        assert lv.size == 32 * MiB  # rounded up to whole 4 MiB extents
        assert lv.is_thin and lv.pool == "pool" and lv.active
        assert lv.tags == frozenset({OWNER})
        assert os.path.exists(lvm.lv_device_path(vg, name))

        owned = lvm.list_lvs(vg, tag=OWNER)
        assert [x.name for x in owned] == [name]
        assert lvm.csi_id_from_lv_name(owned[0].name, "csi-v-") == "pvc/ä_1"
        assert {x.name for x in lvm.list_lvs(vg)} == {"pool", name}

        with open(lv.device_path, "r+b") as f:
            f.write(os.urandom(8 * MiB))
            os.fsync(f.fileno())
        after = lvm.get_lv(vg, name)
        assert after is not None and after.data_percent is not None
        assert after.data_percent >= 25.0  # 8 of 32 MiB

        lvm.add_tags(vg, name, [f"{lvm.TAG_PREFIX}name=pvc_2F1"])
        tagged = lvm.get_lv(vg, name)
        assert tagged is not None and tagged.tags == {OWNER, f"{lvm.TAG_PREFIX}name=pvc_2F1"}

        grown = lvm.extend_lv(vg, name, 64 * MiB)
        assert grown.size == 64 * MiB
        assert lvm.extend_lv(vg, name, 10 * MiB).size == 64 * MiB  # never shrinks
    finally:
        lvm.remove_lv(vg, name)
    assert lvm.get_lv(vg, name) is None
    lvm.remove_lv(vg, name)  # idempotent


def test_thin_snapshots_with_and_without_activation_skip(vg: str) -> None:
    lvm.create_thin_lv(vg, "pool", "origin", 16 * MiB)
    try:
        dev = lvm.lv_device_path(vg, "origin")
        before = os.urandom(MiB)
        with open(dev, "r+b") as f:
            f.write(before)
            os.fsync(f.fileno())

        snap = lvm.thin_snapshot(vg, "origin", "snap", tags=[OWNER])
        assert snap.origin == "origin" and snap.active and not snap.skips_activation
        assert snap.tags == frozenset({OWNER})
        with open(dev, "r+b") as f:
            f.write(os.urandom(MiB))
            os.fsync(f.fileno())
        with open(snap.device_path, "rb") as f:
            assert f.read(MiB) == before

        cold = lvm.thin_snapshot(vg, "origin", "cold", activate=False)
        assert cold.skips_activation and not cold.active
        assert not os.path.exists(cold.device_path)
        lvm.activate(vg, "cold")
        cold_now = lvm.get_lv(vg, "cold")
        assert cold_now is not None and cold_now.active
        assert os.path.exists(cold.device_path)
        lvm.deactivate(vg, "cold")
        cold_off = lvm.get_lv(vg, "cold")
        assert cold_off is not None and not cold_off.active
    finally:
        for name in ("cold", "snap", "origin"):
            lvm.remove_lv(vg, name)
    assert {x.name for x in lvm.list_lvs(vg)} == {"pool"}


def test_linear_lv_and_an_open_lv_is_not_removed(vg: str) -> None:
    lv = lvm.create_linear_lv(vg, "lin", 5 * MiB, tags=[OWNER])
    try:
        assert lv.segtype == "linear" and lv.size == 8 * MiB and lv.pool is None
        with open(lv.device_path, "rb"), pytest.raises(FailedPrecondition, match="in use"):
            lvm.remove_lv(vg, "lin")
        assert lvm.get_lv(vg, "lin") is not None
    finally:
        lvm.remove_lv(vg, "lin")
    assert lvm.get_lv(vg, "lin") is None


def test_missing_things(vg: str) -> None:
    with pytest.raises(FailedPrecondition, match="does not exist"):
        lvm.vg_info("csikitnosuchvg")
    with pytest.raises(FailedPrecondition, match="does not exist"):
        lvm.list_lvs("csikitnosuchvg")
    with pytest.raises(NotFound):
        lvm.thin_pool(vg, "nosuchpool")
    with pytest.raises(NotFound):
        lvm.extend_lv(vg, "nosuchlv", MiB)
    lvm.create_thin_lv(vg, "pool", "notapool", 4 * MiB)
    try:
        with pytest.raises(FailedPrecondition, match="not a thin pool"):
            lvm.thin_pool(vg, "notapool")
    finally:
        lvm.remove_lv(vg, "notapool")
