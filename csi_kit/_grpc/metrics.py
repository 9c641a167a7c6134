"""Prometheus metrics for the CSI server (served with ``--metrics-address``).

The endpoint serves this server's own registry (``csi_kit_*``: every CSI call
the driver answers, by method and gRPC code) together with prometheus_client's
default registry, where the Kubernetes loops of the same process keep theirs
(``csi_sidecar_operations_seconds`` under the upstream sidecars' names, see
``csi_kit/k8s/runtime/metrics.py``) beside the process and Python collectors: one
scrape target per driver pod, as with one sidecar.  docs/metrics.md lists them.
"""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Histogram, start_http_server

__all__ = ["ServerMetrics", "MethodMetrics"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class MethodMetrics:
    """One method's label children, looked up once instead of on every call
    (``labels()`` takes a lock and builds a key each time)."""

    def __init__(self, metrics: ServerMetrics, method: str) -> None:
        self.in_flight = metrics.in_flight.labels(method)
        self._latency = metrics.latency
        self._method = method
        self._by_code: dict[str, Any] = {}

    def latency(self, code: str) -> Any:
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._latency.labels(self._method, code)
        return child


class ServerMetrics:
    """Per-method latency by gRPC status code, and calls in flight."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.latency = Histogram(
            "csi_kit_operation_duration_seconds",
            "Duration of CSI calls by method and gRPC status code",
            ["method", "code"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "csi_kit_operations_in_flight", "CSI calls being served", ["method"], registry=self.registry
        )
        self._methods: dict[str, MethodMetrics] = {}

    def method(self, name: str) -> MethodMetrics:
        """The label children of one method (made on its first call)."""
        found = self._methods.get(name)
        if found is None:
            found = self._methods[name] = MethodMetrics(self, name)
        return found

    def serve(self, address: str) -> None:
        """Start the HTTP exporter on ``host:port`` (a daemon thread)."""
        host, _, port = address.rpartition(":")
        served = CollectorRegistry()
        served.register(self.registry)  # a registry is itself a collector
        served.register(REGISTRY)
        self._http, _ = start_http_server(int(port), addr=host or "0.0.0.0", registry=served)

    def close(self) -> None:
        """Stop the HTTP exporter, if one was started."""
        http: WSGIServer | None = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
            del self._http
