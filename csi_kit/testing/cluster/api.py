"""Talking to the API server (or the kubelet) from the harness: HTTPS and JSON, no kubectl.

`ApiClient` is a small JSON client authenticated by a client certificate;
its connections are opened inside the cluster's network namespace
(`csi_kit.testing.cluster.netns.netns_socket`), so the caller's thread never
changes namespace.  `object_path` knows each kind's REST path (which kinds
are cluster-scoped); `load_manifests` reads a YAML file's objects.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from csi_kit.testing.cluster.netns import netns_socket

__all__ = ["ApiError", "ApiClient", "object_path", "load_manifests"]


class ApiError(Exception):
    """A non-2xx answer from the API server or the kubelet."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status


class _NetnsHTTPS(http.client.HTTPSConnection):
    def __init__(self, netns: str, host: str, port: int, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self._netns = netns
        self._ctx = context

    def connect(self) -> None:
        raw = netns_socket(self._netns, (self.host, self.port), self.timeout or 30.0)
        self.sock = self._ctx.wrap_socket(raw, server_hostname=self.host)


def _plural(kind: str) -> str:
    low = kind.lower()
    return low + ("es" if low.endswith("s") else "s")


_CLUSTER_SCOPED = {
    "Namespace",
    "Node",
    "PersistentVolume",
    "ClusterRole",
    "ClusterRoleBinding",
    "CSIDriver",
    "CSINode",
    "StorageClass",
    "CustomResourceDefinition",
    "VolumeSnapshotClass",
    "VolumeSnapshotContent",
    "VolumeGroupSnapshotClass",
    "VolumeGroupSnapshotContent",
    "VolumeAttachment",
    "VolumeAttributesClass",
    "SnapshotMetadataService",
}


def object_path(obj: Mapping[str, Any], *, name: bool = True) -> str:
    """The REST path of a manifest's object (its collection when `name` is False)."""
    api_version, kind, meta = obj["apiVersion"], obj["kind"], obj.get("metadata", {})
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if kind not in _CLUSTER_SCOPED:
        base += f"/namespaces/{meta.get('namespace', 'default')}"
    base += "/" + _plural(kind)
    return f"{base}/{meta['name']}" if name else base


def load_manifests(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The objects of a YAML file (several documents allowed; empty ones skipped)."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


class ApiClient:
    """A small JSON client for the API server (or the kubelet) over HTTPS with a client certificate."""

    def __init__(self, netns: str, host: str, port: int, ca: str, cert: str, key: str) -> None:
        self._addr = (netns, host, port)
        self._ctx = ssl.create_default_context(cafile=ca)
        self._ctx.load_cert_chain(cert, key)

    def raw(
        self, method: str, path: str, body: Any = None, *, content_type: str = "application/json"
    ) -> bytes:
        """One request; 429 (storage initialising) and refused connections are retried for 30 s."""
        data = None if body is None else json.dumps(body).encode()
        deadline = time.monotonic() + 30
        while True:
            conn = _NetnsHTTPS(*self._addr, context=self._ctx, timeout=30)
            try:
                conn.request(method, path, body=data, headers={"Content-Type": content_type})
                resp = conn.getresponse()
                payload = resp.read()
            except (ConnectionRefusedError, ConnectionResetError) as e:
                if time.monotonic() > deadline:
                    raise ApiError(0, method, path, str(e)) from None
                time.sleep(0.3)
                continue
            finally:
                conn.close()
            if resp.status == 429 and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            if resp.status >= 300:
                raise ApiError(resp.status, method, path, payload.decode(errors="replace"))
            return payload

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        return json.loads(self.raw(method, path, body, **kw) or b"null")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def find(self, path: str) -> Any:
        """GET, or None when the object does not exist."""
        try:
            return self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def create(self, obj: Mapping[str, Any]) -> Any:
        return self.request("POST", object_path(obj, name=False), obj)

    def apply(self, obj: Mapping[str, Any]) -> Any:
        """Create, or replace when it exists (the way ``kubectl apply`` ends for our manifests)."""
        try:
            return self.create(obj)
        except ApiError as e:
            if e.status != 409:
                raise
        current = self.get(object_path(obj))
        body = dict(
            obj, metadata=dict(obj["metadata"], resourceVersion=current["metadata"]["resourceVersion"])
        )
        return self.request("PUT", object_path(obj), body)

    def patch(self, path: str, patch: Any) -> Any:
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete(self, path: str) -> None:
        try:
            self.request("DELETE", path)
        except ApiError as e:
            if e.status != 404:
                raise

    def wait(self, path: str, ready: Callable[[Any], Any], what: str, timeout: float = 120.0) -> Any:
        """Poll `path` until ``ready(obj)`` is truthy (``obj`` is None while it does not exist)."""
        deadline = time.monotonic() + timeout
        while True:
            obj = self.find(path)
            if ready(obj):
                return obj
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what}: not reached in {timeout:g} s; last state: {json.dumps(obj)[:2000]}"
                )
            time.sleep(0.2)
