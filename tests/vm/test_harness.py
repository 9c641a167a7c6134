"""The harness's own logic, on the host: cpio archive, module order, result markers, selection.

The end-to-end boot is exercised by every harness run (and by
``test_guest_exit_status_and_readonly_host``, marked slow).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import pytest

NONCE = "0123456789abcdef"
MARKER = re.compile(rf"csi-kit-vm: {NONCE} (agent-start|cmd-start|rc=(-?\d+))")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) is needed to read the archive back")
def test_cpio_archive_reads_back_with_cpio(tmp_path: Path) -> None:
    a = harness.Cpio()
    a.dir("dev")
    a.chardev("dev/console", 5, 1)
    a.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    a.symlink("sh", "busybox")
    a.file("odd", b"x" * 5)  # a size that needs padding
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=a.finish(), capture_output=True, check=True
    ).stdout.decode()
    lines = {
        line.split()[-1] if "->" not in line else line.split()[-3]: line for line in listing.splitlines()
    }
    assert set(lines) == {"dev", "dev/console", "init", "sh", "odd"}
    assert lines["dev/console"].startswith("crw")
    assert lines["init"].startswith("-rwxr-xr-x")
    assert lines["sh"].startswith("lrwx") and lines["sh"].endswith("-> busybox")
    subprocess.run(["cpio", "-id", "--quiet"], input=a.finish(), cwd=tmp_path, check=True)
    assert (tmp_path / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko\n"
        "kernel/fs/fuse/fuse.ko:\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/md/dm-thin-pool.ko: kernel/drivers/md/dm-mod.ko\n"
        "kernel/drivers/md/dm-mod.ko:\n"
    )
    (tmp_path / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    order = harness.module_load_order(tmp_path, ["ext4", "dm_thin_pool", "virtiofs", "fuse"])
    names = [p.name for p in order]
    assert names == ["dm-mod.ko", "dm-thin-pool.ko", "virtio_ring.ko", "fuse.ko", "virtiofs.ko"]
    with pytest.raises(harness.HarnessError, match="not found"):
        harness.module_load_order(tmp_path, ["nosuchmod"])


def stream(script: str) -> tuple[int, harness.Timings]:
    timings = harness.Timings()
    return harness._stream(["sh", "-c", script], MARKER, timings), timings


def test_result_comes_from_the_nonce_marker_only(capfd: pytest.CaptureFixture[str]) -> None:
    rc, timings = stream(
        f"echo 'csi-kit-vm: {NONCE} agent-start'; echo 'csi-kit-vm: {NONCE} cmd-start';"
        "echo 'csi-kit-vm: ffffffffffffffff rc=0'; printf 'out\\r\\n';"
        f"echo 'csi-kit-vm: {NONCE} rc=3'; exit 0"
    )
    assert rc == 3
    out = capfd.readouterr().out
    assert "out\n" in out and "\r" not in out
    assert "ffffffffffffffff rc=0" in out  # a forged marker is just output
    assert f"{NONCE} rc=3" not in out
    assert {"boot", "command", "shutdown"} <= set(timings.phases)


def test_no_marker_is_a_harness_failure_and_timeout_is_124() -> None:
    assert stream("echo 'Kernel panic'; exit 1")[0] == harness.EXIT_HARNESS
    assert stream("exit 124")[0] == harness.EXIT_TIMEOUT


def test_a_terminated_harness_takes_its_child_down(tmp_path: Path) -> None:
    """SIGTERM to the harness while the guest runs: the guest (here a sleep) does not outlive it."""
    pidfile = tmp_path / "child.pid"
    script = (
        "import re, sys\n"
        f"sys.path.insert(0, {str(Path(harness.__file__).parent)!r})\n"
        "import harness\n"
        "harness.unwind_on_sigterm()\n"
        f"guest = ['sh', '-c', 'echo $$ > {pidfile}; exec sleep 60']\n"
        "harness._stream(guest, re.compile('x'), harness.Timings())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.05)
        child = int(pidfile.read_text())
        proc.terminate()
        assert proc.wait(timeout=30) == 128 + 15
        assert (
            not os.path.exists(f"/proc/{child}") or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
        )
    finally:
        proc.kill()
        proc.wait()


def test_guest_env_is_clean_and_carries_the_vm_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "x")
    monkeypatch.setenv("PYTEST_ADDOPTS", "-x")
    env = harness.guest_env({"EXTRA": "1"})
    assert env["CSI_KIT_IN_VM"] == "1" and env["EXTRA"] == "1" and env["PYTEST_ADDOPTS"] == "-x"
    assert "SECRET_TOKEN" not in env


def test_parse_args() -> None:
    cfg, pre = harness.parse_args(["--mem", "1024", "--env", "A=b", "--preselect", "--", "sh", "-c", "x"])
    assert cfg.argv == ["sh", "-c", "x"] and cfg.mem_mb == 1024 and cfg.env == {"A": "b"} and pre
    with pytest.raises(SystemExit):
        harness.parse_args(["--"])


def test_preselect_records_selected_and_broken_files(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text(
        "import pytest\n@pytest.mark.lvm\ndef test_x(): pass\ndef test_y(): pass\n"
    )
    (tmp_path / "test_b.py").write_text("def test_z(): pass\n")
    (tmp_path / "test_broken.py").write_text("import nosuchmodule_xyz\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    lvm: x\n")
    cfg = harness.VMConfig(argv=[sys.executable, "-m", "pytest", "-m", "lvm", str(tmp_path)], cwd=tmp_path)
    selected = harness.preselect(cfg, harness.Timings())
    assert selected is not None
    files = selected.env["CSI_KIT_VM_ONLY_FILES"].split(os.pathsep)
    assert sorted(Path(f).name for f in files) == ["test_a.py", "test_broken.py"]
    assert selected.argv[3:5] == ["-p", harness.SELECT_PLUGIN]

    # The guest side: the same args with the restriction collect only those files.
    env = {**os.environ, "PYTHONPATH": str(harness.HERE), "CSI_KIT_VM_ONLY_FILES": os.pathsep.join(files)}
    proc = subprocess.run(
        [*selected.argv, "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert "test_a.py::test_x" in proc.stdout
    assert "test_b.py" not in proc.stdout
    assert "test_broken.py" in proc.stdout  # its import error still shows


def test_nothing_selected_means_no_boot(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text("def test_y(): pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    lvm: x\n")
    cfg = harness.VMConfig(argv=[sys.executable, "-m", "pytest", "-m", "lvm", str(tmp_path)], cwd=tmp_path)
    assert harness.preselect(cfg, harness.Timings()) is None


@pytest.mark.slow
@pytest.mark.privileged
@pytest.mark.skipif(
    os.environ.get("CSI_KIT_IN_VM") == "1" or shutil.which("qemu-system-x86_64") is None,
    reason="needs qemu on the host (and not already inside the guest)",
)
def test_guest_exit_status_and_readonly_host() -> None:
    cache = Path(os.environ.get("CSI_KIT_VM_CACHE", harness.DEFAULT_CACHE))
    cache.mkdir(parents=True, exist_ok=True)
    # Not under /tmp: the guest has its own tmpfs there and would not see it.
    with tempfile.TemporaryDirectory(dir=cache, prefix="probe-") as tmp:
        probe = Path(tmp) / "written-by-guest"
        script = (
            f'test -d {tmp} && echo x > {probe} && test -s {probe} && test -b "$CSI_KIT_VM_DISK" && exit 7'
        )
        cfg = harness.VMConfig(argv=["sh", "-c", script], timeout=600, cache=cache)
        assert harness.run_vm(cfg) == 7
        assert not probe.exists()  # the guest wrote to its overlay, not to the host


def test_newest_complete_cached_kernel_is_used_without_apt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for version, complete in (
        ("6.1.0-9-cloud-amd64", True),
        ("6.1.0-57-cloud-amd64", True),
        ("6.1.0-99-x", False),
    ):
        root = tmp_path / "kernels" / version
        (root / "boot").mkdir(parents=True)
        (root / "lib" / "modules" / version).mkdir(parents=True)
        (root / "boot" / f"vmlinuz-{version}").write_bytes(b"k")
        if complete:
            (root / "lib" / "modules" / version / "modules.dep").write_text("")
    monkeypatch.delenv("CSI_KIT_VM_KERNEL_PKG", raising=False)
    monkeypatch.setattr(harness, "resolve_kernel_package", lambda: pytest.fail("apt was asked"))
    kernel = harness.fetch_kernel(tmp_path, harness.Timings())
    assert kernel.version == "6.1.0-57-cloud-amd64"
    assert kernel.vmlinuz == tmp_path / "kernels" / kernel.version / "boot" / "vmlinuz-6.1.0-57-cloud-amd64"
