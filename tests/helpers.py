"""Shared helpers for the core tests: a CSI client over the real unix socket,
request builders, short state directories, and backends whose calls a test
can hold inside the backend.

Run as a script (``python tests/helpers.py STATE_DIR GATE_DIR [--log-level L] [--durability D]``)
it serves a hostPath driver whose CreateVolume and CreateSnapshot stop inside
the backend until a line is written to a FIFO in GATE_DIR: the crash and drain tests
use it to act on a driver *process* at a known moment, without sleeping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit.backend import BackendContext
from csi_kit.types import CreatedSnapshot, CreatedVolume, Volume, VolumeRequest
from csi_kit_backends.hostpath.backend import HostPathBackend, HostPathConfig

HERE = os.path.abspath(__file__)
GiB = 1 << 30
MiB = 1 << 20

# -- requests ------------------------------------------------------------------------


def mount_cap(mode: int = 1, fs_type: str = "", flags: tuple[str, ...] = ()) -> Any:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),
    )


def block_cap(mode: int = 1) -> Any:
    return pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(), access_mode=pb.VolumeCapability.AccessMode(mode=mode)
    )


def create_req(
    name: str,
    *,
    required: int = 0,
    limit: int = 0,
    caps: list[Any] | None = None,
    params: Mapping[str, str] | None = None,
    snapshot: str = "",
    volume: str = "",
    **kw: Any,
) -> Any:
    req = pb.CreateVolumeRequest(
        name=name,
        volume_capabilities=caps if caps is not None else [mount_cap()],
        parameters=params or {},
        **kw,
    )
    if required or limit:
        req.capacity_range.required_bytes = required
        req.capacity_range.limit_bytes = limit
    if snapshot:
        req.volume_content_source.snapshot.snapshot_id = snapshot
    if volume:
        req.volume_content_source.volume.volume_id = volume
    return req


# -- client ----------------------------------------------------------------------------


class Csi:
    """Stubs for every CSI service plus gRPC health, over one channel."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.channel = grpc.insecure_channel(endpoint)
        self.identity = pbg.IdentityStub(self.channel)
        self.controller = pbg.ControllerStub(self.channel)
        self.node = pbg.NodeStub(self.channel)
        self.group = pbg.GroupControllerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Csi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the calls most tests make
    def create(self, name: str, **kw: Any) -> Any:
        return self.controller.CreateVolume(create_req(name, **kw), timeout=30).volume

    def delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=30)

    def snapshot(self, name: str, source_volume_id: str) -> Any:
        req = pb.CreateSnapshotRequest(name=name, source_volume_id=source_volume_id)
        return self.controller.CreateSnapshot(req, timeout=30).snapshot

    def list_volume_ids(self, page: int = 0) -> list[str]:
        ids: list[str] = []
        token = ""
        while True:
            resp = self.controller.ListVolumes(
                pb.ListVolumesRequest(max_entries=page, starting_token=token), timeout=30
            )
            ids += [e.volume.volume_id for e in resp.entries]
            token = resp.next_token
            if not token:
                return ids

    def list_snapshot_ids(self, page: int = 0) -> list[str]:
        ids: list[str] = []
        token = ""
        while True:
            resp = self.controller.ListSnapshots(
                pb.ListSnapshotsRequest(max_entries=page, starting_token=token), timeout=30
            )
            ids += [e.snapshot.snapshot_id for e in resp.entries]
            token = resp.next_token
            if not token:
                return ids

    def serving(self) -> int:
        return int(self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status)


def rpc_error(call: Callable[..., Any], request: Any, **kw: Any) -> grpc.RpcError:
    """Make a call that must fail; return its error."""
    try:
        call(request, timeout=kw.pop("timeout", 30), **kw)
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"{request.DESCRIPTOR.name} succeeded; an error was expected")


def expect(code: grpc.StatusCode, call: Callable[..., Any], request: Any, *words: str) -> str:
    """Assert a call fails with ``code`` and a message holding every one of ``words``."""
    err = rpc_error(call, request)
    assert err.code() == code, f"{err.code()}: {err.details()}"
    details = err.details() or ""
    for word in words:
        assert word in details, f"{word!r} not in {details!r}"
    return details


# -- directories -------------------------------------------------------------------------


@contextlib.contextmanager
def short_dir(prefix: str = "ck-") -> Iterator[str]:
    """A fresh directory with a short path (unix socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tree(path: str) -> dict[str, tuple[int, int]]:
    """Every entry below ``path`` with its (mode, size): a fingerprint to compare before/after."""
    out: dict[str, tuple[int, int]] = {}
    for base, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(base, name)
            st = os.lstat(full)
            out[os.path.relpath(full, path)] = (st.st_mode, st.st_size if not os.path.isdir(full) else 0)
    return out


# -- backends a test can hold ---------------------------------------------------------------


class Gate:
    """Holds backend calls until released; tells the test when a call is inside."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()
        self.ids: list[str] = []

    def hold(self, object_id: str) -> None:
        self.ids.append(object_id)
        self.entered.set()
        if not self.release.wait(60):
            raise TimeoutError("the test never released the gate")

    def open(self) -> None:
        self.release.set()


