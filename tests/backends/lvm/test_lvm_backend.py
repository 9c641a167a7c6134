"""The lvm backend against real LVM (VM harness, or natively with device-mapper).

The data test (write, snapshot, write more, restore, clone) for ext4, XFS and
raw block; expansion; linear volumes and their limits; and the failure paths:
an lvm command that fails half-way, a full pool, a missing VG or pool at
start-up.  The VG and its 1 GiB thin pool ``pool`` come from conftest.py (one
per module); each test removes what it made and checks nothing is left.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from lvm_backend_helpers import MiB, make_backend, request, staged, volume

from csi_kit._core.store import Store
from csi_kit.driver import Driver, DriverConfig
from csi_kit.errors import CommandFailed, FailedPrecondition, InvalidArgument, ResourceExhausted
from csi_kit.linux import blockfs, lvm
from csi_kit.types import Snapshot
from csi_kit_backends.lvm.backend import SNAPSHOT_TAG, VOLUME_TAG, LvmBackend

pytestmark = [pytest.mark.lvm, pytest.mark.privileged]

SIZES = {"ext4": 64 * MiB, "xfs": 300 * MiB, "block": 32 * MiB}


def owned(vg: str) -> set[str]:
    return {lv.name for lv in lvm.list_lvs(vg) if VOLUME_TAG in lv.tags or SNAPSHOT_TAG in lv.tags}


def write(where: str, kind: str, name: str, data: bytes, offset: int = 0) -> None:
    """Write `data` to file `name` on a mounted volume, or at `offset` of a block device."""
    if kind == "block":
        with open(where, "r+b") as f:
            f.seek(offset)
            f.write(data)
            os.fsync(f.fileno())
        return
    with open(os.path.join(where, name), "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


def read(where: str, kind: str, name: str, size: int, offset: int = 0) -> bytes | None:
    if kind == "block":
        fd = os.open(where, os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, size)
            os.preadv(fd, [buf], offset)
            return bytes(buf)
        finally:
            os.close(fd)
    path = os.path.join(where, name)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("kind", ["ext4", "xfs", "block"])
def test_write_snapshot_write_restore_clone(vg: str, tmp_path: Path, kind: str) -> None:
    backend = make_backend(vg, str(tmp_path))
    size = SIZES[kind]
    first, second, third = os.urandom(4 * MiB), os.urandom(4 * MiB), os.urandom(MiB)
    made: list[str] = []
    snap_id = f"snap-{kind}"
    try:
        created = backend.create_volume(f"src-{kind}", request("src", size, kind))
        made.append(f"src-{kind}")
        assert created.capacity_bytes == size
        assert created.context["csi-kit.io/lvm-type"] == "thin"
        src = volume(f"src-{kind}", created.capacity_bytes, kind)
        with staged(backend, src.volume_id, kind, str(tmp_path)) as where:
            src_blocks = os.statvfs(where).f_blocks if kind != "block" else 0
            write(where, kind, "a", first)
            # Snapshot of a staged (mounted) volume: lvcreate's suspend freezes it.
            snap = backend.create_snapshot(snap_id, src, {})
            assert snap.size_bytes == size and snap.ready_to_use
            write(where, kind, "a", second)
            write(where, kind, "b", third, offset=8 * MiB)
        snap_lv = lvm.get_lv(vg, backend.snapshot_lv(snap_id))
        assert snap_lv is not None and snap_lv.is_thin and not snap_lv.active  # held inactive (skip flag)
        assert snap_lv.tags == {SNAPSHOT_TAG}

        snapshot = Snapshot(snap_id, snap_id, src.volume_id, size, 0)
        restored = backend.restore_snapshot(f"restored-{kind}", request("restored", size, kind), snapshot)
        made.append(f"restored-{kind}")
        assert restored.capacity_bytes == size
        with staged(backend, f"restored-{kind}", kind, str(tmp_path)) as where:
            assert read(where, kind, "a", len(first)) == first
            if kind == "block":
                assert read(where, kind, "b", len(third), offset=8 * MiB) == bytes(len(third))
            else:
                assert read(where, kind, "b", len(third)) is None

        # A clone bigger than its source: the filesystem is grown at stage.
        clone_size = size + 64 * MiB
        cloned = backend.clone_volume(f"clone-{kind}", request("clone", clone_size, kind), src)
        made.append(f"clone-{kind}")
        assert cloned.capacity_bytes == clone_size
        clone_lv = lvm.get_lv(vg, backend.volume_lv(f"clone-{kind}"))
        assert clone_lv is not None and clone_lv.active and not clone_lv.skips_activation
        with staged(backend, f"clone-{kind}", kind, str(tmp_path)) as where:
            assert read(where, kind, "a", len(second)) == second
            assert read(where, kind, "b", len(third), offset=8 * MiB) == third
            if kind != "block":
                assert os.statvfs(where).f_blocks > src_blocks
            write(where, kind, "a", first[:MiB])  # the clone is independent of its source
        with staged(backend, src.volume_id, kind, str(tmp_path)) as where:
            assert read(where, kind, "a", len(second)) == second
    finally:
        for volume_id in reversed(made):
            backend.delete_volume(volume_id)
        backend.delete_snapshot(snap_id)
    assert owned(vg) == set()


def test_expand_online_ext4_and_block(vg: str, tmp_path: Path) -> None:
    backend = make_backend(vg, str(tmp_path))
    try:
        backend.create_volume("grow-fs", request("g", 64 * MiB))
        backend.create_volume("grow-raw", request("r", 32 * MiB, "block"))
        with staged(backend, "grow-fs", "ext4", str(tmp_path)) as where:
            result = backend.expand_volume(volume("grow-fs", 64 * MiB), 130 * MiB)
            assert result.capacity_bytes == 132 * MiB  # whole 4 MiB extents
            assert result.node_expansion_required
            device = backend.device_of("grow-fs")
            assert device is not None and blockfs.device_size(device) == 132 * MiB
            assert backend.node_expand("grow-fs", where, 132 * MiB, None) == 132 * MiB
            fs_bytes = os.statvfs(where).f_blocks * os.statvfs(where).f_frsize
            assert fs_bytes > 100 * MiB
        with staged(backend, "grow-raw", "block", str(tmp_path)) as device:
            result = backend.expand_volume(volume("grow-raw", 32 * MiB, "block"), 48 * MiB)
            assert result.capacity_bytes == 48 * MiB and not result.node_expansion_required
            assert blockfs.device_size(device) == 48 * MiB
    finally:
        backend.delete_volume("grow-fs")
        backend.delete_volume("grow-raw")
    assert owned(vg) == set()


def test_linear_volumes_and_their_limits(vg: str, tmp_path: Path) -> None:
    backend = make_backend(vg, str(tmp_path))
    vg_free = lvm.vg_info(vg).free
    assert backend.get_capacity({"type": "linear"}, ()) == vg_free
    with pytest.raises(ResourceExhausted, match=f"volume group {vg} has {vg_free} bytes free"):
        backend.create_volume("thick-huge", request("t", vg_free + 4 * MiB, type="linear"))
    try:
        created = backend.create_volume("thick", request("t", 32 * MiB, type="linear"))
        assert created.context["csi-kit.io/lvm-type"] == "linear"
        lv = lvm.get_lv(vg, backend.volume_lv("thick"))
        assert lv is not None and lv.segtype == "linear" and lv.tags == {VOLUME_TAG}
        assert lvm.vg_info(vg).free == vg_free - 32 * MiB
        thick = volume("thick", 32 * MiB, type="linear")
        with pytest.raises(
            FailedPrecondition, match=r"linear .thick. LV: only thin volumes can be snapshotted"
        ):
            backend.create_snapshot("thick-snap", thick, {})
        with pytest.raises(FailedPrecondition, match="only thin volumes can be cloned"):
            backend.clone_volume("thick-clone", request("c", 32 * MiB), thick)
        snapshot = Snapshot("nosnap", "nosnap", "x", 32 * MiB, 0)
        with pytest.raises(InvalidArgument, match="type=linear cannot hold a restore"):
            backend.restore_snapshot("thick-restore", request("r", 32 * MiB, type="linear"), snapshot)
        with pytest.raises(InvalidArgument, match="parameter type='striped'"):
            backend.create_volume("bad", request("b", 32 * MiB, type="striped"))
        with pytest.raises(InvalidArgument, match="not a configured thin pool"):
            backend.create_volume("bad", request("b", 32 * MiB, pool="elsewhere"))
        with staged(backend, "thick", "ext4", str(tmp_path)) as where:
            write(where, "ext4", "x", b"thick")
            assert backend.expand_volume(thick, 40 * MiB).capacity_bytes == 40 * MiB
            backend.node_expand("thick", where, 40 * MiB, None)
    finally:
        backend.delete_volume("thick")
    assert owned(vg) == set()
    assert lvm.vg_info(vg).free == vg_free


def test_full_pool_is_resource_exhausted_and_shows_in_the_condition(vg: str, tmp_path: Path) -> None:
    """A small second pool, filled by a volume: GetCapacity, CreateVolume, the volume condition."""
    lvm.create_thin_pool(vg, "small", 32 * MiB)
    try:
        backend = make_backend(vg, str(tmp_path), extra_pools="small", nearly_full_percent=80.0)
        assert backend.get_capacity({"pool": "small"}, ()) == 32 * MiB
        with pytest.raises(ResourceExhausted, match="33554432 bytes"):  # one volume may not exceed the offer
            backend.create_volume("filler", request("f", 36 * MiB, "block", pool="small"))
        backend.create_volume("filler", request("f", 32 * MiB, "block", pool="small"))
        filler = volume("filler", 32 * MiB, "block", pool="small")
        assert backend.volume_condition(filler).abnormal is False
        with staged(backend, "filler", "block", str(tmp_path)) as device:
            write(device, "block", "", os.urandom(28 * MiB))
        pool = lvm.thin_pool(vg, "small")
        assert pool.data_percent >= 85.0
        condition = backend.volume_condition(filler)
        assert condition.abnormal and f"thin pool {vg}/small is nearly full" in condition.message

        available = backend.get_capacity({"pool": "small"}, ())
        assert available == 32 * MiB - pool.used_bytes < 8 * MiB
        before = {lv.name for lv in lvm.list_lvs(vg)}
        with pytest.raises(ResourceExhausted, match=f"thin pool {vg}/small offers {available} bytes"):
            backend.create_volume("toobig", request("t", 16 * MiB, "block", pool="small"))
        with pytest.raises(ResourceExhausted):
            backend.expand_volume(filler, 128 * MiB)
        assert {lv.name for lv in lvm.list_lvs(vg)} == before  # nothing half-made
        # The default pool is unaffected; a ratio over-provisions it.
        doubled = make_backend(vg, str(tmp_path), overprovision_ratio=2.0)
        assert doubled.get_capacity({}, ()) == 2 * backend.get_capacity({}, ())
        backend.delete_volume("filler")
    finally:
        lvm.remove_lv(vg, "small")
    assert owned(vg) == set()


def test_a_failing_lvm_command_leaves_nothing_half_made(
    vg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``lvm`` that makes the LV and then fails (as a crash of lvcreate's
    last step would): the error carries lvm's message, the LV is removed."""
    real = lvm_binary()
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "lvm").write_text(
        "#!/bin/sh\n"
        f'{real} "$@"; rc=$?\n'
        'if [ "$1" = lvcreate ]; then echo "injected: lvcreate failed after the fact" >&2; exit 5; fi\n'
        "exit $rc\n"
    )
    (shim / "lvm").chmod(0o755)
    backend = make_backend(vg, str(tmp_path))
    backend.create_volume("source", request("s", 32 * MiB))
    try:
        monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
        with pytest.raises(CommandFailed, match="injected: lvcreate failed"):
            backend.create_volume("broken", request("b", 32 * MiB))
        with pytest.raises(CommandFailed, match="injected"):
            backend.create_snapshot("broken-snap", volume("source", 32 * MiB), {})
        with pytest.raises(CommandFailed, match="injected"):
            backend.clone_volume("broken-clone", request("c", 32 * MiB), volume("source", 32 * MiB))
        monkeypatch.undo()
        assert owned(vg) == {backend.volume_lv("source")}
    finally:
        monkeypatch.undo()
        backend.delete_volume("source")


