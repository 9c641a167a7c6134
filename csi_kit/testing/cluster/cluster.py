"""`Cluster`: a one-node cluster brought up from the parts of this package, and removed.

`Cluster.start` orders the work (binaries decompressed in a thread while the
certificates are made and the namespaces set up; etcd, the API server,
containerd, the controller manager, the scheduler, the images, the kubelet;
then the snapshot CRDs, and a wait for the node to be Ready).  Teardown
(`Cluster.stop`, also on failure, SIGINT and SIGTERM) kills every process in
the namespace and in the cgroup root, unmounts, detaches loop devices whose
backing file is in the work directory, removes the cgroups and the work
directory, and says what it could not undo.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from csi_kit.linux.run import Result, run
from csi_kit.testing.cluster import components, netns, teardown
from csi_kit.testing.cluster.api import ApiClient, ApiError, load_manifests
from csi_kit.testing.cluster.images import build_images
from csi_kit.testing.cluster.node import API_PORT, KUBELET_PORT, NODE_IP, NODE_NAME
from csi_kit.testing.cluster.pki import make_pki, write_kubeconfig
from csi_kit.testing.cluster.requirements import COMPONENTS, binaries_dir

__all__ = ["Cluster", "running_cluster"]


class Cluster:
    """A one-node cluster in namespaces of its own; `start` brings it up, `stop` removes every trace.

    Use it as a context manager.  ``api`` is an admin client; `spawn` runs any
    process on the node (inside both namespaces); `kubeconfig` makes a
    ServiceAccount's kubeconfig for a driver.  ``audit=True`` makes the API
    server keep an audit log (`audit_log`): what the benchmarks count
    requests per user agent from; off by default.
    """

    def __init__(
        self,
        binaries: Path,
        *,
        workdir: str | None = None,
        keep_logs: str | None = None,
        audit: bool = False,
    ) -> None:
        self.binaries = binaries
        self.keep_logs = keep_logs
        self.audit = audit
        self.work = Path(workdir or tempfile.mkdtemp(prefix="csi-kit-e2e-"))
        self.cgroup_root = f"/{self.work.name}"
        self.kubelet_root = self.work / "kubelet"
        self.pki = self.work / "pki"
        self.logs = self.work / "logs"
        self.holder: subprocess.Popen[bytes] | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._api: ApiClient | None = None
        self._old_handlers: dict[int, Any] = {}

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def netns(self) -> str:
        assert self.holder is not None
        return f"/proc/{self.holder.pid}/ns/net"

    @property
    def audit_log(self) -> Path | None:
        """The API server's audit log (JSON lines, one per request; see `components.audit_policy`), if on."""
        return self.logs / "audit.log" if self.audit else None

    @property
    def api(self) -> ApiClient:
        assert self._api is not None, "the cluster is not started"
        return self._api

    def kubelet(self) -> ApiClient:
        """A client for the kubelet's own API (/stats/summary, /metrics) as the admin."""
        return self._admin_client(KUBELET_PORT)

    def start(self) -> None:
        """Bring up every component and wait until the node is Ready with the snapshot CRDs installed."""
        self._trap_signals()
        for d in (self.kubelet_root, self.pki, self.logs, self.work / "bin"):
            d.mkdir(parents=True, exist_ok=True)
        unpack = threading.Thread(target=self._unpack_binaries)
        unpack.start()
        self.holder = netns.start_holder()
        make_pki(self.pki, self.work)
        netns.wait_holder(self.netns)
        netns.setup_namespaces(self.run, self.work, self.kubelet_root, self.cgroup_root)
        self.spawn("etcd", components.etcd_argv(self.work))
        unpack.join()
        if not (self.work / "bin" / "kubelet").exists():
            raise RuntimeError(f"could not decompress the Kubernetes binaries from {self.binaries}")
        if self.audit:
            (self.work / "audit-policy.yaml").write_text(yaml.safe_dump(components.audit_policy()))
        self.spawn("kube-apiserver", components.apiserver_argv(self.work, self.pki, audit=self.audit))
        self._api = self._admin_client(API_PORT)
        self._spawn_containerd()
        self._wait(lambda: self.api.raw("GET", "/readyz") == b"ok", "kube-apiserver /readyz", 90)
        self.spawn("kube-controller-manager", components.controller_manager_argv(self.work, self.pki))
        self.spawn("kube-scheduler", components.scheduler_argv(self.work))
        self._import_images()
        (self.work / "kubelet.yaml").write_text(
            yaml.safe_dump(components.kubelet_config(self.work, self.pki, self.cgroup_root))
        )
        self.spawn("kubelet", components.kubelet_argv(self.work, self.kubelet_root))
        for crd in sorted((self.binaries / "crd").glob("*.yaml")):
            for obj in load_manifests(crd):
                self.api.apply(obj)
        self._wait_crds()
        self.api.wait(f"/api/v1/nodes/{NODE_NAME}", _node_ready, "node Ready", 120)
        self.api.wait(
            "/api/v1/namespaces/default/serviceaccounts/default", bool, "default ServiceAccount", 60
        )

    def stop(self) -> list[str]:
        """Remove everything the cluster made; returns what could not be undone (also printed)."""
        problems: list[str] = []
        try:
            for name in reversed(list(self.procs)):  # graceful first: the driver drains, kubelet stops
                self._terminate(name, grace=5 if name not in ("etcd",) else 10)
            if self.holder is not None:
                teardown.kill_namespace_and_cgroups(self.holder.pid, self.netns, self.cgroup_root)
            if self.holder is not None and self.holder.poll() is None:
                problems += teardown.unmount_all(self.holder.pid, self.work, self.run)
                problems += teardown.detach_loops(self.work)
                self.holder.kill()
                self.holder.wait()
            problems += teardown.remove_cgroups(self.cgroup_root)
            if self.keep_logs and self.logs.is_dir():
                shutil.copytree(self.logs, self.keep_logs, dirs_exist_ok=True)
            problems += teardown.detach_loops(self.work)
            if any(str(self.work) in line for line in Path("/proc/self/mountinfo").read_text().splitlines()):
                problems.append(f"mounts under {self.work} are still visible; work directory left in place")
            else:
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            self._restore_signals()
        for p in problems:
            print(f"cluster teardown: {p}")
        return problems

    # -- processes ---------------------------------------------------------------

    def nsenter(self, argv: Iterable[str]) -> list[str]:
        assert self.holder is not None
        return netns.nsenter(self.holder.pid, argv)

    def run(self, argv: Iterable[str], **kw: Any) -> Result:
        """Run a command inside the namespaces and wait for it."""
        return run(self.nsenter(argv), **kw)

    def spawn(
        self, name: str, argv: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process inside the namespaces, logging to ``logs/<name>.log``."""
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        child_env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LC_ALL": "C",
            **(env or {}),
        }
        proc = subprocess.Popen(
            self.nsenter(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
            cwd=self.work,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str, tail: int = 6000) -> str:
        """The end of a spawned process's log."""
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def terminate(self, name: str) -> int | None:
        """SIGTERM a spawned process (SIGKILL after 20 s); its exit status."""
        return self._terminate(name, grace=20)

    def kubeconfig(self, namespace: str, service_account: str) -> Path:
        """A kubeconfig holding a fresh token of a ServiceAccount (TokenRequest), as a pod would get."""
        req = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 86400},
        }
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"
        token = self.api.request("POST", path, req)["status"]["token"]
        out = self.work / f"{namespace}.{service_account}.kubeconfig"
        return write_kubeconfig(out, self.pki / "ca.crt", token=token)

    def apply_file(
        self, path: str | os.PathLike[str], edit: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        """Apply every object of a manifest file, each passed through `edit` first."""
        for obj in load_manifests(path):
            if edit:
                edit(obj)
            self.api.apply(obj)

    def pod_log(self, namespace: str, pod: str) -> str:
        return self.api.raw("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}/log").decode(errors="replace")

    # -- internals ---------------------------------------------------------------

    def _admin_client(self, port: int) -> ApiClient:
        """An admin (``system:masters``) client for a port on the node address."""
        return ApiClient(
            self.netns,
            NODE_IP,
            port,
            str(self.pki / "ca.crt"),
            str(self.pki / "admin.crt"),
            str(self.pki / "admin.key"),
        )

    def _terminate(self, name: str, grace: float) -> int | None:
        proc = self.procs.get(name)
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        del self.procs[name]
        return proc.returncode

    def _wait(self, check: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited ({proc.returncode}) while waiting for {what}:\n{self.log(name)}"
                    )
            try:
                if check():
                    return
            except (OSError, ApiError) as e:
                last = e
            time.sleep(0.3)
        raise TimeoutError(f"{what} not ready after {timeout:g} s (last error: {last})")

    def _trap_signals(self) -> None:
        """SIGTERM/SIGHUP unwind like ^C, so `stop` runs (from pytest's teardown or the ``with``)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, interrupt)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _unpack_binaries(self) -> None:
        for name in COMPONENTS:
            out = self.work / "bin" / name
            with lzma.open(self.binaries / f"{name}.xz") as src, open(f"{out}.part", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.chmod(f"{out}.part", 0o755)
            os.rename(f"{out}.part", out)

    def _spawn_containerd(self) -> None:
        w = self.work
        (w / "containerd.toml").write_text(components.containerd_config(w))
        self.spawn("containerd", ["containerd", f"--config={w}/containerd.toml"])
        ctr = ["ctr", f"--address={w}/containerd.sock"]
        self._wait(lambda: self.run([*ctr, "version"], check=False).returncode == 0, "containerd", 60)

    def _import_images(self) -> None:
        archive = self.work / "images.tar"
        build_images(shutil.which("busybox") or "/bin/busybox", str(archive))
        self.run(
            [
                "ctr",
                f"--address={self.work}/containerd.sock",
                "-n",
                "k8s.io",
                "images",
                "import",
                str(archive),
            ]
        )

    def _wait_crds(self) -> None:
        for crd in (self.binaries / "crd").glob("*.yaml"):
            name = load_manifests(crd)[0]["metadata"]["name"]
            self.api.wait(
                f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}",
                _crd_established,
                f"CRD {name}",
                60,
            )


def _node_ready(node: Any) -> bool:
    conds = (node or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _crd_established(crd: Any) -> bool:
    conds = (crd or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Established" and c["status"] == "True" for c in conds)


@contextlib.contextmanager
def running_cluster(binaries: Path | None = None) -> Iterator[Cluster]:
    """A started `Cluster`, stopped at the end whatever happens."""
    with Cluster(binaries or binaries_dir()) as cluster:
        yield cluster
