"""A real one-node Kubernetes cluster for tests: control plane, kubelet, containerd.

The in-memory fake API and the kubelet simulator agree with csi_kit because
they were written with it; this harness runs the real components instead, so
a driver built on csi_kit can be driven by a real kubelet through real pods::

    with Cluster(binaries_dir()) as cluster:
        cluster.apply_file("examples/deploy/hostpath/rbac.yaml")
        driver = cluster.spawn("driver", ["csi-kit", "serve", ...])
        cluster.api.create({"apiVersion": "v1", "kind": "Pod", ...})

What runs, all as plain processes of the harness: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler (v1.36 binaries from ``shared/k8s``,
decompressed into the work directory, never into the repository), containerd
with runc, and a kubelet.  Everything lives in a network namespace and a mount
namespace of the harness's own, held open by a ``sleep`` process and entered
with ``nsenter -m -n``:

- network: a veth pair with both ends inside the namespace carries the node
  address (the kernel may lack ``dummy``; the kubelet refuses loopback).  No
  route leaves the namespace, no name is ever resolved (empty resolv.conf,
  ``--hostname-override``/``--node-ip``), pods use ``hostNetwork``.  The
  harness itself reaches the API server through sockets opened from a thread
  that entered the namespace (`_netns_socket`);
- mounts: tmpfs over ``/run`` and ``/var/log`` (containerd's shim sockets and
  the kubelet's log links have fixed paths), the kubelet root bind-mounted
  rshared, and three files bound over ``/proc/sys`` entries so the kubelet's
  ``protectKernelDefaults`` check passes without changing the machine's values;
- cgroups (v1, cgroupfs driver): a ``cgroupRoot`` of the run's own;
- images: a busybox image and a pause image (``sleep``) built here from the
  static busybox as a docker archive and imported with ``ctr``; pods use
  ``imagePullPolicy: Never``.

Certificates (a CA, the API server's and kubelet's serving certificates, client
certificates, the service-account key) are made with ``openssl``.  Teardown
(`Cluster.stop`, also on failure, SIGINT and SIGTERM) kills every process in
the namespace and in the cgroup root, unmounts, detaches loop devices whose
backing file is in the work directory, removes the cgroups and the work
directory, and says what it could not undo.  `unavailable_reason` tells a
test suite why it must skip (not root, binaries or tools missing).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.client
import io
import json
import lzma
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from csi_kit.linux._libc import check_call, libc
from csi_kit.linux.run import Result, run

__all__ = ["ApiError", "Cluster", "ApiClient", "binaries_dir", "unavailable_reason", "BUSYBOX_IMAGE"]

COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "snapshot-controller")
TOOLS = (
    "etcd",
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "ctr",
    "busybox",
    "openssl",
    "nsenter",
    "unshare",
    "ip",
)
BUSYBOX_IMAGE = "localhost/csi-kit-e2e/busybox:1"
PAUSE_IMAGE = "localhost/csi-kit-e2e/pause:1"
NODE_NAME = "csi-kit-node"
NODE_IP = "10.213.0.2"
PEER_IP = "10.213.0.3"
SERVICE_CIDR = "10.213.128.0/24"
API_PORT = 6443
KUBELET_PORT = 10250
# Values the kubelet's protectKernelDefaults demands, bound over /proc/sys inside
# the mount namespace only: the machine's own settings never change.
_SYSCTLS = {"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}
_CLONE_NEWNET = 0x40000000


def binaries_dir(repo: str | os.PathLike[str] | None = None) -> Path:
    """``$CSI_KIT_K8S_BINARIES``, else ``<repo>/../shared/k8s`` (the repository holding this file)."""
    env = os.environ.get("CSI_KIT_K8S_BINARIES")
    if env:
        return Path(env)
    root = Path(repo) if repo is not None else Path(__file__).resolve().parents[3]
    return root.parent / "shared" / "k8s"


def unavailable_reason(binaries: Path | None = None) -> str | None:
    """Why a real cluster cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "a real cluster needs root (namespaces, mounts, cgroups)"
    b = binaries or binaries_dir()
    missing = [c for c in COMPONENTS if not (b / f"{c}.xz").is_file()]
    if missing:
        return f"no Kubernetes binaries in {b} ({', '.join(missing)}); set CSI_KIT_K8S_BINARIES"
    tools = [t for t in TOOLS if shutil.which(t) is None]
    if tools:
        return "missing tools: " + ", ".join(tools) + " (Debian: etcd-server containerd runc busybox-static)"
    if not (b / "crd").is_dir():
        return f"no snapshot CRDs in {b / 'crd'}"
    return None


