"""Prometheus metrics of the Kubernetes loops (one set per process).

Two kinds:

- **The upstream sidecars' metric**, by their name and labels, so a dashboard
  or alert written for external-provisioner, -attacher, -resizer,
  -snapshotter or the livenessprobe works unchanged on our loops:
  ``csi_sidecar_operations_seconds`` (a histogram) with ``driver_name``,
  ``method_name`` (the full gRPC method, ``/csi.v1.Controller/CreateVolume``)
  and ``grpc_status_code`` (gRPC's own spelling: ``OK``, ``NotFound``,
  ``DeadlineExceeded`` …; ``unknown-non-grpc`` when the call failed before
  gRPC answered), with csi-lib-utils' buckets and its ``unknown-driver``
  until the driver's name is known.  Every CSI call a loop makes is
  observed by a client interceptor on the loops' channels
  (`csi_call_interceptors`).
- **Our own, per loop** (``csi_kit_k8s_*``): sync durations, syncs in flight,
  work-queue depth, Lease leadership, API requests.  They have no upstream
  twin: the sidecars expose client-go's workqueue metrics instead.

All live in prometheus_client's default registry; ``csi-kit serve
--metrics-address`` serves them next to the driver's own ``csi_kit_*``
metrics, and ``csi-kit controllers --metrics-address`` serves them alone.
See docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import grpc.aio
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

__all__ = [
    "OPERATION_SECONDS",
    "SIDECAR_OPERATIONS",
    "csi_call_interceptors",
    "grpc_code_name",
    "serve",
    "set_driver_name",
    "timed",
]

#: csi-lib-utils' names, labels and buckets (metrics.go), so sidecar dashboards work unchanged.
SIDECAR_OPERATIONS = Histogram(
    "csi_sidecar_operations_seconds",
    "Container Storage Interface operation duration with gRPC error code status total",
    ["driver_name", "method_name", "grpc_status_code"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 25, 50, 120, 300, 600),
)
UNKNOWN_DRIVER = "unknown-driver"
NON_GRPC = "unknown-non-grpc"

OPERATION_SECONDS = Histogram(
    "csi_kit_k8s_operation_seconds",
    "Duration of one sync of one object, by loop, operation and outcome",
    ["loop", "operation", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
IN_FLIGHT = Gauge("csi_kit_k8s_operations_in_flight", "Syncs running now", ["loop"])
QUEUE_DEPTH = Gauge("csi_kit_k8s_queue_depth", "Keys waiting in the work queue", ["loop"])
LEADER = Gauge("csi_kit_k8s_leader", "1 while this process holds the loop's lease", ["loop"])
API_REQUESTS = Counter("csi_kit_k8s_api_requests_total", "Kubernetes API requests made", ["verb"])

_driver = {"name": UNKNOWN_DRIVER}
# gRPC-Go's codes.Code.String(): the spelling the sidecars' label values use.
_GO_SPELLING = {"OK": "OK", "CANCELLED": "Canceled"}


def set_driver_name(name: str) -> None:
    """The ``driver_name`` label from now on (csi-lib-utils' SetDriverName)."""
    _driver["name"] = name or UNKNOWN_DRIVER


def grpc_code_name(code: grpc.StatusCode) -> str:
    """``grpc.StatusCode.NOT_FOUND`` → ``NotFound``, as gRPC-Go spells it."""
    return _GO_SPELLING.get(code.name) or "".join(w.capitalize() for w in code.name.split("_"))


def _method(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


class _CSICallMetrics(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Observes each CSI call's duration and final status into `SIDECAR_OPERATIONS`."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        start = time.perf_counter()
        code = NON_GRPC
        try:
            call = await continuation(details, request)
            # The caller awaits the call again: a failure reaches it from there.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call
            code = grpc_code_name(await call.code())
            return call
        except asyncio.CancelledError:
            code = grpc_code_name(grpc.StatusCode.CANCELLED)  # a Go sidecar's cancelled context
            raise
        finally:
            self._observe(details, code, start)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        # A stream's duration is its opening; the loops make no streaming calls today.
        start = time.perf_counter()
        try:
            return await continuation(details, request)
        finally:
            self._observe(details, "OK", start)

    @staticmethod
    def _observe(details: Any, code: str, start: float) -> None:
        SIDECAR_OPERATIONS.labels(_driver["name"], _method(details), code).observe(
            time.perf_counter() - start
        )


def csi_call_interceptors() -> list[Any]:
    """Interceptors for a loop's CSI channel (``grpc.aio.insecure_channel(..., interceptors=...)``)."""
    return [_CSICallMetrics()]


@contextmanager
def timed(loop: str, operation: str) -> Iterator[None]:
    """Time one sync; the status label is `ok` or the exception class name."""
    start = time.perf_counter()
    IN_FLIGHT.labels(loop).inc()
    status = "ok"
    try:
        yield
    except BaseException as e:
        status = type(e).__name__
        raise
    finally:
        IN_FLIGHT.labels(loop).dec()
        OPERATION_SECONDS.labels(loop, operation, status).observe(time.perf_counter() - start)


class MetricsServer:
    """The HTTP exporter of `csi-kit controllers --metrics-address` (a daemon thread)."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"metrics address {address!r} is not host:port (e.g. 0.0.0.0:9809)")
        self._http, _ = start_http_server(int(port), addr=host or "0.0.0.0", registry=REGISTRY)

    async def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def serve(address: str) -> MetricsServer:
    """Serve the default registry (these metrics) on ``host:port``."""
    return MetricsServer(address)
