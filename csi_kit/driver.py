"""A CSI driver process: backend + store + engine + gRPC server, started and stopped.

This is the public way to serve a backend from Python::

    import csi_kit
    config = csi_kit.DriverConfig(backend="hostpath", endpoint="unix:///run/csi/csi.sock",
                                  driver_name="hostpath.example.io", node_id="node-1")
    csi_kit.run_driver(config)          # blocks until SIGTERM / SIGINT

or, with a backend object you built yourself, ``Driver(config, backend=MyBackend(...))``.

Start-up is ordered so that nothing is touched before it is safe, and every
ordinary mistake is one `StartupError`-like line (a `csi_kit.errors.CSIError`),
never a traceback:

1. the configuration is checked (backend name and options, endpoints,
   metrics address) — nothing touched yet;
2. the state directory's lock is taken (`csi_kit._core.statedir`): a second
   driver on the same directory stops here, before it can disturb the live one;
3. the metrics port is bound; the store is opened, refused at once if it is
   unreadable; the backend is built and started; a missing or empty store
   is refused if the backend holds objects, made anew otherwise (recovery:
   `rebuild_store`, ``csi-kit store rebuild``);
4. `Driver.start` reconciles the store with the backend and binds the sockets.

``DriverConfig.durability`` is the operator's choice of what an acknowledged
change survives: ``power`` (the default: flushed to the disk before the
answer) or ``process`` (a killed driver, not a power cut; see
`csi_kit._core.store`).  The start-up log line and the GetPluginInfo
manifest say which is in force.

A failure at any step releases what the earlier steps took (the lock last).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable, Mapping
from typing import Literal

import attrs

from csi_kit._core import statedir
from csi_kit._core.engine import ReconcileReport, VolumeEngine
from csi_kit._core.statedir import RebuildReport, StateDirLock
from csi_kit._core.store import DURABILITY, Durability, Store
from csi_kit._grpc.metrics import ServerMetrics
from csi_kit._grpc.server import Endpoint, GrpcServer, parse_endpoint
from csi_kit._grpc.servicers import add_services
from csi_kit.backend import Backend, BackendContext
from csi_kit.errors import CSIError, FailedPrecondition, InvalidArgument
from csi_kit.plugin.manager import BackendRegistry, build_config, load_registry
from csi_kit.types import AccessType

__all__ = [
    "DriverConfig",
    "Driver",
    "run_driver",
    "rebuild_store",
    "RebuildReport",
    "StartupError",
    "DEFAULT_STATE_DIR",
    "DEFAULT_ENDPOINT",
]

log = logging.getLogger("csi_kit.driver")

DEFAULT_STATE_DIR = "/var/lib/csi-kit"
DEFAULT_ENDPOINT = "unix:///run/csi-kit/csi.sock"


def _as_dict(value: Mapping[str, str]) -> dict[str, str]:
    return dict(value)


@attrs.frozen
class DriverConfig:
    """Everything a driver process needs; every field has a working default."""

    backend: str = "hostpath"
    backend_options: Mapping[str, str] = attrs.field(factory=dict, converter=_as_dict)
    driver_name: str = "hostpath.csi-kit.io"
    node_id: str = attrs.field(factory=lambda: os.uname().nodename)
    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    state_dir: str = DEFAULT_STATE_DIR
    mode: Literal["all", "controller", "node"] = "all"
    workers: int = 16
    metrics_address: str = ""
    socket_mode: int = 0o600
    drain_seconds: float = 30.0
    #: What an acknowledged change survives: "power" (flushed before the answer) or
    #: "process" (a killed driver, not a power cut).
    durability: Durability = attrs.field(default="power", validator=attrs.validators.in_(DURABILITY))


_DURABILITY_MEANS: dict[Durability, str] = {
    "power": "every change is on the disk before it is acknowledged",
    "process": "acknowledged changes survive a killed driver, not a power cut",
}


class StartupError(FailedPrecondition):
    """The driver cannot start: a backend that fails to start, a busy port, a bad address."""


def _describe(error: BaseException) -> str:
    """An exception as a short phrase for a one-line message."""
    if isinstance(error, CSIError):
        return error.message
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_metrics_address(address: str) -> None:
    _, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"metrics address {address!r} is not host:port (e.g. 0.0.0.0:9808)")


def _backend_maker(
    config: DriverConfig, backend: Backend | None, registry: BackendRegistry | None
) -> tuple[str, Callable[[], Backend]]:
    """The backend's name and how to build it: the object given, else the
    configured backend from the registry with its options checked (a mistake
    here touches nothing; `_start_backend` builds and starts it)."""
    if backend is not None:
        return type(backend).__name__, lambda: backend
    registry = registry or load_registry()
    entry = registry.get(config.backend)
    backend_config = build_config(entry, config.backend_options)
    context = BackendContext(config.driver_name, config.node_id, config.state_dir)
    return entry.name, lambda: entry.backend(backend_config, context)


def _start_backend(name: str, make: Callable[[], Backend]) -> Backend:
    """Build and start a backend; any failure is one `StartupError` naming it."""
    try:
        backend = make()
    except Exception as e:
        raise StartupError(f"backend {name!r} failed to initialise: {_describe(e)}") from e
    try:
        backend.start()
    except Exception as e:
        raise StartupError(f"backend {name!r} failed to start: {_describe(e)}") from e
    return backend


def _recovery_hint(config: DriverConfig, embedded: bool) -> str:
    if embedded:
        return "Recover with csi_kit.driver.rebuild_store(config, backend=...); see docs/operations.md."
    return (
        f"Recover with `csi-kit store rebuild --state-dir {config.state_dir} --backend {config.backend}` "
        "(and your --backend-option flags); see docs/operations.md."
    )


class Driver:
    """One driver: build it, ``await start()``, ``await stop()``.

    Building it takes the state directory's lock, binds the metrics port,
    starts the backend and opens the store (see the module docstring);
    `stop` releases all of it.
    """

    def __init__(
        self, config: DriverConfig, *, backend: Backend | None = None, registry: BackendRegistry | None = None
    ) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.server: GrpcServer | None = None
        self.reconcile_report: ReconcileReport | None = None
        # 1. The configuration, before anything is touched.
        for endpoint in config.endpoints:
            parse_endpoint(endpoint)
        if config.metrics_address:
            _check_metrics_address(config.metrics_address)
        name, make = _backend_maker(config, backend, registry)
        # 2. One driver per state directory: the first thing taken, the last released.
        self._lock: StateDirLock | None = StateDirLock.acquire(config.state_dir)
        self._backend_started = False
        self._store: Store | None = None
        try:
            # 3. The metrics port, the backend, the store.
            if config.metrics_address:
                try:
                    self.metrics.serve(config.metrics_address)
                except (OSError, ValueError) as e:
                    raise StartupError(
                        f"cannot serve metrics on {config.metrics_address}: {_describe(e)}"
                    ) from None
            recovery = _recovery_hint(config, embedded=backend is not None)
            found = statedir.open_existing_store(
                config.state_dir, recovery=recovery, synchronous=DURABILITY[config.durability]
            )
            if isinstance(found, Store):
                self._store = found
            self.backend = _start_backend(name, make)
            self._backend_started = True
            if not isinstance(found, Store):
                found = self._store = statedir.create_store(
                    found,
                    self.backend,
                    backend_name=name,
                    recovery=recovery,
                    synchronous=DURABILITY[config.durability],
                )
            self.store = found
            self.engine = VolumeEngine(self.backend, self.store, workers=config.workers)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        """Give back what __init__ took, in reverse order; safe to call twice."""
        engine: VolumeEngine | None = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        if self._backend_started:
            self._backend_started = False
            try:
                self.backend.stop()
            except Exception:
                log.warning("backend %s failed to stop", type(self.backend).__name__, exc_info=True)
        if self._store is not None:
            self._store.close()
            self._store = None
        self.metrics.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.server.endpoints if self.server else [parse_endpoint(e) for e in self.config.endpoints]

    async def start(self) -> None:
        """Reconcile the store with the backend, then serve.

        On failure everything the driver holds is released (the lock too).
        """
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self.reconcile_report = await loop.run_in_executor(None, self.engine.reconcile)
        server = GrpcServer(max_workers_hint=self.config.workers, socket_mode=self.config.socket_mode)
        add_services(
            server.server,
            self.engine,
            driver_name=self.config.driver_name,
            controller=self.config.mode in ("all", "controller"),
            node=self.config.mode in ("all", "node"),
            metrics=self.metrics,
        )
        self.server = server
        try:
            server.bind([parse_endpoint(e) for e in self.config.endpoints])
            await server.start()
        except (OSError, RuntimeError) as e:  # RuntimeError: grpc's "Failed to bind to address"
            where = ", ".join(self.config.endpoints)
            raise StartupError(f"cannot listen on {where}: {_describe(e)}") from None
        # Everything made so far (modules, servicers, the engine) lives as long as the
        # process: keep it out of the collector's full passes, which would otherwise walk
        # it every time and add milliseconds to whichever call triggers one.
        gc.freeze()
        log.info(
            "serving %s (%s backend) on %s; durability %s (%s)",
            self.config.driver_name,
            self.config.backend,
            ", ".join(str(e) for e in server.endpoints),
            self.store.durability,
            _DURABILITY_MEANS[self.store.durability],
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain in-flight calls, then release the backend, the store and the lock."""
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop(self.config.drain_seconds if grace is None else grace)
        self._release()

    async def serve_until_signalled(self, stop: asyncio.Event | None = None) -> None:
        """Run until SIGTERM/SIGINT (or ``stop`` is set), then drain and stop."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
            log.info("signal received: draining in-flight calls")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()


def run_driver(config: DriverConfig, *, backend: Backend | None = None) -> None:
    """Serve until SIGTERM or SIGINT; the blocking entry point."""
    driver = Driver(config, backend=backend)
    asyncio.run(driver.serve_until_signalled())


def rebuild_store(
    config: DriverConfig,
    *,
    backend: Backend | None = None,
    registry: BackendRegistry | None = None,
    access_type: AccessType | None = None,
) -> RebuildReport:
    """Make a driver's store usable again from what its backend still holds.

    Takes the state directory's lock (so never while a driver serves it),
    starts the backend as `Driver` does, moves a missing/empty/unreadable
    store aside (never deleting it) and records the backend's inventory as
    ready volumes and snapshots (`csi_kit._core.statedir.rebuild_store`).
    """
    name, make = _backend_maker(config, backend, registry)
    lock = StateDirLock.acquire(config.state_dir)
    try:
        started = _start_backend(name, make)
        try:
            return statedir.rebuild_store(
                config.state_dir,
                started,
                backend_name=name,
                access_type=access_type,
                synchronous=DURABILITY[config.durability],
            )
        finally:
            started.stop()
    finally:
        lock.release()
