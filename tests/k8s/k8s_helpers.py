"""Helpers for the loop tests: objects a cluster user writes, waiting, running loops, and crashing them.

The set-ups several test modules share live here once: the snapshot a user
asks for (`request_snapshot`, `ready_snapshot`), loops run as tasks
(`run_tasks`, `stop_tasks`, `running`), a volume made on a real driver over
gRPC (`create_volume`), and the crash injector the recovery tests use
(`Crash`, with `as_user` for the writes it must not count).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc.aio
import yaml

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit.k8s.objects.resources import (
    PV,
    PVC,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CLASS,
    VOLUME_SNAPSHOT_CONTENT,
)
from csi_kit.k8s.runtime.api import ApiError, Obj, Resource
from csi_kit.k8s.runtime.controller import Loop
from csi_kit.k8s.runtime.csi import CSIClient
from csi_kit.k8s.snapshot.controller import SnapshotController
from csi_kit.k8s.snapshot.snapshotter import Snapshotter
from csi_kit.testing.fake_k8s import FakeKubeAPI

DRIVER = "scripted.csi-kit.io"
#: Set while a test writes as the cluster's user: such writes are never counted nor crashed.
USER = contextvars.ContextVar("user", default=False)
WRITES = {"create", "update", "update_status", "patch", "patch_status", "delete"}


async def eventually(pred: Callable[[], Any], what: str = "condition", limit: float = 120.0) -> Any:
    """Poll until `pred()` is truthy; the limit only bounds a hang, it is not what the test measures."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        v = pred()
        if v:
            return v
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def settle(api: FakeKubeAPI, rounds: int = 40, limit: float = 3.0) -> None:
    """Let the loops run until the API sees no new writes for a while (or `limit` seconds pass)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit

    def count() -> int:
        return sum(n for (verb, _), n in api.requests.items() if verb in WRITES)

    last = -1
    quiet = 0
    while quiet < rounds and loop.time() < deadline:
        await asyncio.sleep(0.005)
        now = count()
        quiet = quiet + 1 if now == last else 0
        last = now


async def make_volume(
    api: FakeKubeAPI,
    name: str = "data",
    ns: str = "default",
    *,
    bound: bool = True,
    driver: str = DRIVER,
    handle: str | None = None,
    node: str | None = None,
    labels: dict[str, str] | None = None,
) -> Obj:
    """A PVC (with `labels`), bound unless told otherwise to PV "pv-<name>" of `driver`
    (with `node`: a local volume on that node, as the provisioner makes it)."""
    pv_name = f"pv-{name}"
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if labels:
        meta["labels"] = dict(labels)
    pvc: Obj = {"metadata": meta, "spec": {"accessModes": ["ReadWriteOnce"]}}
    if bound:
        pvc["spec"]["volumeName"] = pv_name
    created = await api.create(PVC, pvc)
    if bound:
        spec: dict[str, Any] = {
            "csi": {"driver": driver, "volumeHandle": handle or f"vol-{name}"},
            "volumeMode": "Filesystem",
        }
        if node is not None:
            term = {
                "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]
            }
            spec["nodeAffinity"] = {"required": {"nodeSelectorTerms": [term]}}
        await api.create(PV, {"metadata": {"name": pv_name}, "spec": spec})
        created["status"] = {"phase": "Bound"}
        created = await api.update_status(PVC, created)
    return created


async def make_class(
    api: FakeKubeAPI,
    name: str = "csi-snap",
    *,
    policy: str = "Delete",
    default: bool = True,
    driver: str = DRIVER,
    **params: str,
) -> Obj:
    """A VolumeSnapshotClass of `driver` (the default class unless `default` is false)."""
    meta: dict[str, Any] = {"name": name}
    if default:
        meta["annotations"] = {"snapshot.storage.kubernetes.io/is-default-class": "true"}
    return await api.create(
        VOLUME_SNAPSHOT_CLASS,
        {"metadata": meta, "driver": driver, "deletionPolicy": policy, "parameters": dict(params)},
    )


async def make_snapshot(
    api: FakeKubeAPI, name: str = "snap", ns: str = "default", *, pvc: str = "data", cls: str | None = None
) -> Obj:
    spec: dict[str, Any] = {"source": {"persistentVolumeClaimName": pvc}}
    if cls:
        spec["volumeSnapshotClassName"] = cls
    return await api.create(VOLUME_SNAPSHOT, {"metadata": {"name": name, "namespace": ns}, "spec": spec})


async def request_snapshot(
    api: FakeKubeAPI, *, policy: str = "Delete", default: bool = True, **params: str
) -> Obj:
    """What a user writes to ask for a snapshot: bound PVC "data", a class, snapshot "snap"."""
    await make_volume(api)
    await make_class(api, policy=policy, default=default, **params)
    return await make_snapshot(api)


async def ready_snapshot(api: FakeKubeAPI, *, policy: str = "Delete") -> Obj:
    """`request_snapshot`, then wait until the loops made it ready."""
    snap = await request_snapshot(api, policy=policy)
    await eventually(lambda: is_ready(api), "snapshot ready")
    return snap


def snapshot(api: FakeKubeAPI, name: str = "snap", ns: str = "default") -> Obj | None:
    return api.peek(VOLUME_SNAPSHOT, name, ns)


def contents(api: FakeKubeAPI) -> list[Obj]:
    return api.objects(VOLUME_SNAPSHOT_CONTENT)


def is_ready(api: FakeKubeAPI, name: str = "snap", ns: str = "default") -> bool:
    s = snapshot(api, name, ns)
    return bool(s and (s.get("status") or {}).get("readyToUse") is True)


class Loops:
    """The controller and the snapshotter running as tasks; `restart()` kills and recreates both."""

    def __init__(self, api: FakeKubeAPI, endpoint: str, **kw: Any) -> None:
        self.api = api
        self.endpoint = endpoint
        self.kw = kw
        self.tasks: list[asyncio.Task[None]] = []
        self.client: CSIClient | None = None
        self.controller: SnapshotController | None = None
        self.snapshotter: Snapshotter | None = None

    async def start(self, *, controller: bool = True, snapshotter: bool = True) -> None:
        self.client = CSIClient(self.endpoint, timeout=5)
        fast = {"base_delay": 0.01, "max_delay": 0.05}
        if controller:
            self.controller = SnapshotController(self.api, **fast, **self.kw.get("controller", {}))
            self.tasks.append(asyncio.create_task(self.controller.run()))
            await self.controller.started.wait()
        if snapshotter:
            self.snapshotter = Snapshotter(
                self.api, self.client, DRIVER, **fast, **self.kw.get("snapshotter", {})
            )
            self.tasks.append(asyncio.create_task(self.snapshotter.run()))
            await self.snapshotter.started.wait()

    async def stop(self) -> None:
        await stop_tasks(self.tasks)
        self.tasks.clear()
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()


Waiter = Callable[..., Awaitable[Any]]


async def run_tasks(*loops: Loop) -> list[asyncio.Task[None]]:
    """Run each loop as a task and wait until each has started (its informers synced)."""
    tasks = [asyncio.create_task(lp.run()) for lp in loops]
    for lp in loops:
        await lp.started.wait()
    return tasks


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


@contextlib.asynccontextmanager
async def running(*loops: Loop) -> AsyncIterator[list[asyncio.Task[None]]]:
    """The loops run (started) for the body of the `async with`, and are cancelled after it."""
    tasks = await run_tasks(*loops)
    try:
        yield tasks
    finally:
        await stop_tasks(tasks)


async def as_user(fn: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
    """Writes a cluster user makes (never counted as, nor crashed like, the loops' writes)."""
    token = USER.set(True)
    try:
        return await fn(*args, **kw)
    finally:
        USER.reset(token)


class Crash:
    """Kill the loops right when they attempt their N-th write (the write does not happen).

    An API reactor: counts the loops' writes (not the user's) so a test can also
    learn how many writes a flow makes, with `at` beyond them.
    """

    def __init__(self, at: int) -> None:
        self.at = at
        self.writes = 0
        self.crashed = asyncio.Event()

    def __call__(self, verb: str, res: Resource, name: str, body: Obj | None) -> None:
        if verb not in WRITES or USER.get() or self.crashed.is_set():
            return
        self.writes += 1
        if self.writes == self.at:
            self.crashed.set()
            raise ApiError(503, "ServiceUnavailable", "process killed here")


class Restartable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class RestartOnCrash:
    """Waits for conditions; once `crash` has fired, the loops are killed and started again from nothing.

    The restart happens once, at the first wait after the crash, before the
    condition is looked at: what the loops do next comes from the API alone.
    """

    def __init__(self, loops: Restartable, crash: Crash) -> None:
        self.loops = loops
        self.crash = crash
        self.restarted = False

    async def until(self, pred: Callable[[], Any], what: str, limit: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            if self.crash.crashed.is_set() and not self.restarted:
                self.restarted = True
                await self.loops.stop()
                await self.loops.start()
            if pred():
                return
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)


async def create_volume(endpoint: str, name: str, *, from_snapshot: str | None = None) -> str:
    """CreateVolume (1 MiB, single-node writer) on a real driver, optionally from a snapshot; its id."""
    cap = pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
    )
    req = pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=1 << 20), volume_capabilities=[cap]
    )
    if from_snapshot is not None:
        req.volume_content_source.snapshot.snapshot_id = from_snapshot
    async with grpc.aio.insecure_channel(endpoint) as ch:
        r = await pbg.ControllerStub(ch).CreateVolume(req)
        return str(r.volume.volume_id)


