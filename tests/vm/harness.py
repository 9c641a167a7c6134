"""Run a command inside a qemu guest that has a fuller kernel than the host.

The machines csi_kit is developed and tested on run a kernel without
device-mapper and without quota support, so LVM thin provisioning and XFS
project quotas cannot be tested natively.  This runner boots a Debian cloud
kernel under qemu and runs one command there, e.g.::

    python tests/vm/harness.py -- sh -c 'lvm version'
    python tests/vm/harness.py --preselect -- .venv/bin/python -m pytest -m "vm or lvm" tests

``--preselect`` collects on the host and lets the guest import only the test
files that hold selected tests (Python is 20-50x slower under TCG).

How the guest sees the host: virtiofsd shares the host's ``/`` and the guest
mounts it read-only under a tmpfs overlay, so the checkout, its ``.venv``, the
Python prefix and every host tool (lvm, mkfs.*, xfs_quota, thin_check...) are
at the same absolute paths, writable inside the guest, and nothing written
there reaches the host.  A sparse scratch file is the guest's virtio disk for
LVM physical volumes; its device path is in ``$CSI_KIT_VM_DISK``.

The kernel package is fetched once with ``apt-get download`` into a cache
(``$CSI_KIT_VM_CACHE`` or /var/cache/csi-kit-vm) and reused; the initramfs (static
busybox, a handful of modules and ``init``) is cached by a hash of its
inputs.  The command's output streams to stdout; the exit status is the
command's, or 124 when the guest timed out, 125 when the harness or guest
failed before a result came back.

This file uses only the standard library and runs subprocesses directly:
it must work before csi_kit is installed, with any Python 3.11.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
INIT_SCRIPT = HERE / "init"
GUEST_AGENT = HERE / "guest_agent.py"

DEFAULT_CACHE = Path("/var/cache/csi-kit-vm")
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
BUSYBOX = Path("/bin/busybox")
FS_TAG = "hostroot"
DISK_SERIAL = "csi-kit-scratch"

# What stage 1 needs to reach the host root; stage 2 loads the rest from the
# full module tree (guest_agent.EAGER_MODULES).
BOOT_MODULES = ("virtio_pci", "virtio_blk", "virtiofs", "overlay", "qemu_fw_cfg")

# Host variables worth carrying into the guest; everything else is left out
# so the guest run does not depend on who started it.
PASSTHROUGH_ENV = ("PYTEST_ADDOPTS", "CI", "HYPOTHESIS_PROFILE")

TCG_CPU = "max"

EXIT_TIMEOUT = 124
EXIT_HARNESS = 125


class HarnessError(Exception):
    """The harness could not produce a result (as opposed to a failing command)."""


def say(msg: str) -> None:
    print(f"vm-harness: {msg}", file=sys.stderr, flush=True)


@dataclass
class Timings:
    phases: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - t0

    def summary(self) -> str:
        parts = []
        for name, secs in self.phases.items():
            note = f" ({self.notes[name]})" if name in self.notes else ""
            parts.append(f"{name} {secs:.1f}s{note}")
        return ", ".join(parts)


# --------------------------------------------------------------------------- cache


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Serialise cache fills between concurrent harness runs on one machine."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_checked(argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Kernel:
    version: str
    root: Path  # a tree with boot/vmlinuz-<version> and lib/modules/<version>

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.version


def resolve_kernel_package() -> str | None:
    """The versioned image package behind the metapackage, from local apt data."""
    pinned = os.environ.get("CSI_KIT_VM_KERNEL_PKG")
    if pinned:
        return pinned
    proc = subprocess.run(["apt-cache", "depends", KERNEL_METAPACKAGE], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\d\S*)", line)
        if m:
            return m.group(1)
    return None


def _version_key(version: str) -> list[tuple[int, str]]:
    """Natural order, so that 6.1.0-57 sorts after 6.1.0-9."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", version)]


def cached_kernels(cache: Path) -> list[Kernel]:
    """Complete unpacked kernels in the cache, oldest first."""
    kernels = cache / "kernels"
    found = [Kernel(p.name, p) for p in kernels.glob("*")] if kernels.is_dir() else []
    complete = [k for k in found if k.vmlinuz.is_file() and (k.modules_dir / "modules.dep").is_file()]
    return sorted(complete, key=lambda k: _version_key(k.version))


