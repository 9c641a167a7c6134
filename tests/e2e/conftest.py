"""The real-cluster phase: one cluster per session (`csi_kit.testing.cluster`), drivers as node processes.

The driver is started the way the project's own DaemonSet would start it:
the args and env of ``examples/deploy/<backend>/daemonset.yaml`` with the
DaemonSet's host paths moved into the cluster's work directory, under a
token of the ServiceAccount that the project's ``rbac.yaml`` binds.  RBAC,
CSIDriver, StorageClass and VolumeSnapshotClass are applied unchanged.
Each walkthrough step's time is recorded and printed as a table at the end.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from csi_kit.testing.cluster import NODE_NAME, Cluster, binaries_dir, load_manifests, unavailable_reason

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "examples" / "deploy"
_TIMINGS: list[tuple[str, str, float]] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _TIMINGS:
        return
    tr = terminalreporter
    tr.section("real-cluster walkthrough: seconds per step")
    width = max(len(s) for s, _, _ in _TIMINGS)
    bwidth = max(len(b) for _, b, _ in _TIMINGS)
    tr.write_line(f"{'step':<{width}}  {'backend':<{bwidth}}  seconds")
    for step, backend, secs in _TIMINGS:
        tr.write_line(f"{step:<{width}}  {backend:<{bwidth}}  {secs:7.2f}")


@contextmanager
def timed(step: str, backend: str) -> Iterator[None]:
    """Record how long a walkthrough step took (printed at the end, never asserted)."""
    t = time.monotonic()
    yield
    _TIMINGS.append((step, backend, time.monotonic() - t))


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    reason = unavailable_reason(binaries_dir(REPO))
    if reason:
        pytest.skip(reason)
    # CSI_KIT_E2E_LOGS=DIR keeps every component's log (the work directory itself is removed).
    c = Cluster(binaries_dir(REPO), keep_logs=os.environ.get("CSI_KIT_E2E_LOGS"))
    t = time.monotonic()
    try:
        c.start()
        _TIMINGS.append(("cluster start", "-", time.monotonic() - t))
        yield c
    finally:
        t = time.monotonic()
        problems = c.stop()
        _TIMINGS.append(("cluster teardown", "-", time.monotonic() - t))
    assert not problems, problems


class Deployment:
    """A csi_kit driver running on the node as the project's DaemonSet describes it."""

    def __init__(
        self,
        cluster: Cluster,
        backend: str,
        controllers: str | None,
        health_port: int,
        extra_env: dict[str, str] | None = None,
        extra_manifests: tuple[str, ...] = (),
    ) -> None:
        self.cluster = cluster
        self.backend = backend
        self.namespace = f"csi-kit-{backend}"
        self.driver = f"{backend}.csi-kit.io"
        self.state_dir = cluster.work / "csi-kit" / backend
        self.data_dir = self.state_dir / "data"
        self.name = f"driver-{backend}"
        for f in (
            "rbac.yaml",
            "csidriver.yaml",
            "storageclass.yaml",
            "volumesnapshotclass.yaml",
            *extra_manifests,
        ):
            cluster.apply_file(DEPLOY / backend / f)
        self._apply_group_snapshot_manifests()
        (ds,) = load_manifests(DEPLOY / backend / "daemonset.yaml")
        container = ds["spec"]["template"]["spec"]["containers"][0]
        env: dict[str, str] = {}
        for e in container["env"]:
            env[e["name"]] = self._env_value(e, env)
        if controllers is not None:
            env["CSI_KIT_CONTROLLERS"] = controllers
        env["CSI_KIT_HEALTH_PORT"] = str(health_port)
        env.update(extra_env or {})
        env = {k: self._host_path(v) for k, v in env.items()}
        args = [self._host_path(a) for a in container["args"]]
        kubeconfig = cluster.kubeconfig(self.namespace, ds["spec"]["template"]["spec"]["serviceAccountName"])
        self.state_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "csi_kit.cli", *args, f"--kubeconfig={kubeconfig}", "--log-level=INFO"]
        cluster.spawn(self.name, argv, env)
        cluster.api.wait(
            f"/apis/storage.k8s.io/v1/csinodes/{NODE_NAME}",
            lambda n: n and any(d["name"] == self.driver for d in n["spec"].get("drivers") or []),
            f"{self.driver} registered with the kubelet",
            60,
        )

    def _apply_group_snapshot_manifests(self) -> None:
        """The group RBAC and class of examples/deploy/snapshot, bound to this deployment's ServiceAccount."""

        def edit(obj: dict[str, Any]) -> None:
            for s in obj.get("subjects", []):
                s["namespace"] = self.namespace
            if obj["kind"] == "VolumeGroupSnapshotClass":
                obj["metadata"]["name"] = f"csi-kit-{self.backend}-group"
                obj["driver"] = self.driver

        self.cluster.apply_file(DEPLOY / "snapshot" / "group-rbac.yaml", edit)

    def _env_value(self, e: dict[str, Any], earlier: dict[str, str]) -> str:
        """A container env entry as the kubelet resolves it: fieldRefs, then $(VAR) of earlier entries."""
        if "valueFrom" in e:
            field = e["valueFrom"]["fieldRef"]["fieldPath"]
            return {"spec.nodeName": NODE_NAME, "metadata.namespace": self.namespace}[field]
        value = str(e["value"])
        for k, v in earlier.items():
            value = value.replace(f"$({k})", v)
        return value

    def _host_path(self, value: str) -> str:
        """The DaemonSet's hostPath volumes, moved into the cluster's work directory."""
        value = value.replace("/var/lib/kubelet", str(self.cluster.kubelet_root))
        return value.replace("/var/lib/csi-kit", str(self.cluster.work / "csi-kit"))

    def stop(self) -> None:
        rc = self.cluster.terminate(self.name)
        assert rc == 0, f"{self.name} exited {rc}:\n{self.cluster.log(self.name)}"


class Deployments:
    """At most one csi_kit driver (and the upstream snapshot-controller) at a time: they share the node."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.current: tuple[object, ...] | None = None
        self.deployment: Deployment | None = None

    def get(
        self,
        backend: str,
        controllers: str | None = None,
        upstream_snapshot_controller: bool = False,
        extra_env: dict[str, str] | None = None,
        extra_manifests: tuple[str, ...] = (),
    ) -> Deployment:
        key = (backend, controllers, tuple(sorted((extra_env or {}).items())), extra_manifests)
        if self.current != key or self.deployment is None:
            self.close()
            if upstream_snapshot_controller:
                self.cluster.spawn(
                    "snapshot-controller",
                    [
                        str(self.cluster.work / "bin/snapshot-controller"),
                        f"--kubeconfig={self.cluster.work}/admin.kubeconfig",
                        "--leader-election=false",
                        "--enable-distributed-snapshotting",
                    ],
                )
            self.deployment = Deployment(self.cluster, backend, controllers, 9808, extra_env, extra_manifests)
            self.current = key
        return self.deployment

    def close(self) -> None:
        if self.deployment is not None:
            self.deployment.stop()
        self.cluster.terminate("snapshot-controller")
        self.deployment = self.current = None


@pytest.fixture(scope="session")
def deployments(cluster: Cluster) -> Iterator[Deployments]:
    d = Deployments(cluster)
    yield d
    d.close()
