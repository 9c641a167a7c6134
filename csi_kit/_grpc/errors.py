"""The single translation from csi_kit errors to gRPC status, plus per-call logs and metrics.

Every servicer method is wrapped by `rpc`; it is the only place that decides
what status code a caller sees, what gets logged, and what is measured.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from csi_kit._grpc.metrics import ServerMetrics
from csi_kit._grpc.redact import redacted, request_fields
from csi_kit.errors import CSIError

__all__ = ["rpc", "status_of"]

log = logging.getLogger("csi_kit.rpc")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, CSIError):
        return grpc.StatusCode[error.code], error.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def rpc(method: str) -> Callable[[F], F]:
    """Wrap a servicer coroutine: translate errors, log one line, observe latency."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            metrics: ServerMetrics | None = getattr(self, "metrics", None)
            ids = request_fields(request)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request", extra={"method": method, "request": redacted(request)})
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            message = ""
            if metrics:
                metrics.in_flight.labels(method).inc()
            try:
                return await fn(self, request, context)
            except asyncio.CancelledError:
                code, message = grpc.StatusCode.CANCELLED, "cancelled by the client"
                raise
            except Exception as e:
                code, message = status_of(e)
                if not isinstance(e, CSIError):
                    log.exception("unexpected error in %s", method, extra={"method": method, **ids})
                await context.abort(code, message)
            finally:
                elapsed = time.perf_counter() - start
                if metrics:
                    metrics.in_flight.labels(method).dec()
                    metrics.latency.labels(method, code.name).observe(elapsed)
                level = logging.INFO if code in (grpc.StatusCode.OK,) else logging.WARNING
                if method in _QUIET and code == grpc.StatusCode.OK:
                    level = logging.DEBUG
                log.log(
                    level,
                    "%s %s",
                    method,
                    code.name,
                    extra={
                        "method": method,
                        "status": code.name,
                        "duration_ms": round(elapsed * 1000, 3),
                        "error": message,
                        **ids,
                    },
                )

        return call  # type: ignore[return-value]

    return wrap


#: Calls made every few seconds by sidecars; logged at debug level when they succeed.
_QUIET = frozenset(
    {
        "Probe",
        "GetPluginInfo",
        "GetPluginCapabilities",
        "ControllerGetCapabilities",
        "NodeGetCapabilities",
        "NodeGetVolumeStats",
        "GetCapacity",
    }
)