class ApiError(Exception):
    """A non-2xx answer from the API server or the kubelet."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status


def _netns_socket(netns: str, address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection opened inside the network namespace at path `netns`.

    The namespace is per thread: a short-lived thread enters it and connects;
    the socket stays in the namespace it was made in, the caller's thread never moves.
    """
    out: list[socket.socket | BaseException] = []

    def connect() -> None:
        try:
            with open(netns) as f:
                setns = libc().setns
                setns.argtypes = [ctypes.c_int, ctypes.c_int]
                check_call(setns(f.fileno(), _CLONE_NEWNET), "setns", netns)
            out.append(socket.create_connection(address, timeout=timeout))
        except BaseException as e:  # handed to the caller's thread
            out.append(e)

    t = threading.Thread(target=connect, name="netns-connect")
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


class _NetnsHTTPS(http.client.HTTPSConnection):
    def __init__(self, netns: str, host: str, port: int, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self._netns = netns
        self._ctx = context

    def connect(self) -> None:
        raw = _netns_socket(self._netns, (self.host, self.port), self.timeout or 30.0)
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


def load_manifests(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The objects of a YAML file (several documents allowed; empty ones skipped)."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _tar_add(tar: tarfile.TarFile, name: str, *, data: bytes | None = None, link: str | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    if link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
    elif data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = len(data), 0o755
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def build_images(busybox: str, out: str) -> None:
    """A docker-archive tarball with `BUSYBOX_IMAGE` and `PAUSE_IMAGE`, one shared layer.

    The layer is the static busybox with a link per applet; the pause image
    just sleeps (as PID 1 it ignores SIGTERM: containerd stops sandboxes with SIGKILL).
    """
    applets = run([busybox, "--list"]).stdout.split()
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.USTAR_FORMAT) as layer:
        for d in ("bin/", "tmp/", "etc/", "data/"):
            _tar_add(layer, d)
        with open(busybox, "rb") as f:
            _tar_add(layer, "bin/busybox", data=f.read())
        for a in applets:
            if a != "busybox" and "/" not in a:
                _tar_add(layer, f"bin/{a}", link="busybox")
    layer_bytes = layer_buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    manifest = []
    with tarfile.open(out, "w") as archive:
        _tar_add(archive, "layer.tar", data=layer_bytes)
        for tag, entry in ((BUSYBOX_IMAGE, None), (PAUSE_IMAGE, ["/bin/sleep", "2147483647"])):
            config = {
                "architecture": arch,
                "os": "linux",
                "config": {"Env": ["PATH=/bin"], "Entrypoint": entry, "Cmd": None if entry else ["sh"]},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }
            raw = json.dumps(config).encode()
            name = hashlib.sha256(raw).hexdigest() + ".json"
            _tar_add(archive, name, data=raw)
            manifest.append({"Config": name, "RepoTags": [tag], "Layers": ["layer.tar"]})
        _tar_add(archive, "manifest.json", data=json.dumps(manifest).encode())


def _kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
) -> Path:
    user: dict[str, str] = (
        {"token": token} if token else {"client-certificate": str(cert), "client-key": str(key)}
    )
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "e2e", "user": user}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
        "current-context": "e2e",
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


