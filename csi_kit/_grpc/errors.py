"""The single translation from csi_kit errors to gRPC status, plus per-call logs and metrics.

Every servicer method is wrapped by `rpc` (`rpc_stream` for the
SnapshotMetadata service's server-streaming methods); it is the only place that decides
what status code a caller sees, what gets logged, and what is measured.

A request body that does not decode (garbage bytes, invalid UTF-8 in a string
field) never raises inside grpc, which would answer UNKNOWN and log a
traceback per call: the servicers' deserializers are built by `decoder`,
which hands `rpc` an `Undecodable` instead, and `rpc` answers it
INVALID_ARGUMENT.  Since such requests can arrive in a loop, they are logged
through a `LogThrottle`: at most one WARNING per method every 10 s, with a
count of those held back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import attrs
import grpc
from google.protobuf.message import Message

from csi_kit._core import timing
from csi_kit._grpc.metrics import MethodMetrics, ServerMetrics
from csi_kit._grpc.redact import redacted, request_fields
from csi_kit.errors import CSIError
from csi_kit.log import LogThrottle

__all__ = ["rpc", "rpc_stream", "status_of", "decoder", "Undecodable"]

log = logging.getLogger("csi_kit.rpc")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
S = TypeVar("S", bound=Callable[..., AsyncGenerator[Any, None]])

#: One WARNING per method per interval for undecodable requests.
undecodable_log = LogThrottle(log, interval=10.0)


@attrs.frozen
class Undecodable:
    """Stands in for a request whose body did not decode, so `rpc` can answer it."""

    type_name: str
    reason: str

    @property
    def message(self) -> str:
        return f"request body does not decode as {self.type_name}: {self.reason}"


def decoder(message_type: type[Message]) -> Callable[[bytes], Any]:
    """A request deserializer for ``message_type`` that never raises: a body
    that does not parse becomes an `Undecodable`."""
    name = message_type.DESCRIPTOR.full_name
    noise = f"Error parsing message with type '{name}': "

    def decode(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as e:  # DecodeError, or whatever else the parser makes of hostile bytes
            reason = str(e).removeprefix(noise) or type(e).__name__
            return Undecodable(name, reason[:200])

    return decode


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, CSIError):
        return grpc.StatusCode[error.code], error.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def rpc(method: str) -> Callable[[F], F]:
    """Wrap a servicer coroutine: translate errors, log one line, observe latency.

    What a call costs here is paid on every call, Probe included, so the
    per-method parts are looked up once (`ServerMetrics.method`), and the
    log line's fields are gathered only when the line will be written.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            metrics: ServerMetrics | None = self.metrics
            if isinstance(request, Undecodable):
                return await _refuse_undecodable(method, request, context, metrics)
            counted = _begin(method, request, metrics)
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            message = ""
            try:
                return await fn(self, request, context)
            except asyncio.CancelledError:
                code, message = grpc.StatusCode.CANCELLED, "cancelled by the client"
                raise
            except Exception as e:
                code, message = _failed(method, e, request)
                await context.abort(code, message)
            finally:
                _finished(method, code, message, time.perf_counter() - start, counted, request)
                if timing.ENABLED:
                    timing.add("handler", int((time.perf_counter() - start) * 1e9))

        return call  # type: ignore[return-value]

    return wrap


def _begin(method: str, request: Any, metrics: ServerMetrics | None) -> MethodMetrics | None:
    """The start of any decoded call: its debug line, and its in-flight count (the
    method's metrics, handed on to `_finished`)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("request", extra={"method": method, "request": redacted(request)})
    counted = metrics.method(method) if metrics else None
    if counted:
        counted.in_flight.inc()
    return counted


def _failed(method: str, error: Exception, request: Any) -> tuple[grpc.StatusCode, str]:
    """The status a call that raised `error` ends with; an error that is not a
    `CSIError` is a bug, logged with its traceback (call it inside the except block)."""
    code, message = status_of(error)
    if not isinstance(error, CSIError):
        log.exception("unexpected error in %s", method, extra={"method": method, **request_fields(request)})
    return code, message


def _finished(
    method: str,
    code: grpc.StatusCode,
    message: str,
    elapsed: float,
    counted: MethodMetrics | None,
    request: Any,
) -> None:
    """The end of any call: metrics and its one log line."""
    start = timing.now() if timing.ENABLED else 0
    if counted:
        counted.in_flight.dec()
        counted.latency(code.name).observe(elapsed)
    if timing.ENABLED:
        logging_start = timing.now()
        timing.add("metrics", logging_start - start)
    if code is grpc.StatusCode.OK:
        level = logging.DEBUG if method in _QUIET else logging.INFO
    else:
        level = logging.WARNING
    if not log.isEnabledFor(level):
        return
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
            **request_fields(request),
        },
    )
    if timing.ENABLED:
        timing.add("logging", timing.now() - logging_start)


def rpc_stream(method: str) -> Callable[[S], S]:
    """`rpc` for a server-streaming method (an async generator of responses).

    The same translation, log line and metrics, for the whole stream: an
    error raised before or between messages aborts the stream with its
    status; a client that goes away ends it as CANCELLED.
    """

    def wrap(fn: S) -> S:
        @functools.wraps(fn)
        async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            metrics: ServerMetrics | None = getattr(self, "metrics", None)
            if isinstance(request, Undecodable):
                await _refuse_undecodable(method, request, context, metrics)
                return
            counted = _begin(method, request, metrics)
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            message = ""
            try:
                # aclosing: when the client goes away mid-stream, the method's own
                # generator is closed now (its finally gives back locks), not at GC.
                async with contextlib.aclosing(fn(self, request, context)) as responses:
                    async for response in responses:
                        yield response
            except (asyncio.CancelledError, GeneratorExit):
                code, message = grpc.StatusCode.CANCELLED, "cancelled by the client"
                raise
            except Exception as e:
                code, message = _failed(method, e, request)
                await context.abort(code, message)
            finally:
                _finished(method, code, message, time.perf_counter() - start, counted, request)

        return call  # type: ignore[return-value]

    return wrap


async def _refuse_undecodable(
    method: str, request: Undecodable, context: grpc.aio.ServicerContext, metrics: ServerMetrics | None
) -> None:
    """INVALID_ARGUMENT for a body that did not decode: counted in the metrics
    like any call, logged through the throttle instead of one line per call."""
    code = grpc.StatusCode.INVALID_ARGUMENT
    if metrics:
        metrics.latency.labels(method, code.name).observe(0.0)
    undecodable_log.log(
        logging.WARNING,
        method,
        "%s %s: %s",
        method,
        code.name,
        request.message,
        extra={"method": method, "status": code.name},
    )
    await context.abort(code, request.message)


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
