"""An HTTP `/healthz` that asks the driver `Probe`: what the livenessprobe sidecar does.

A kubelet livenessProbe (httpGet on this port) restarts the container when
the driver stops answering, answers with an error, or says it is not ready.
Each request makes one Probe with a deadline (`probe_timeout`, upstream's
default is 1 s); extra checks -- e.g. that the kubelet accepted our plugin
registration -- can fail the answer too.  Plain asyncio, no web framework: the
server answers one path, and a probe must never wait on anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from csi_kit.k8s.runtime.context import LoopContext, Planned, Service

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


class LivenessServer:
    def __init__(
        self,
        probe: Callable[[], Awaitable[bool]],
        *,
        host: str = "0.0.0.0",
        port: int = 9808,
        path: str = "/healthz",
        probe_timeout: float = 1.0,
        checks: list[Check] | None = None,
    ) -> None:
        self.probe = probe
        self.host = host
        self.port = port
        self.path = path
        self.probe_timeout = probe_timeout
        self.checks = list(checks or [])
        self._server: asyncio.Server | None = None

    @property
    def bound_port(self) -> int:
        """The port actually bound (useful with port=0)."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def health(self) -> tuple[int, str]:
        """(HTTP status, body) for one health request."""
        for check in self.checks:
            ok, why = check()
            if not ok:
                return 500, why
        try:
            ready = await asyncio.wait_for(self.probe(), self.probe_timeout)
        except TimeoutError:
            return 500, f"driver did not answer Probe within {self.probe_timeout}s"
        except Exception as e:  # any failure to probe is an unhealthy driver
            return 500, f"probe failed: {e}"
        if not ready:
            return 500, "driver responded but is not ready"
        return 200, "ok"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            while True:  # drain the headers; there is no body to read for GET
                header = await asyncio.wait_for(reader.readline(), 5.0)
                if header in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                code, body = 405, "method not allowed"
            elif parts[1].split("?", 1)[0] != self.path:
                code, body = 404, "not found"
            else:
                code, body = await self.health()
                if code != 200:
                    log.warning("health check failed: %s", body)
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}[
                code
            ]
            payload = body.encode()
            head = (
                f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head + (payload if parts[:1] != ["HEAD"] else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("liveness endpoint on http://%s:%d%s", self.host, self.bound_port, self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


# ---------------------------------------------------------------------- wiring
# The loop's factory, listed in k8s/registry.py; kept by the wiring (the module's owner works above).


async def build(ctx: LoopContext) -> list[Planned]:
    """`/healthz` (Probe through the one CSI client, plus the checks of the services before it)."""
    a = ctx.args
    server = LivenessServer(
        ctx.csi.probe,
        host=a.health_address,
        port=a.health_port,
        probe_timeout=a.probe_timeout,
        checks=ctx.health_checks,
    )
    return [Planned(Service("liveness", server.start, server.stop), None)]