class Cluster:
    """A one-node cluster in namespaces of its own; `start` brings it up, `stop` removes every trace.

    Use it as a context manager.  ``api`` is an admin client; `spawn` runs any
    process on the node (inside both namespaces); `kubeconfig` makes a
    ServiceAccount's kubeconfig for a driver.
    """

    def __init__(self, binaries: Path, *, workdir: str | None = None, keep_logs: str | None = None) -> None:
        self.binaries = binaries
        self.keep_logs = keep_logs
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
    def api(self) -> ApiClient:
        assert self._api is not None, "the cluster is not started"
        return self._api

    def kubelet(self) -> ApiClient:
        """A client for the kubelet's own API (/stats/summary, /metrics) as the admin."""
        return ApiClient(
            self.netns,
            NODE_IP,
            KUBELET_PORT,
            str(self.pki / "ca.crt"),
            str(self.pki / "admin.crt"),
            str(self.pki / "admin.key"),
        )

    def start(self) -> None:
        """Bring up every component and wait until the node is Ready with the snapshot CRDs installed."""
        self._trap_signals()
        for d in (self.kubelet_root, self.pki, self.logs, self.work / "bin"):
            d.mkdir(parents=True, exist_ok=True)
        unpack = threading.Thread(target=self._unpack_binaries)
        unpack.start()
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "--", "sleep", "2147483647"],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._make_pki()
        self._wait_holder()
        self._setup_namespaces()
        self._spawn_etcd()
        unpack.join()
        if not (self.work / "bin" / "kubelet").exists():
            raise RuntimeError(f"could not decompress the Kubernetes binaries from {self.binaries}")
        self._spawn_apiserver()
        self._api = ApiClient(
            self.netns,
            NODE_IP,
            API_PORT,
            str(self.pki / "ca.crt"),
            str(self.pki / "admin.crt"),
            str(self.pki / "admin.key"),
        )
        self._spawn_containerd()
        self._wait(lambda: self.api.raw("GET", "/readyz") == b"ok", "kube-apiserver /readyz", 90)
        kc = str(self.work / "admin.kubeconfig")
        self.spawn(
            "kube-controller-manager",
            [
                str(self.work / "bin/kube-controller-manager"),
                f"--kubeconfig={kc}",
                "--leader-elect=false",
                f"--service-account-private-key-file={self.pki}/sa.key",
                f"--root-ca-file={self.pki}/ca.crt",
                "--use-service-account-credentials=false",
            ],
        )
        self.spawn(
            "kube-scheduler",
            [str(self.work / "bin/kube-scheduler"), f"--kubeconfig={kc}", "--leader-elect=false"],
        )
        self._import_images()
        self._spawn_kubelet()
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
            self._kill_namespace_and_cgroups()
            if self.holder is not None and self.holder.poll() is None:
                problems += self._unmount_all()
                problems += self._detach_loops()
                self.holder.kill()
                self.holder.wait()
            problems += self._remove_cgroups()
            if self.keep_logs and self.logs.is_dir():
                shutil.copytree(self.logs, self.keep_logs, dirs_exist_ok=True)
            problems += self._detach_loops()
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
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--net", "--", *argv]

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
        return _kubeconfig(out, f"https://{NODE_IP}:{API_PORT}", self.pki / "ca.crt", token=token)

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

    def _wait_holder(self) -> None:
        assert self.holder is not None
        mine = os.readlink("/proc/self/ns/net")
        for _ in range(200):
            with contextlib.suppress(OSError):
                if os.readlink(self.netns) != mine:
                    return
            time.sleep(0.01)
        raise RuntimeError("the namespace holder did not enter its namespaces")

    def _make_pki(self) -> None:
        p = self.pki
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        run(
            [
                "openssl",
                "req",
                "-x509",
                *ec,
                "-keyout",
                f"{p}/ca.key",
                "-out",
                f"{p}/ca.crt",
                "-days",
                "7",
                "-subj",
                "/CN=csi-kit-e2e-ca",
            ]
        )
        san = f"subjectAltName=IP:{NODE_IP},IP:127.0.0.1,IP:{SERVICE_CIDR.split('/')[0][:-1]}1,DNS:kubernetes"
        certs = {  # file: (subject, extension)
            "apiserver": ("/CN=kube-apiserver", san),
            "kubelet-serving": (f"/CN=system:node:{NODE_NAME}", f"subjectAltName=IP:{NODE_IP}"),
            "admin": ("/O=system:masters/CN=csi-kit-e2e-admin", None),
            "kubelet": (f"/O=system:nodes/CN=system:node:{NODE_NAME}", None),
        }
        for name, (subj, ext) in certs.items():
            run(
                [
                    "openssl",
                    "req",
                    "-new",
                    *ec,
                    "-keyout",
                    f"{p}/{name}.key",
                    "-out",
                    f"{p}/{name}.csr",
                    "-subj",
                    subj,
                    *(["-addext", ext] if ext else []),
                ]
            )
            run(
                [
                    "openssl",
                    "x509",
                    "-req",
                    "-in",
                    f"{p}/{name}.csr",
                    "-CA",
                    f"{p}/ca.crt",
                    "-CAkey",
                    f"{p}/ca.key",
                    "-CAcreateserial",
                    "-days",
                    "7",
                    "-copy_extensions",
                    "copy",
                    "-out",
                    f"{p}/{name}.crt",
                ]
            )
        run(
            [
                "openssl",
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                f"{p}/sa.key",
            ]
        )
        run(["openssl", "pkey", "-in", f"{p}/sa.key", "-pubout", "-out", f"{p}/sa.pub"])
        server = f"https://{NODE_IP}:{API_PORT}"
        _kubeconfig(
            self.work / "admin.kubeconfig", server, p / "ca.crt", cert=p / "admin.crt", key=p / "admin.key"
        )
        _kubeconfig(
            self.work / "kubelet.kubeconfig",
            server,
            p / "ca.crt",
            cert=p / "kubelet.crt",
            key=p / "kubelet.key",
        )

    def _setup_namespaces(self) -> None:
        w = self.work
        sysctl_dir = w / "sysctl"
        sysctl_dir.mkdir()
        steps = [
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", "e2e0", "type", "veth", "peer", "name", "e2e1"],
            ["ip", "addr", "add", f"{NODE_IP}/24", "dev", "e2e0"],
            ["ip", "addr", "add", f"{PEER_IP}/24", "dev", "e2e1"],
            ["ip", "link", "set", "e2e0", "up"],
            ["ip", "link", "set", "e2e1", "up"],
            ["mount", "-t", "tmpfs", "-o", "mode=755", "csi-kit-e2e-run", "/run"],
            ["mount", "-t", "tmpfs", "-o", "mode=755", "csi-kit-e2e-log", "/var/log"],
            ["mount", "--bind", str(self.kubelet_root), str(self.kubelet_root)],
            ["mount", "--make-rshared", str(self.kubelet_root)],
        ]
        for key, value in _SYSCTLS.items():
            f = sysctl_dir / key.replace("/", ".")
            f.write_text(value + "\n")
            steps.append(["mount", "--bind", "-o", "ro", str(f), f"/proc/sys/{key}"])
        for argv in steps:
            self.run(argv)
        for hierarchy in _cgroup_mounts():
            os.makedirs(hierarchy + self.cgroup_root, exist_ok=True)
        (w / "resolv.conf").write_text("")
        (w / "cni/net.d").mkdir(parents=True)
        (w / "cni/bin").mkdir()
        (w / "cni/net.d/10-lo.conf").write_text('{"cniVersion": "0.4.0", "name": "lo", "type": "loopback"}\n')

    def _spawn_etcd(self) -> None:
        url = "http://127.0.0.1:2379"
        self.spawn(
            "etcd",
            [
                "etcd",
                "--name=e2e",
                f"--data-dir={self.work}/etcd",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=e2e=http://127.0.0.1:2380",
                "--log-level=warn",
            ],
        )

    def _spawn_apiserver(self) -> None:
        p = self.pki
        self.spawn(
            "kube-apiserver",
            [
                str(self.work / "bin/kube-apiserver"),
                "--etcd-servers=http://127.0.0.1:2379",
                f"--bind-address={NODE_IP}",
                f"--advertise-address={NODE_IP}",
                f"--secure-port={API_PORT}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                f"--client-ca-file={p}/ca.crt",
                f"--tls-cert-file={p}/apiserver.crt",
                f"--tls-private-key-file={p}/apiserver.key",
                f"--service-account-key-file={p}/sa.pub",
                f"--service-account-signing-key-file={p}/sa.key",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--api-audiences=https://kubernetes.default.svc",
                f"--kubelet-client-certificate={p}/admin.crt",
                f"--kubelet-client-key={p}/admin.key",
                f"--kubelet-certificate-authority={p}/ca.crt",
                "--kubelet-preferred-address-types=InternalIP",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                "--profiling=false",
                "--enable-priority-and-fairness=false",
                "--endpoint-reconciler-type=none",
            ],
        )

    def _spawn_containerd(self) -> None:
        w = self.work
        config = f"""version = 2
root = "{w}/containerd/root"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{w}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{w}/cni/bin"
    conf_dir = "{w}/cni/net.d"
"""
        (w / "containerd.toml").write_text(config)
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

    def _spawn_kubelet(self) -> None:
        p, w = self.pki, self.work
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "protectKernelDefaults": True,
            "address": NODE_IP,
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "tlsCertFile": f"{p}/kubelet-serving.crt",
            "tlsPrivateKeyFile": f"{p}/kubelet-serving.key",
            "authentication": {
                "x509": {"clientCAFile": f"{p}/ca.crt"},
                "webhook": {"enabled": True},
                "anonymous": {"enabled": False},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{w}/containerd.sock",
            "resolvConf": f"{w}/resolv.conf",
            "failSwapOn": False,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            # The volume stats the kubelet reports (and asks the driver for): every 10 s, not every minute.
            "volumeStatsAggPeriod": "10s",
            "syncFrequency": "10s",
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
        }
        (w / "kubelet.yaml").write_text(yaml.safe_dump(config))
        self.spawn(
            "kubelet",
            [
                str(w / "bin/kubelet"),
                f"--config={w}/kubelet.yaml",
                f"--kubeconfig={w}/kubelet.kubeconfig",
                f"--root-dir={self.kubelet_root}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=2",
            ],
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

    def _namespace_pids(self) -> set[int]:
        """Every process in our network namespace or our cgroups, but the holder."""
        if self.holder is None:
            return set()
        pids: set[int] = set()
        try:
            ns = os.readlink(self.netns)
        except OSError:
            ns = None
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.holder.pid:
                with contextlib.suppress(OSError):
                    if ns and os.readlink(f"/proc/{entry}/ns/net") == ns:
                        pids.add(int(entry))
        for hierarchy in _cgroup_mounts():
            for dirpath, _, files in os.walk(hierarchy + self.cgroup_root):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as f:
                        pids.update(int(x) for x in f.read().split())
        return pids

    def _kill_namespace_and_cgroups(self) -> None:
        for _ in range(50):
            pids = self._namespace_pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def _unmount_all(self) -> list[str]:
        """Unmount, deepest first, what this namespace mounted under the work directory."""
        assert self.holder is not None
        mine = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
        targets = []
        for line in Path(f"/proc/{self.holder.pid}/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(str(self.work)) or point not in mine:
                targets.append(point)
        problems = []
        for point in reversed(targets):
            r = self.run(["umount", "-l", point], check=False)
            if r.returncode and "not mounted" not in r.stderr:
                problems.append(f"umount {point}: {r.stderr.strip()}")
        return problems

    def _detach_loops(self) -> list[str]:
        problems = []
        for dev in os.listdir("/sys/block"):
            try:
                backing = Path(f"/sys/block/{dev}/loop/backing_file").read_text().strip()
            except OSError:
                continue
            if backing.startswith(str(self.work)):
                r = run(["losetup", "-d", f"/dev/{dev}"], check=False)
                if r.returncode:
                    problems.append(f"losetup -d /dev/{dev} ({backing}): {r.stderr.strip()}")
        return problems

    def _remove_cgroups(self) -> list[str]:
        problems = []
        for hierarchy in _cgroup_mounts():
            top = hierarchy + self.cgroup_root
            for dirpath, _, _ in sorted(os.walk(top), key=lambda t: -t[0].count("/")):
                for _ in range(20):
                    try:
                        os.rmdir(dirpath)
                        break
                    except FileNotFoundError:
                        break
                    except OSError:  # a process still exiting
                        time.sleep(0.1)
                else:
                    problems.append(f"cgroup {dirpath} could not be removed")
        return problems


def _cgroup_mounts() -> list[str]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if parts[2] in ("cgroup", "cgroup2"):
            out.append(parts[1])
    return out


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
