"""The grpc.aio server: endpoints, health, graceful drain.

Unix sockets are the normal CSI transport.  A socket path that exists is
replaced only when nothing answers on it (a stale file left by a killed
driver); a live socket means another driver is serving there, and we refuse
rather than steal it.  The socket is created with mode 0600 unless configured
otherwise (kubelet and sidecars run as root).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Sequence

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from csi_kit.errors import FailedPrecondition, InvalidArgument
from csi_kit.log import LogThrottle

__all__ = ["parse_endpoint", "prepare_unix_socket", "Endpoint", "GrpcServer"]

log = logging.getLogger("csi_kit.server")


class Endpoint:
    """A parsed ``unix:///path`` or ``tcp://host:port`` / ``host:port`` endpoint."""

    def __init__(self, scheme: str, address: str) -> None:
        self.scheme = scheme
        self.address = address

    @property
    def grpc_target(self) -> str:
        return f"unix://{self.address}" if self.scheme == "unix" else self.address

    def __str__(self) -> str:
        return f"unix://{self.address}" if self.scheme == "unix" else f"tcp://{self.address}"


def parse_endpoint(value: str) -> Endpoint:
    if value.startswith("unix://"):
        path = value[len("unix://") :]
        if not path.startswith("/"):
            raise InvalidArgument(f"unix endpoint needs an absolute path: {value!r}")
        return Endpoint("unix", path)
    if value.startswith("/"):
        return Endpoint("unix", value)
    if value.startswith("tcp://"):
        value = value[len("tcp://") :]
    if ":" not in value:
        raise InvalidArgument(f"endpoint {value!r} is neither unix:///path nor host:port")
    return Endpoint("tcp", value)


def prepare_unix_socket(path: str) -> None:
    """Make room for a socket at ``path``: remove a stale one, refuse a live one."""
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FailedPrecondition(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        log.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise FailedPrecondition(f"another process is serving on {path}; refusing to take it over")


class _GrpcDecodeFilter(logging.Filter):
    """Throttle grpc's own ERROR-with-traceback for a request body that does not decode.

    The CSI services decode their bodies themselves (`errors.decoder`); the
    gRPC health service is grpc's code, whose failure to decode is logged by
    grpc with a traceback per request — a log-flooding vector.  One line per
    10 s, without the traceback, is enough to see it happening.
    """

    def __init__(self) -> None:
        super().__init__()
        self.throttle = LogThrottle(log)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, DecodeError) and "[DecodeError]" not in record.getMessage():
            return True
        self.throttle.log(
            logging.WARNING, "grpc-decode", "a request body did not decode (grpc answered; traceback dropped)"
        )
        return False


_decode_filter = _GrpcDecodeFilter()


class GrpcServer:
    """An aio server bound to one or more endpoints, with the health service."""

    def __init__(self, *, max_workers_hint: int = 16, socket_mode: int = 0o600) -> None:
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 16 << 20),
            ],
            maximum_concurrent_rpcs=max(64, max_workers_hint * 8),
        )
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in ("grpc._cython.cygrpc", "grpc.aio._server", "grpc._server"):
            logger = logging.getLogger(name)
            if _decode_filter not in logger.filters:
                logger.addFilter(_decode_filter)
        self.socket_mode = socket_mode
        self.endpoints: list[Endpoint] = []

    def bind(self, endpoints: Sequence[Endpoint]) -> None:
        for ep in endpoints:
            if ep.scheme == "unix":
                prepare_unix_socket(ep.address)
                old = os.umask(0o177)  # the socket file is born 0600, no window with wider rights
                try:
                    self.server.add_insecure_port(ep.grpc_target)
                finally:
                    os.umask(old)
            else:
                port = self.server.add_insecure_port(ep.address)
                if port == 0:
                    raise FailedPrecondition(f"cannot listen on {ep.address}")
                if ep.address.endswith(":0"):
                    ep = Endpoint("tcp", ep.address.rsplit(":", 1)[0] + f":{port}")
            self.endpoints.append(ep)

    async def start(self) -> None:
        await self.server.start()
        for ep in self.endpoints:
            if ep.scheme == "unix":
                os.chmod(ep.address, self.socket_mode)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _set_health(self, status: int) -> None:
        result = self.health.set("", status)
        if hasattr(result, "__await__"):
            await result

    async def stop(self, grace: float) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace`` seconds."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        for ep in self.endpoints:
            if ep.scheme == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ep.address)

    async def wait(self) -> None:
        await self.server.wait_for_termination()