def fetch_kernel(cache: Path, timings: Timings, *, refresh: bool = False) -> Kernel:
    """Download and unpack the kernel package without installing it.

    The .deb carries no module index (its postinst would build one), hence
    ``depmod -b``.  The newest kernel already in the cache is used as is
    (asking apt costs seconds per run, and tests do not need the latest
    kernel); ``refresh`` asks apt for the current candidate and fetches it if
    it is new.  ``$CSI_KIT_VM_KERNEL_PKG`` pins a package.
    """
    with timings.phase("kernel"), cache_lock(cache):
        cached = cached_kernels(cache)
        pinned = os.environ.get("CSI_KIT_VM_KERNEL_PKG")
        if cached and not refresh and not pinned:
            timings.notes["kernel"] = f"cached {cached[-1].version}"
            return cached[-1]
        pkg = resolve_kernel_package()
        if pkg is None:
            if not cached:
                raise HarnessError(
                    f"apt does not know {KERNEL_METAPACKAGE} and the cache is empty: run apt-get update"
                )
            timings.notes["kernel"] = "cached, apt has no candidate"
            return cached[-1]
        version = pkg.removeprefix("linux-image-")
        kernels = cache / "kernels"
        kernel = Kernel(version, kernels / version)
        if kernel in cached:
            timings.notes["kernel"] = f"cached {version}"
            return kernel
        kernels.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=kernels, prefix=".fetch-") as tmp:
            run_checked(["apt-get", "download", pkg], cwd=tmp)
            debs = list(Path(tmp).glob("*.deb"))
            if len(debs) != 1:
                raise HarnessError(f"apt-get download {pkg} left {debs}")
            tree = Path(tmp) / "tree"
            run_checked(["dpkg-deb", "-x", str(debs[0]), str(tree)])
            run_checked(["depmod", "-b", str(tree), version])
            shutil.rmtree(kernel.root, ignore_errors=True)
            tree.rename(kernel.root)
        timings.notes["kernel"] = f"downloaded {pkg}"
        return kernel


# ----------------------------------------------------------------------- initramfs


def module_load_order(modules_dir: Path, wanted: Sequence[str]) -> list[Path]:
    """Module files for ``wanted`` and their dependencies, dependencies first.

    Built-in modules (modules.builtin) need nothing and are skipped.
    """
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[_module_name(path)] = (path, rest.split())
    builtin = {_module_name(p) for p in (modules_dir / "modules.builtin").read_text().split()}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in deps:
            if name in builtin:
                return
            raise HarnessError(f"kernel module {name} not found in {modules_dir}")
        path, requires = deps[name]
        for dep in requires:
            visit(_module_name(dep))
        order.append(modules_dir / path)

    for name in wanted:
        visit(name.replace("-", "_"))
    return order


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    return base.split(".ko", 1)[0].replace("-", "_")


def _read_module(path: Path) -> bytes:
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko"):
        return path.read_bytes()
    raise HarnessError(f"cannot unpack module {path} (only .ko and .ko.xz are supported)")


class Cpio:
    """A minimal writer for the "newc" cpio format the kernel unpacks.

    Written by hand rather than through cpio(1) so the archive can carry
    device nodes (the kernel opens /dev/console before init runs) without
    creating them on the host, and so the harness needs one tool fewer.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.ino += 1
        self.buf += b"070701" + b"".join(b"%08x" % v for v in fields) + encoded
        self.buf += b"\0" * (-len(self.buf) % 4)
        self.buf += data
        self.buf += b"\0" * (-len(self.buf) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.buf)


def build_initramfs(cache: Path, kernel: Kernel, timings: Timings) -> Path:
    """Busybox, ``init`` and the boot modules, cached by a hash of all of them."""
    with timings.phase("initramfs"), cache_lock(cache):
        modules = module_load_order(kernel.modules_dir, BOOT_MODULES)
        busybox = BUSYBOX.read_bytes()
        init = INIT_SCRIPT.read_bytes()
        h = hashlib.sha256()
        h.update(kernel.version.encode())
        for part in (busybox, init, *(_read_module(m) for m in modules)):
            h.update(hashlib.sha256(part).digest())
        out = cache / f"initramfs-{kernel.version}-{h.hexdigest()[:16]}.cpio.gz"
        if out.is_file():
            timings.notes["initramfs"] = "cached"
            return out

        applets = run_checked([str(BUSYBOX), "--list"]).stdout.split()
        archive = Cpio()
        for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp"):
            archive.dir(d)
        archive.chardev("dev/console", 5, 1)
        archive.chardev("dev/null", 1, 3)
        archive.file("bin/busybox", busybox, 0o755)
        for applet in applets:
            if applet != "busybox":
                archive.symlink(f"bin/{applet}", "busybox")
        names = []
        for m in modules:
            name = _module_name(m.name) + ".ko"
            archive.file(f"lib/modules/{name}", _read_module(m))
            names.append(name)
        archive.file("etc/boot-modules", ("\n".join(names) + "\n").encode())
        archive.file("init", init, 0o755)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(archive.finish(), compresslevel=1))
        tmp.rename(out)
        for old in cache.glob("initramfs-*.cpio.gz"):
            if old != out:
                old.unlink(missing_ok=True)
        timings.notes["initramfs"] = "built"
        return out


# ------------------------------------------------------------------------- running


def kvm_usable() -> bool:
    """KVM needs both the device and hardware virtualisation in this CPU.

    On nested machines without vmx/svm, /dev/kvm can exist and still fail at
    the first instruction qemu has to emulate, so the flag check matters.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return re.search(r"\b(vmx|svm)\b", flags) is not None


