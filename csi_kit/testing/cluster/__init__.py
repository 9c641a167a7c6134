"""A real one-node Kubernetes cluster for tests (see `csi_kit.testing.cluster.cluster`)."""

from __future__ import annotations

from csi_kit.testing.cluster.cluster import (
    BUSYBOX_IMAGE,
    NODE_IP,
    NODE_NAME,
    ApiClient,
    ApiError,
    Cluster,
    binaries_dir,
    load_manifests,
    unavailable_reason,
)

__all__ = [
    "ApiError",
    "Cluster",
    "ApiClient",
    "binaries_dir",
    "unavailable_reason",
    "load_manifests",
    "BUSYBOX_IMAGE",
    "NODE_IP",
    "NODE_NAME",
]
