"""Kubelet plugin registration: what node-driver-registrar does, inside the driver process.

The kubelet watches its `plugins_registry` directory; for each new socket it
calls `GetInfo` on the `pluginregistration.Registration` service there, learns
the driver's name and where its CSI socket is, registers the driver (that is
when the node's CSINode object and the node-ID annotation appear), and then
calls `NotifyRegistrationStatus` with the verdict.

`RegistrationServer` serves that service on `<registry>/<driver>-reg.sock`
(the name node-driver-registrar uses).  A stale socket from an earlier run is
removed first -- the kubelet would otherwise keep talking to a dead file --
and the socket is removed on stop, which is how the kubelet learns the plugin
went away.  A failed registration is logged and reported to `on_status`;
node-driver-registrar exits so its container restarts, and the one-process
deployment does the equivalent by failing its `/healthz` (see `liveness`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from csi_kit._pb import pluginregistration_pb2 as rpb
from csi_kit._pb import pluginregistration_pb2_grpc as _rpbg
from csi_kit.k8s.runtime.context import LoopContext, Planned, Service

rpbg: Any = _rpbg  # generated, untyped

log = logging.getLogger(__name__)

KUBELET_REGISTRY = "/var/lib/kubelet/plugins_registry"
CSI_PLUGIN = "CSIPlugin"
SUPPORTED_VERSIONS = ("1.0.0",)


def socket_path(registry_dir: str, driver_name: str) -> str:
    return os.path.join(registry_dir, f"{driver_name}-reg.sock")


class _Servicer(rpbg.RegistrationServicer):  # type: ignore[misc]
    def __init__(self, owner: RegistrationServer) -> None:
        self.owner = owner

    async def GetInfo(self, request: Any, context: Any) -> Any:
        log.info("kubelet asked for plugin info of %s", self.owner.driver_name)
        return rpb.PluginInfo(
            type=CSI_PLUGIN,
            name=self.owner.driver_name,
            endpoint=self.owner.kubelet_endpoint,
            supported_versions=list(self.owner.versions),
        )

    async def NotifyRegistrationStatus(self, request: Any, context: Any) -> Any:
        self.owner._record(bool(request.plugin_registered), str(request.error))
        return rpb.RegistrationStatusResponse()


class RegistrationServer:
    """The Registration service on `<registry_dir>/<driver>-reg.sock`.

    `kubelet_endpoint` is the driver's CSI socket path *as the kubelet sees it*
    (node-driver-registrar's --kubelet-registration-path), e.g.
    /var/lib/kubelet/plugins/<driver>/csi.sock, which may differ from the path
    inside the container.
    """

    def __init__(
        self,
        driver_name: str,
        kubelet_endpoint: str,
        registry_dir: str = KUBELET_REGISTRY,
        *,
        versions: tuple[str, ...] = SUPPORTED_VERSIONS,
        on_status: Callable[[bool, str], None] | None = None,
    ) -> None:
        if not kubelet_endpoint:
            raise ValueError("the kubelet registration path of the CSI socket is required")
        self.driver_name = driver_name
        self.kubelet_endpoint = kubelet_endpoint.removeprefix("unix://")
        self.registry_dir = registry_dir
        self.versions = versions
        self.on_status = on_status
        self.path = socket_path(registry_dir, driver_name)
        self.registered: bool | None = None  # None: the kubelet has not answered yet
        self.error = ""
        self._server: grpc.aio.Server | None = None

    def _record(self, registered: bool, error: str) -> None:
        self.registered, self.error = registered, error
        if registered:
            log.info("kubelet registered driver %s", self.driver_name)
        else:
            log.error("kubelet failed to register driver %s: %s", self.driver_name, error)
        if self.on_status is not None:
            self.on_status(registered, error)

    def healthy(self) -> tuple[bool, str]:
        """False after the kubelet refused the driver, or when our socket vanished."""
        if self.registered is False:
            return False, f"kubelet registration failed: {self.error}"
        if self._server is not None and not os.path.exists(self.path):
            return False, f"registration socket {self.path} is missing"
        return True, ""

    def _remove_stale(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            mode = os.lstat(self.path).st_mode
            if not stat.S_ISSOCK(mode):
                raise RuntimeError(f"{self.path} exists and is not a socket; not removing it")
            os.unlink(self.path)

    async def start(self) -> None:
        os.makedirs(self.registry_dir, exist_ok=True)
        self._remove_stale()
        server = grpc.aio.server()
        rpbg.add_RegistrationServicer_to_server(_Servicer(self), server)
        server.add_insecure_port("unix://" + self.path)
        await server.start()
        self._server = server
        log.info("plugin registration for %s served on %s", self.driver_name, self.path)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(1.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# ---------------------------------------------------------------------- wiring
# The loop's factory, listed in k8s/registry.py; kept by the wiring (the module's owner works above).


async def build(ctx: LoopContext) -> list[Planned]:
    """Kubelet plugin registration, on every node (no Lease); its state joins the liveness checks."""
    a = ctx.args
    path = a.kubelet_registration_path or ctx.csi_endpoint.removeprefix("unix://")
    server = RegistrationServer(ctx.info.name, path, a.plugin_registry_dir)
    ctx.health_checks.append(server.healthy)
    return [Planned(Service("registration", server.start, server.stop), None)]