def test_untagged_lvs_are_never_touched_and_orphans_are_found(vg: str, tmp_path: Path) -> None:
    backend = make_backend(vg, str(tmp_path))
    squatter = backend.volume_lv("squatted")  # an LV someone made by hand under a name we would use
    lvm.create_thin_lv(vg, "pool", squatter, 8 * MiB)
    lvm.create_thin_lv(vg, "pool", "someone-elses", 8 * MiB)
    try:
        with pytest.raises(FailedPrecondition, match="was not made by csi_kit"):
            backend.create_volume("squatted", request("s", 32 * MiB))
        with pytest.raises(FailedPrecondition, match="was not made by csi_kit"):
            backend.delete_volume("squatted")
        assert lvm.get_lv(vg, squatter) is not None

        backend.create_volume("orphan", request("o", 32 * MiB))  # made behind the driver's store
        backend.create_snapshot("orphan-snap", volume("orphan", 32 * MiB), {})
        inventory = backend.inventory()
        assert inventory.volume_ids == {"orphan"} and inventory.snapshot_ids == {"orphan-snap"}
        # A driver with a store of its own (a fresh one would refuse to start beside LVs it
        # would forget: csi_kit._core.statedir) reports the LVs it has no record of.
        Store(str(tmp_path / "state" / "state.db")).close()
        driver = Driver(
            DriverConfig(
                backend="lvm",
                backend_options={"volume_group": vg, "thin_pool": "pool"},
                driver_name="lvm.csi-kit.io",
                node_id="node-1",
                state_dir=str(tmp_path / "state"),
            )
        )
        report = driver.engine.reconcile()
        assert report.orphan_volumes == ("orphan",) and report.orphan_snapshots == ("orphan-snap",)
        assert {lv.name for lv in lvm.list_lvs(vg)} >= {
            squatter,
            "someone-elses",
            backend.volume_lv("orphan"),
        }
    finally:
        backend.delete_snapshot("orphan-snap")
        backend.delete_volume("orphan")
        lvm.remove_lv(vg, squatter)
        lvm.remove_lv(vg, "someone-elses")
    assert owned(vg) == set()


def test_missing_vg_or_pool_refuses_to_start(vg: str, tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="volume group 'csikitnosuchvg' does not exist"):
        make_backend("csikitnosuchvg", str(tmp_path))
    with pytest.raises(FailedPrecondition, match=f"thin pool {vg}/nosuchpool does not exist"):
        make_backend(vg, str(tmp_path), extra_pools="nosuchpool")
    with pytest.raises(InvalidArgument, match="needs volume_group"):
        LvmBackend(None, make_backend(vg, str(tmp_path)).context).start()
    state = tmp_path / "state"
    with pytest.raises(FailedPrecondition, match="does not exist"):
        Driver(
            DriverConfig(
                backend="lvm",
                backend_options={"volume_group": "csikitnosuchvg", "thin_pool": "pool"},
                endpoints=(f"unix://{state}/csi.sock",),
                state_dir=str(state),
            )
        )
    assert not (state / "csi.sock").exists()  # nothing served
    assert not (state / "state.db").exists()


def lvm_binary() -> str:
    for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        path = os.path.join(d, "lvm")
        if os.path.exists(path) and stat.S_IMODE(os.stat(path).st_mode) & 0o111:
            return path
    pytest.skip("no lvm binary")
