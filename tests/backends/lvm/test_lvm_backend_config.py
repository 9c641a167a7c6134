"""The lvm backend's configuration, registration and parameter checks: no LVM needed (runs anywhere)."""

from __future__ import annotations

import pytest

from csi_kit.backend import BackendContext, capabilities_of
from csi_kit.errors import InvalidArgument
from csi_kit.plugin.manager import build_config, load_registry
from csi_kit_backends.lvm.backend import LvmBackend, LvmConfig

MiB = 1 << 20


def backend(**options: str) -> LvmBackend:
    entry = load_registry().get("lvm")
    config = build_config(entry, {"volume_group": "vg0", "thin_pool": "pool", **options})
    return LvmBackend(config, BackendContext("lvm.csi-kit.io", "node-1", "/nonexistent"))


def test_registered_with_its_config_and_capabilities() -> None:
    entry = load_registry().get("lvm")
    assert entry.backend is LvmBackend and entry.config is LvmConfig
    caps = capabilities_of(LvmBackend)
    assert caps.snapshots and caps.restore and caps.clone and caps.expand and caps.get_capacity
    assert caps.node_stage and caps.node_expand and caps.volume_condition
    assert not caps.group_snapshots and not caps.controller_publish


def test_options_are_converted_and_checked() -> None:
    b = backend(extra_pools="fast, slow,fast", overprovision_ratio="2.5", nearly_full_percent="80")
    assert b.pools == ("pool", "fast", "slow")
    assert b.ratio == 2.5 and b.nearly_full == 80.0
    entry = load_registry().get("lvm")
    with pytest.raises(InvalidArgument, match="overprovision_ratio must be positive"):
        build_config(entry, {"overprovision_ratio": "0"})
    with pytest.raises(InvalidArgument, match="nearly_full_percent"):
        build_config(entry, {"nearly_full_percent": "150"})
    with pytest.raises(InvalidArgument, match="needs volume_group"):
        LvmBackend(None, BackendContext("d", "n", "/x")).start()


def test_parameters_choose_type_and_pool() -> None:
    b = backend(extra_pools="fast")
    assert b._placement({}).kind == "thin" and b._placement({}).pool == "pool"
    assert b._placement({"pool": "fast"}).pool == "fast"
    assert b._placement({"type": "linear"}).kind == "linear"
    with pytest.raises(InvalidArgument, match="not a configured thin pool"):
        b._placement({"pool": "other"})
    with pytest.raises(InvalidArgument, match="applies to thin volumes only"):
        b._placement({"type": "linear", "pool": "fast"})
    with pytest.raises(InvalidArgument, match="use one of thin, linear"):
        b._placement({"type": "mirror"})


def test_names_and_rounding() -> None:
    b = backend()
    assert b.round_capacity(1) == 4 * MiB and b.round_capacity(8 * MiB) == 8 * MiB
    assert b.volume_lv("pvc-1/a") == "csi-v-pvc-1_2Fa"
    assert b.snapshot_lv("snap_1") == "csi-s-snap_5F1"
    assert b._device_path("pvc-1") == "/dev/mapper/vg0-csi--v--pvc--1"