#: The RBAC verb each FakeKubeAPI method needs.
RBAC_VERB = {
    "get": "get", "list": "list", "watch": "watch", "create": "create", "update": "update",
    "update_status": "update", "patch": "patch", "patch_status": "patch", "delete": "delete",
}  # fmt: skip


class Recording:
    """Passes every call to the fake API, noting (group, resource[/status], RBAC verb)."""

    def __init__(self, inner: FakeKubeAPI) -> None:
        self.inner = inner
        self.used: set[tuple[str, str, str]] = set()

    def _note(self, res: Resource, verb: str, status: bool = False) -> None:
        self.used.add((res.group, res.plural + ("/status" if status else ""), RBAC_VERB[verb]))

    async def get(self, res: Resource, *a: Any, **kw: Any) -> Any:
        self._note(res, "get")
        return await self.inner.get(res, *a, **kw)

    async def list(self, res: Resource, *a: Any, **kw: Any) -> Any:
        self._note(res, "list")
        return await self.inner.list(res, *a, **kw)

    async def watch(self, res: Resource, *a: Any, **kw: Any) -> AsyncIterator[Any]:
        self._note(res, "watch")
        async for ev in self.inner.watch(res, *a, **kw):
            yield ev

    async def create(self, res: Resource, *a: Any, **kw: Any) -> Any:
        self._note(res, "create")
        return await self.inner.create(res, *a, **kw)

    async def update(self, res: Resource, *a: Any, **kw: Any) -> Any:
        self._note(res, "update")
        return await self.inner.update(res, *a, **kw)

    async def update_status(self, res: Resource, *a: Any, **kw: Any) -> Any:
        self._note(res, "update", status=True)
        return await self.inner.update_status(res, *a, **kw)

    async def patch(self, res: Resource, *a: Any, status: bool = False, **kw: Any) -> Any:
        self._note(res, "patch", status=status)
        return await self.inner.patch(res, *a, status=status, **kw)

    async def delete(self, res: Resource, *a: Any, **kw: Any) -> Any:
        self._note(res, "delete")
        return await self.inner.delete(res, *a, **kw)


