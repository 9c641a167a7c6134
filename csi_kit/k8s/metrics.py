"""Prometheus metrics of the Kubernetes loops (one set per process, labelled by loop)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

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


@contextmanager
def timed(loop: str, operation: str) -> Iterator[None]:
    """Time one operation; the status label is `ok` or the exception class name."""
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