class GatedHostPath(HostPathBackend):
    """hostPath whose CreateVolume waits on ``gate`` between making the directory
    and naming it (the middle of the backend's work); other volumes pass unless
    their name is in ``gated_names`` (empty: gate every one)."""

    def __init__(
        self,
        state_dir: str,
        gate: Gate,
        *,
        gated_names: frozenset[str] = frozenset(),
        node_id: str = "node-1",
    ) -> None:
        super().__init__(HostPathConfig(), BackendContext("hostpath.csi-kit.io", node_id, state_dir))
        self.gate = gate
        self.gated_names = gated_names
        self.made: list[str] = []

    def create_volume(self, volume_id: str, request: VolumeRequest) -> CreatedVolume:
        if self.gated_names and request.name not in self.gated_names:
            return super().create_volume(volume_id, request)
        self.gate.hold(volume_id)
        made = super().create_volume(volume_id, request)
        self.made.append(volume_id)
        self.gate.returned.set()
        return made


# -- a driver process held inside the backend -------------------------------------------------


class _FifoGated(HostPathBackend):
    """hostPath whose CreateVolume and CreateSnapshot block inside the backend
    until a line is written to the FIFO ``GATE_DIR/volume`` or
    ``GATE_DIR/snapshot`` (GATE_DIR from CSI_KIT_TEST_GATE).  A test opening
    the FIFO for writing (non-blocking, retried) succeeds once a call is inside."""

    def _wait(self, kind: str) -> None:
        with open(os.path.join(os.environ["CSI_KIT_TEST_GATE"], kind), "rb") as f:
            f.readline()

    def _place(self, staged: str, volume_id: str, capacity_bytes: int, *, recursive: bool) -> CreatedVolume:
        self._wait("volume")  # the directory exists in .incoming; the row says 'creating'
        return super()._place(staged, volume_id, capacity_bytes, recursive=recursive)

    def create_snapshot(
        self, snapshot_id: str, source: Volume, parameters: Mapping[str, str]
    ) -> CreatedSnapshot:
        staged = self._incoming("snap", snapshot_id)
        os.mkdir(staged)
        self._wait("snapshot")
        os.rmdir(staged)
        return super().create_snapshot(snapshot_id, source, parameters)


def make_gates(gate_dir: str) -> None:
    os.makedirs(gate_dir, exist_ok=True)
    for kind in ("volume", "snapshot"):
        os.mkfifo(os.path.join(gate_dir, kind))


def enter_gate(gate_dir: str, kind: str, attempts: int = 1200) -> int:
    """Wait until a call is blocked inside the backend at ``kind``; return the
    FIFO's write end (write a line to let the call go on, or keep it open)."""
    import errno
    import time

    path = os.path.join(gate_dir, kind)
    for _ in range(attempts):
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        time.sleep(0.025)
    raise TimeoutError(f"no call reached the {kind} gate")


def pass_gate(gate_dir: str, kind: str) -> None:
    fd = enter_gate(gate_dir, kind)
    try:
        os.write(fd, b"go\n")
    finally:
        os.close(fd)


def gated_process_argv(state_dir: str, gate_dir: str, *extra: str) -> list[str]:
    return [sys.executable, HERE, state_dir, gate_dir, *extra]


def _serve_gated(argv: list[str]) -> int:
    import asyncio

    from csi_kit.driver import Driver, DriverConfig
    from csi_kit.log import setup_logging

    state_dir, gate_dir, *rest = argv
    os.environ["CSI_KIT_TEST_GATE"] = gate_dir
    level = rest[rest.index("--log-level") + 1] if "--log-level" in rest else "info"
    durability = rest[rest.index("--durability") + 1] if "--durability" in rest else "power"
    setup_logging(level)
    config = DriverConfig(
        endpoints=(f"unix://{os.path.join(state_dir, 'csi.sock')}",),
        state_dir=state_dir,
        node_id="node-1",
        drain_seconds=30.0,
        durability=durability,  # type: ignore[arg-type]
    )
    backend = _FifoGated(HostPathConfig(), BackendContext(config.driver_name, config.node_id, state_dir))
    asyncio.run(Driver(config, backend=backend).serve_until_signalled())
    return 0


if __name__ == "__main__":
    raise SystemExit(_serve_gated(sys.argv[1:]))