def parse(*argv: str) -> argparse.Namespace:
    """The loops' command-line options (`add_controller_options`) parsed from `argv`."""
    from csi_kit.k8s.cli import add_controller_options

    parser = argparse.ArgumentParser()
    add_controller_options(parser)
    return parser.parse_args(list(argv))


@contextlib.asynccontextmanager
async def cli_running(args: Any, endpoint: str, api: Any, *, limit: float = 10.0) -> AsyncIterator[None]:
    """`run_controllers(args)` over `api` for the body of the `async with`; then it is asked to
    stop and must end within `limit` seconds (a hang bound, not a measure)."""
    from csi_kit.k8s.cli import run_controllers

    stop = asyncio.Event()
    task = asyncio.create_task(run_controllers(args, endpoint, stop, connect=lambda a: api))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, limit)


def loop_context(args: Any, api: FakeKubeAPI, client: CSIClient, info: Any, namespace: str = "csi") -> Any:
    """What `run_controllers` hands the loop factories, over the fake API (no QPS limit)."""
    from csi_kit.k8s.registry import expand
    from csi_kit.k8s.runtime.clients import Clients
    from csi_kit.k8s.runtime.context import LoopContext

    return LoopContext(
        args=args,
        info=info,
        csi=client,
        csi_endpoint=client.endpoint,
        clients=Clients(api, qps=0, burst=0, events=args.events),
        namespace=namespace,
        stop=asyncio.Event(),
        named=expand(args.controllers or "")[1],
    )


SNAPSHOT_DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "examples" / "deploy" / "snapshot"


def manifest_docs() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object in examples/deploy/snapshot, by (kind, name)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for f in sorted(SNAPSHOT_DEPLOY.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            assert d["apiVersion"] and d["kind"] and d["metadata"]["name"], f
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}  # fmt: skip


async def http_get(port: int, path: str = "/healthz", method: str = "GET") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.31\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body
