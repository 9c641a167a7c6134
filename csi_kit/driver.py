"""A CSI driver process: backend + store + engine + gRPC server, started and stopped.

This is the public way to serve a backend from Python::

    import csi_kit
    config = csi_kit.DriverConfig(backend="hostpath", endpoint="unix:///run/csi/csi.sock",
                                  driver_name="hostpath.example.io", node_id="node-1")
    csi_kit.run_driver(config)          # blocks until SIGTERM / SIGINT

or, with a backend object you built yourself, ``Driver(config, backend=MyBackend(...))``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from typing import Literal

import attrs

from csi_kit._core.engine import ReconcileReport, VolumeEngine
from csi_kit._core.store import Store
from csi_kit._grpc.metrics import ServerMetrics
from csi_kit._grpc.server import Endpoint, GrpcServer, parse_endpoint
from csi_kit._grpc.servicers import add_services
from csi_kit.backend import Backend, BackendContext
from csi_kit.plugin.manager import BackendRegistry, build_config, load_registry

__all__ = ["DriverConfig", "Driver", "run_driver", "DEFAULT_STATE_DIR", "DEFAULT_ENDPOINT"]

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
    store_sync: Literal["FULL", "NORMAL"] = "FULL"


class Driver:
    """One driver: build it, ``await start()``, ``await stop()``."""

    def __init__(
        self, config: DriverConfig, *, backend: Backend | None = None, registry: BackendRegistry | None = None
    ) -> None:
        self.config = config
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        context = BackendContext(config.driver_name, config.node_id, config.state_dir)
        if backend is None:
            registry = registry or load_registry()
            entry = registry.get(config.backend)
            backend = entry.backend(build_config(entry, config.backend_options), context)
        self.backend = backend
        self.backend.start()
        self.store = Store(os.path.join(config.state_dir, "state.db"), synchronous=config.store_sync)
        self.engine = VolumeEngine(backend, self.store, workers=config.workers)
        self.metrics = ServerMetrics()
        self.server: GrpcServer | None = None
        self.reconcile_report: ReconcileReport | None = None

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.server.endpoints if self.server else [parse_endpoint(e) for e in self.config.endpoints]

    async def start(self) -> None:
        """Reconcile the store with the backend, then serve."""
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
        server.bind([parse_endpoint(e) for e in self.config.endpoints])
        await server.start()
        self.server = server
        if self.config.metrics_address:
            self.metrics.serve(self.config.metrics_address)
        log.info(
            "serving %s (%s backend) on %s",
            self.config.driver_name,
            self.config.backend,
            ", ".join(str(e) for e in server.endpoints),
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain in-flight calls, then release the backend and the store."""
        if self.server is not None:
            await self.server.stop(self.config.drain_seconds if grace is None else grace)
            self.server = None
        self.engine.close()
        self.backend.stop()
        self.store.close()

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
