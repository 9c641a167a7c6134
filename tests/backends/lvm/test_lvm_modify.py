"""ControllerModifyVolume on the lvm backend: the ``readahead`` mutable parameter.

The checks of keys and values need no LVM and run anywhere; the change
itself runs against a real VG (VM harness, or natively with device-mapper),
on a thin volume staged with a mounted filesystem and on a linear one, and
reads the device's read-ahead back from sysfs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lvm_backend_helpers import MiB, make_backend, request, staged, volume

from csi_kit.backend import BackendContext, capabilities_of
from csi_kit.errors import InvalidArgument, NotFound
from csi_kit_backends.lvm.backend import LvmBackend, LvmConfig, _read_ahead


def test_modify_volume_is_advertised() -> None:
    assert capabilities_of(LvmBackend).modify


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("none", "none"), ("8", "8"), ("0256", "256"), ("2097152", "2097152")],
)
def test_accepted_read_ahead_values(value: str, expected: str) -> None:
    assert _read_ahead({"readahead": value}) == expected


@pytest.mark.parametrize(
    "params",
    [
        {"readahead": "7"},  # LVM would round it to 8: not idempotent
        {"readahead": "12"},
        {"readahead": "0"},
        {"readahead": "4194304"},
        {"readahead": "-8"},
        {"readahead": "\uff12\uff15\uff16"},  # fullwidth 256: digits to str.isdigit, not to LVM
        {"readahead": "256k"},
        {"readahead": ""},
        {"zero": "n"},
        {"readahead": "auto", "type": "linear"},
    ],
)
def test_refused_before_lvm_is_asked(params: dict[str, str]) -> None:
    backend = LvmBackend(
        LvmConfig(volume_group="vg-that-does-not-exist", thin_pool="pool"),
        BackendContext("lvm.csi-kit.io", "node-1", "/nonexistent"),
    )
    with pytest.raises(InvalidArgument):
        backend.modify_volume(volume("v", 8 * MiB), params)


def test_co_information_keys_change_nothing() -> None:
    assert _read_ahead({"csi.storage.k8s.io/pvc/name": "data"}) is None


def _kernel_read_ahead_kb(device: str) -> int:
    rdev = os.stat(device).st_rdev  # a node or a symlink to one, depending on udev
    with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/queue/read_ahead_kb") as f:
        return int(f.read())


@pytest.mark.lvm
@pytest.mark.privileged
def test_read_ahead_changes_on_a_mounted_thin_volume_and_a_linear_one(vg: str, tmp_path: Path) -> None:
    backend = make_backend(vg, str(tmp_path))
    thin, linear = volume("ra-thin", 64 * MiB), volume("ra-linear", 32 * MiB, type="linear")
    try:
        backend.create_volume("ra-thin", request("t", 64 * MiB))
        backend.create_volume("ra-linear", request("l", 32 * MiB, type="linear"))
        with staged(backend, "ra-thin", "ext4", str(tmp_path)) as where:
            device = backend.device_of("ra-thin")
            assert device is not None
            backend.modify_volume(thin, {"readahead": "1024"})
            assert _kernel_read_ahead_kb(device) == 512
            backend.modify_volume(thin, {"readahead": "1024"})  # the same value again: success
            backend.modify_volume(thin, {"readahead": "none"})
            assert _kernel_read_ahead_kb(device) == 0
            with open(os.path.join(where, "still-writable"), "w") as f:
                f.write("yes")
            backend.modify_volume(thin, {"readahead": "auto"})
            assert _kernel_read_ahead_kb(device) > 0
        backend.modify_volume(linear, {"readahead": "64"})
        device = backend.device_of("ra-linear")
        assert device is not None and _kernel_read_ahead_kb(device) == 32
        with pytest.raises(NotFound):
            backend.modify_volume(volume("ra-gone", 8 * MiB), {"readahead": "64"})
    finally:
        backend.delete_volume("ra-thin")
        backend.delete_volume("ra-linear")