@dataclass
class VMConfig:
    argv: list[str]
    mem_mb: int = 2048
    smp: int = 2
    timeout: float = 900.0
    disk_gb: int = 8
    accel: str = "auto"
    cache: Path = DEFAULT_CACHE
    cwd: Path = CHECKOUT
    env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable
    cpu: str | None = None
    kernel_args: list[str] = field(default_factory=list)
    refresh_kernel: bool = False


def guest_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "COLUMNS": str(shutil.get_terminal_size().columns),
        "CSI_KIT_IN_VM": "1",
        "LVM_SUPPRESS_FD_WARNINGS": "1",
    }
    for name in PASSTHROUGH_ENV:
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra)
    return env


def _check_path_for_cmdline(path: str) -> str:
    if not path.startswith("/") or any(c.isspace() for c in path):
        raise HarnessError(
            f"{path!r} must be absolute and without whitespace: it goes on the kernel command line"
        )
    return path


def start_virtiofsd(workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Share the host's ``/`` with the guest.

    ``sandbox=chroot``: the default namespace sandbox pivots into the shared
    directory, which fails with EBUSY when that directory is ``/``.  This
    virtiofsd has no read-only switch; the guest mounts the share read-only
    and writes only to its tmpfs overlay (``init``).
    """
    if not VIRTIOFSD.is_file():
        raise HarnessError(f"{VIRTIOFSD} is missing (Debian package qemu-system-common)")
    sock = workdir / "virtiofs.sock"
    with open(workdir / "virtiofsd.log", "wb") as log:
        proc = subprocess.Popen(
            [
                str(VIRTIOFSD),
                f"--socket-path={sock}",
                "-o",
                "source=/",
                "-o",
                "cache=always",
                "-o",
                "sandbox=chroot",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    # virtiofsd creates the socket when it is ready to accept qemu.
    for _ in range(200):
        if sock.exists():
            return proc, sock
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    text = (workdir / "virtiofsd.log").read_text(errors="replace")
    raise HarnessError(f"virtiofsd did not start: {text.strip()}")


def qemu_argv(cfg: VMConfig, kernel: Kernel, initrd: Path, sock: Path, job: Path, disk: Path) -> list[str]:
    accel = cfg.accel
    if accel == "auto":
        accel = "kvm" if kvm_usable() else "tcg"
    accel_args = (
        ["-accel", "kvm", "-cpu", cfg.cpu or "host"]
        if accel == "kvm"
        else [
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            cfg.cpu or TCG_CPU,
        ]
    )
    cmdline = " ".join(
        [
            "console=ttyS0",
            "panic=-1",
            "quiet",
            "loglevel=3",
            "rdinit=/init",
            *cfg.kernel_args,
            f"csi_kit.python={_check_path_for_cmdline(cfg.python)}",
            f"csi_kit.agent={_check_path_for_cmdline(str(GUEST_AGENT))}",
        ]
    )
    return [
        "qemu-system-x86_64",
        *accel_args,
        "-M",
        "q35",
        "-smp",
        str(cfg.smp),
        "-m",
        f"{cfg.mem_mb}M",
        # vhost-user (virtiofsd) needs guest RAM it can map: a shared memfd.
        "-object",
        f"memory-backend-memfd,id=mem,size={cfg.mem_mb}M,share=on",
        "-numa",
        "node,memdev=mem",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        str(kernel.vmlinuz),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
        "-chardev",
        f"socket,id=vfs,path={sock}",
        "-device",
        f"vhost-user-fs-pci,chardev=vfs,tag={FS_TAG}",
        "-fw_cfg",
        f"name=opt/csi-kit/job,file={job}",
        "-drive",
        f"file={disk},if=none,id=scratch,format=raw,cache=unsafe,discard=unmap",
        "-device",
        f"virtio-blk-pci,drive=scratch,serial={DISK_SERIAL}",
    ]


SELECT_PLUGIN = "csi_kit_vm_select"
# Plugins whose import costs the guest a minute or more under TCG and that a
# VM test does not need: anyio's (the project's async tests use
# pytest-asyncio) and Hypothesis' (only reporting; @given works without it).
GUEST_PYTEST_OFF = ("-p", "no:anyio", "-p", "no:hypothesispytest", "-p", "no:cacheprovider")
EXIT_NO_TESTS = 5  # pytest's own code for "nothing collected"


def preselect(cfg: VMConfig, timings: Timings) -> VMConfig | None:
    """Collect on the host; return a config whose guest pytest imports only the chosen files.

    ``cfg.argv`` must be ``PYTHON -m pytest ARGS``; the guest runs the same
    ARGS with :mod:`csi_kit_vm_select` restricting collection.  None means the
    selection is empty.
    """
    argv = cfg.argv
    if argv[1:3] != ["-m", "pytest"]:
        raise HarnessError("--preselect needs the command in the form: PYTHON -m pytest [ARGS...]")
    pythonpath = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    with timings.phase("host collection"), tempfile.TemporaryDirectory(prefix="csi-kit-vm-sel-") as tmp:
        out = Path(tmp) / "selection.json"
        env = {**os.environ, "PYTHONPATH": pythonpath, "CSI_KIT_VM_SELECT_OUT": str(out)}
        host = [
            *argv[:3],
            "-p",
            SELECT_PLUGIN,
            "-p",
            "no:cacheprovider",
            "--collect-only",
            "-q",
            "--continue-on-collection-errors",
            *argv[3:],
        ]
        proc = subprocess.run(host, cwd=cfg.cwd, env=env, capture_output=True, text=True)
        if not out.is_file():
            raise HarnessError(f"host collection failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        selection = json.loads(out.read_text())
    files: list[str] = selection["files"]
    say(f"preselected {selection['count']} tests in {len(files)} files on the host")
    if not files:
        return None
    env = {**cfg.env, "PYTHONPATH": str(HERE), "CSI_KIT_VM_ONLY_FILES": os.pathsep.join(files)}
    guest_argv = [*argv[:3], "-p", SELECT_PLUGIN, *GUEST_PYTEST_OFF, *argv[3:]]
    return dataclasses.replace(cfg, argv=guest_argv, env=env)


def run_vm(cfg: VMConfig, timings: Timings | None = None, *, preselect_tests: bool = False) -> int:
    """Boot the guest, run ``cfg.argv`` in it, return its exit status."""
    timings = timings if timings is not None else Timings()
    t_start = time.monotonic()
    try:
        if preselect_tests:
            selected = preselect(cfg, timings)
            if selected is None:
                say("no tests selected: not booting the guest")
                return EXIT_NO_TESTS
            cfg = selected
        kernel = fetch_kernel(cfg.cache, timings, refresh=cfg.refresh_kernel)
        initrd = build_initramfs(cfg.cache, kernel, timings)
        return _boot_and_run(cfg, kernel, initrd, timings)
    except HarnessError as e:
        say(f"ERROR: {e}")
        return EXIT_HARNESS
    finally:
        timings.phases["total"] = time.monotonic() - t_start
        say(f"timings: {timings.summary()}")


def _boot_and_run(cfg: VMConfig, kernel: Kernel, initrd: Path, timings: Timings) -> int:
    nonce = secrets.token_hex(8)
    marker = re.compile(rf"csi-kit-vm: {nonce} (agent-start|cmd-start|rc=(-?\d+))")
    with tempfile.TemporaryDirectory(prefix="csi-kit-vm-") as tmp:
        workdir = Path(tmp)
        job = workdir / "job.json"
        job.write_text(
            json.dumps(
                {
                    "argv": cfg.argv,
                    "cwd": str(cfg.cwd),
                    "env": guest_env(cfg.env),
                    "nonce": nonce,
                    "kver": kernel.version,
                    "modules_dir": str(kernel.modules_dir),
                    "disk_serial": DISK_SERIAL,
                }
            )
        )
        disk = workdir / "scratch.img"
        with open(disk, "wb") as f:
            f.truncate(cfg.disk_gb << 30)  # sparse: costs only what the guest writes

        vfs, sock = start_virtiofsd(workdir)
        try:
            argv = [
                "timeout",
                "--kill-after=10",
                f"{cfg.timeout:.0f}",
                *qemu_argv(cfg, kernel, initrd, sock, job, disk),
            ]
            return _stream(argv, marker, timings)
        finally:
            if vfs.poll() is None:
                vfs.terminate()
                try:
                    vfs.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    vfs.kill()
                    vfs.wait()


def _stream(argv: list[str], marker: re.Pattern[str], timings: Timings) -> int:
    """Relay the guest console to stdout; pick the harness markers out of it."""
    t0 = time.monotonic()
    out = sys.stdout.buffer
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        rc = _relay(proc, marker, timings, t0, out)
    except BaseException:
        # Interrupted (^C, a failing write to stdout): take qemu down with us.
        # SIGTERM to timeout(1) is passed on to qemu.
        proc.terminate()
        proc.wait()
        raise
    qrc = proc.wait()
    if rc is not None:
        return rc
    if qrc == EXIT_TIMEOUT:
        say("ERROR: the guest timed out (see --timeout); no result")
        return EXIT_TIMEOUT
    say(f"ERROR: the guest stopped without a result (qemu exit status {qrc}: panic or crash?)")
    return EXIT_HARNESS


def _relay(
    proc: subprocess.Popen[bytes], marker: re.Pattern[str], timings: Timings, t0: float, out: BinaryIO
) -> int | None:
    assert proc.stdout is not None
    t_cmd: float | None = None
    rc: int | None = None
    for raw in proc.stdout:
        line = raw.replace(b"\r", b"")
        m = marker.search(line.decode(errors="replace"))
        if m is None:
            out.write(line)
            out.flush()
            continue
        now = time.monotonic()
        if m.group(1) == "agent-start":
            timings.phases["boot"] = now - t0
        elif m.group(1) == "cmd-start":
            timings.phases["guest setup"] = now - t0 - timings.phases.get("boot", 0.0)
            t_cmd = now
        else:
            rc = int(m.group(2))
            if t_cmd is not None:
                timings.phases["command"] = now - t_cmd
            t_cmd = now
    proc.wait()
    if t_cmd is not None and rc is not None:
        timings.phases["shutdown"] = time.monotonic() - t_cmd
    return rc


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> tuple[VMConfig, bool]:
    p = argparse.ArgumentParser(
        description="Run a command inside a qemu guest with a device-mapper/quota kernel.",
        usage="%(prog)s [options] -- CMD [ARGS...]",
    )
    p.add_argument("--mem", type=int, default=2048, metavar="MB", help="guest RAM (default 2048)")
    p.add_argument("--smp", type=int, default=min(2, os.cpu_count() or 1), help="guest CPUs")
    p.add_argument("--timeout", type=float, default=900.0, metavar="S", help="whole-run limit (default 900)")
    p.add_argument("--disk-gb", type=int, default=8, metavar="N", help="sparse scratch disk size (default 8)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--cpu", help=f"qemu CPU model (default: host with KVM, {TCG_CPU} with TCG)")
    p.add_argument("--append", action="append", default=[], metavar="ARG", help="extra kernel argument")
    p.add_argument(
        "--preselect",
        action="store_true",
        help="CMD is PYTHON -m pytest ARGS: collect on the host, import only the selected files in the guest",
    )
    p.add_argument(
        "--refresh-kernel", action="store_true", help="ask apt for a newer kernel than the cached one"
    )
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra guest env")
    p.add_argument("--cwd", type=Path, default=CHECKOUT, help="guest cwd (default: the checkout)")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    cmd = ns.cmd[1:] if ns.cmd[:1] == ["--"] else ns.cmd
    if not cmd:
        p.error("no command given (usage: harness.py [options] -- CMD [ARGS...])")
    env = {}
    for item in ns.env:
        name, sep, value = item.partition("=")
        if not sep:
            p.error(f"--env wants NAME=VALUE, got {item!r}")
        env[name] = value
    cache = Path(os.environ.get("CSI_KIT_VM_CACHE", DEFAULT_CACHE))
    cfg = VMConfig(
        argv=cmd,
        mem_mb=ns.mem,
        smp=ns.smp,
        timeout=ns.timeout,
        disk_gb=ns.disk_gb,
        accel=ns.accel,
        cpu=ns.cpu,
        kernel_args=ns.append,
        refresh_kernel=ns.refresh_kernel,
        cache=cache,
        cwd=ns.cwd.resolve(),
        env=env,
    )
    return cfg, ns.preselect


def unwind_on_sigterm() -> None:
    """Make SIGTERM and SIGHUP (a CI timeout, a kill, a closed terminal) unwind like ^C,
    so that qemu and virtiofsd go down with the harness instead of running on."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)


def main(argv: Sequence[str] | None = None) -> int:
    unwind_on_sigterm()
    cfg, preselect_tests = parse_args(sys.argv[1:] if argv is None else argv)
    return run_vm(cfg, preselect_tests=preselect_tests)


if __name__ == "__main__":
    sys.exit(main())
