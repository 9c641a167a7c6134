"""The Kubernetes loops' API budget at the default QPS, on the fake API (issue #16): before and after.

Every loop runs exactly as the CLI runs it: options from
`csi_kit.k8s.cli.add_controller_options` (``--controllers all``, no QPS
option, so the defaults), then `run_controllers` with ``connect`` handing it
the in-memory `FakeKubeAPI`, against a real hostPath driver process.  The
fake has no PV controller: the binder stand-in of the loop tests
(`ClusterSim`, tests/k8s/volume_peer.py) binds claims and releases volumes,
and its requests are counted apart, as are the benchmark's own (the user's
creates and deletes): "our" requests are only the loops'.

Measured, in order:

1. start-up: a claim is created before `run_controllers` is called; the time
   until its PV exists is the first loop's first sync (no public hook says
   when each loop's informers synced), and the time of the last start-up list
   or watch request (sampled every 10 ms) is when the last informer started;
   the number of list and watch requests until the loops are quiet;
2. requests per snapshot (create → readyToUse → deleted) and per claim
   (provisioned → bound → deleted → PV gone), one at a time (``--rounds``);
3. N claims (Immediate StorageClass) → Bound: wall time;
4. N VolumeSnapshots, one per claim → readyToUse: wall time, requests;
5. deletion of the N snapshots and N claims → all gone (snapshots, contents,
   claims, PVs, and the backend's volumes and snapshots): wall time.

Requests by User-Agent are printed when the fake records them
(``requests_by_agent``).  The core (`Bench`) is shared with
``k8s_real_api.py``, which runs the same measurements on a real API server.

    .venv/bin/python benchmarks/k8s_budget.py [--objects 100] [--rounds 3]

A script that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import importlib
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _bench import Client, header  # noqa: E402

from csi_kit._pb import csi_pb2 as pb  # noqa: E402
from csi_kit.k8s.cli import add_controller_options, run_controllers  # noqa: E402

DRIVER = "hostpath.csi-kit.io"
NS = "default"
CLASS = "csi-kit-bench"
PROBE = "bench-probe"
WRITES = ("create", "update", "update_status", "patch", "patch_status", "delete")
Obj = dict[str, Any]
Key = tuple[str, str]  # (verb, plural), as FakeKubeAPI.requests counts
AgentKey = tuple[str, str, str]  # (User-Agent, verb, plural)
NO_AGENT = "(no agent: the benchmark's own requests, ClusterSim's, any untagged one)"


def _resources() -> dict[str, Any]:
    """The resource constants, wherever the runtime rewrite has put them."""
    names = (
        "PV",
        "PVC",
        "STORAGE_CLASS",
        "VOLUME_SNAPSHOT",
        "VOLUME_SNAPSHOT_CONTENT",
        "VOLUME_SNAPSHOT_CLASS",
    )
    modules = (
        "csi_kit.k8s.objects.resources",
        "csi_kit.k8s.runtime.api",
        "csi_kit.k8s.volume.protocol",
        "csi_kit.k8s.snapshot.protocol",
        "csi_kit.k8s.api",
    )
    found: dict[str, Any] = {}
    for mod in modules:
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        for n in names:
            if n not in found and hasattr(m, n):
                found[n] = getattr(m, n)
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"k8s_budget: resource constants not found: {', '.join(missing)}")
    return found


R = _resources()
PV, PVC, STORAGE_CLASS = R["PV"], R["PVC"], R["STORAGE_CLASS"]
VS, VSC, VS_CLASS = R["VOLUME_SNAPSHOT"], R["VOLUME_SNAPSHOT_CONTENT"], R["VOLUME_SNAPSHOT_CLASS"]


def controller_args(extra: list[str]) -> argparse.Namespace:
    """The loops' options exactly as the CLI parses them, environment defaults left out."""
    for k in [k for k in os.environ if k.startswith("CSI_KIT_")]:
        del os.environ[k]  # the defaults are what is measured, not this shell's settings
    parser = argparse.ArgumentParser()
    add_controller_options(parser)
    return parser.parse_args(["--controllers", "all", *extra])


# ------------------------------------------------------------------ objects


def _obj(res: Any, name: str, **fields: Any) -> Obj:
    meta: Obj = {"name": name}
    if res.namespaced:
        meta["namespace"] = NS
    return {"apiVersion": res.api_version, "kind": res.kind, "metadata": meta, **fields}


def storage_class() -> Obj:
    return _obj(
        STORAGE_CLASS, CLASS, provisioner=DRIVER, reclaimPolicy="Delete", volumeBindingMode="Immediate"
    )


def snapshot_class() -> Obj:
    return _obj(VS_CLASS, CLASS, driver=DRIVER, deletionPolicy="Delete")


def claim(name: str) -> Obj:
    spec = {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": CLASS,
        "resources": {"requests": {"storage": "1Mi"}},
    }
    return _obj(PVC, name, spec=spec)


def snapshot(name: str, pvc: str) -> Obj:
    return _obj(
        VS, name, spec={"volumeSnapshotClassName": CLASS, "source": {"persistentVolumeClaimName": pvc}}
    )


def _name(o: Obj) -> str:
    return str(o["metadata"]["name"])


def is_bound(o: Obj) -> bool:
    return (o.get("status") or {}).get("phase") == "Bound"


def is_ready(o: Obj) -> bool:
    return (o.get("status") or {}).get("readyToUse") is True


def ours_pv(o: Obj) -> bool:
    return ((o.get("spec") or {}).get("csi") or {}).get("driver") == DRIVER


# ------------------------------------------------------------------ environment


class Env:
    """Where the loops run and how requests are counted; `FakeEnv` here, `RealEnv` in k8s_real_api.py."""

    title = ""
    poll = 0.05  # seconds between two looks at the objects
    quiet_for = 1.0  # no request of ours for this long: the loops are idle

    def connect(self) -> Callable[[argparse.Namespace], Any] | None:
        """The `connect` handed to run_controllers (None: the CLI's own, lightkube)."""
        raise NotImplementedError

    async def create(self, obj: Obj) -> None:
        raise NotImplementedError

    async def delete(self, res: Any, name: str) -> None:
        raise NotImplementedError

    async def items(self, res: Any) -> list[Obj]:
        raise NotImplementedError

    def ours(self) -> Counter[Key]:
        """Every request our loops made so far, by (verb, plural)."""
        raise NotImplementedError

    def agents(self) -> Counter[AgentKey] | None:
        """Every request so far by (User-Agent, verb, plural) (None: the API does not record agents)."""
        raise NotImplementedError


class _ByVerb:
    """Delegates to the fake API and counts by (verb, plural): what the binder stand-in costs."""

    def __init__(self, inner: Any, into: Counter[Key]) -> None:
        self._inner = inner
        self._into = into

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self._inner, attr)
        if attr not in ("get", "list", "watch", "create", "update", "update_status", "patch", "delete"):
            return target

        def call(res: Any, *a: Any, **kw: Any) -> Any:
            verb = "patch_status" if attr == "patch" and kw.get("status") else attr
            self._into[(verb, res.plural)] += 1
            return target(res, *a, **kw)

        return call


def _cluster_sim() -> Any:
    """The loop tests' binder stand-in, wherever the tests' reorganisation has put it."""
    found = sorted(glob.glob(os.path.join(REPO, "tests", "**", "volume_peer.py"), recursive=True))
    if not found:
        raise SystemExit("k8s_budget: tests/**/volume_peer.py (ClusterSim) not found")
    sys.path.insert(0, os.path.dirname(found[0]))
    return importlib.import_module("volume_peer").ClusterSim


class FakeEnv(Env):
    title = "fake API (csi_kit.testing.fake_k8s.FakeKubeAPI), binder: ClusterSim"
    poll = 0.02
    quiet_for = 0.5

    def __init__(self) -> None:
        from csi_kit.testing.fake_k8s import FakeKubeAPI

        self.fake = FakeKubeAPI(history=1_000_000)
        self.user: Counter[Key] = Counter()
        self.sim_requests: Counter[Key] = Counter()
        self.sim = _cluster_sim()(_ByVerb(self.fake, self.sim_requests))

    def connect(self) -> Callable[[argparse.Namespace], Any]:
        return lambda a: self.fake

    async def create(self, obj: Obj) -> None:
        res = next(r for r in (PV, PVC, STORAGE_CLASS, VS, VSC, VS_CLASS) if r.kind == obj["kind"])
        self.user[("create", res.plural)] += 1
        await self.fake.create(res, obj)

    async def delete(self, res: Any, name: str) -> None:
        self.user[("delete", res.plural)] += 1
        await self.fake.delete(res, name, NS if res.namespaced else None)

    async def items(self, res: Any) -> list[Obj]:
        return list(self.fake.view(res))

    def ours(self) -> Counter[Key]:
        c = Counter(self.fake.requests)
        c.subtract(self.user)
        c.subtract(self.sim_requests)
        return +c

    def agents(self) -> Counter[AgentKey] | None:
        by_agent = getattr(self.fake, "requests_by_agent", None)
        if by_agent is None:
            return None
        out: Counter[AgentKey] = Counter()
        for key, n in dict(by_agent).items():
            agent, verb, plural = key if isinstance(key, tuple) and len(key) == 3 else (str(key), "?", "?")
            out[(agent or NO_AGENT, verb, plural)] += n
        return out


# ------------------------------------------------------------------ the measurements


def _delta(after: Counter[Key], before: Counter[Key]) -> Counter[Key]:
    d = Counter(after)
    d.subtract(before)
    return +d


def _summary(c: Counter[Key], per: float = 1.0) -> str:
    total = sum(c.values()) / per
    writes = sum(n for (v, p), n in c.items() if v in WRITES and p != "events") / per
    gets = sum(n for (v, _), n in c.items() if v == "get") / per
    events = sum(n for (_, p), n in c.items() if p == "events") / per
    lw = sum(n for (v, _), n in c.items() if v in ("list", "watch")) / per
    return f"{total:.1f} ({writes:.1f} writes, {gets:.1f} GETs, {events:.1f} Events, {lw:.1f} list/watch)"


def _table(c: Counter[Key], per: float = 1.0, indent: str = "      ") -> None:
    for (verb, plural), n in sorted(c.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{indent}{n / per:7.2f}  {verb:13s} {plural}")


class Bench:
    """The measurements of the module docstring, on any `Env`."""

    def __init__(self, env: Env, endpoint: str, extra_args: list[str], objects: int, rounds: int) -> None:
        self.env = env
        self.endpoint = endpoint
        self.args = controller_args(extra_args)
        self.n = objects
        self.rounds = rounds
        self.rows: list[tuple[str, str, str]] = []
        self.phase_agents: list[tuple[str, Counter[AgentKey]]] = []
        self.grpc = Client(endpoint)

    # -- waiting

    async def until(self, what: str, check: Callable[[], Awaitable[bool]], limit: float = 1800.0) -> None:
        deadline = time.monotonic() + limit
        while not await check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not reached in {limit:g} s: {what}")
            await asyncio.sleep(self.env.poll)

    async def quiet(self) -> Counter[Key]:
        """Wait until the loops made no request for `Env.quiet_for` seconds; their count so far."""
        last = self.env.ours()
        since = time.monotonic()
        while time.monotonic() - since < self.env.quiet_for:
            await asyncio.sleep(self.env.poll)
            now = self.env.ours()
            if now != last:
                last, since = now, time.monotonic()
        return last

    async def count(self, res: Any, pred: Callable[[Obj], bool] = lambda o: True) -> int:
        return sum(1 for o in await self.env.items(res) if pred(o))

    def backend_left(self) -> tuple[int | None, int | None]:
        """The driver's volumes and snapshots (None: the driver does not list them)."""
        out: list[int | None] = []
        for call, req, field in (
            (self.grpc.controller.ListVolumes, pb.ListVolumesRequest, "entries"),
            (self.grpc.controller.ListSnapshots, pb.ListSnapshotsRequest, "entries"),
        ):
            n, token = 0, ""
            try:
                while True:
                    resp = call(req(starting_token=token), timeout=30)
                    n += len(getattr(resp, field))
                    token = resp.next_token
                    if not token:
                        break
                out.append(n)
            except grpc.RpcError:
                out.append(None)
        return out[0], out[1]

    def agents_since(self, before: Counter[AgentKey] | None) -> Counter[AgentKey] | None:
        now = self.env.agents()
        if now is None:
            return None
        d = Counter(now)
        d.subtract(before or Counter())
        return +d

    # -- phases

    async def run(self) -> None:
        env = self.env
        print(f"-- {env.title}")
        print(
            f"   run_controllers(--controllers all), QPS {self.args.kube_api_qps:g} / burst "
            f"{self.args.kube_api_burst} (the defaults), {self.args.k8s_workers} workers, events "
            f"{'on' if self.args.events else 'off'}; {self.n} objects"
        )
        sys.stdout.flush()
        await env.create(storage_class())
        await env.create(snapshot_class())
        await env.create(claim(PROBE))
        stop = asyncio.Event()
        agents0 = env.agents()
        base = env.ours()
        t0 = time.monotonic()
        connect = env.connect()
        kw = {"connect": connect} if connect is not None else {}
        task = asyncio.create_task(run_controllers(self.args, self.endpoint, stop, **kw))
        try:
            await self._phases(task, base, t0, agents0)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 60)
            self.grpc.close()
        self._report()

    async def _phases(self, task: asyncio.Task[None], base: Counter[Key], t0: float, agents0: Any) -> None:
        env = self.env
        # 1. start-up
        last_lw = [0.0]

        def lw() -> int:
            return sum(n for (v, _), n in _delta(env.ours(), base).items() if v in ("list", "watch"))

        async def sample() -> None:
            seen = 0
            while True:
                now = lw()
                if now != seen:
                    seen, last_lw[0] = now, time.monotonic() - t0
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())

        async def probe_provisioned() -> bool:
            if task.done():
                task.result()  # run_controllers ended: say why
                raise RuntimeError("run_controllers returned before the first sync")
            return any(
                ((o.get("spec") or {}).get("claimRef") or {}).get("name") == PROBE
                for o in await env.items(PV)
            )

        await self.until("the probe claim's PV", probe_provisioned, 300)
        first = time.monotonic() - t0
        await self.until("the probe claim bound", self._bound(PROBE), 300)
        startup = _delta(await self.quiet(), base)
        sampler.cancel()
        lists = sum(n for (v, _), n in startup.items() if v == "list")
        watches = sum(n for (v, _), n in startup.items() if v == "watch")
        print("-- 1. start-up (run_controllers called at t=0)")
        print(f"   first sync: the probe claim's PV created at {first:.2f} s (the first loop acted)")
        print(f"   last start-up list/watch request at {last_lw[0]:.2f} s (every informer started by then)")
        print(f"   start-up requests until idle: {lists} lists, {watches} watches, all: {_summary(startup)}")
        _table(startup)
        self.rows.append(("start-up: first claim provisioned", f"{first:.2f} s", ""))
        self.rows.append(("start-up: last informer list/watch", f"{last_lw[0]:.2f} s", "first sync ≤ 1 s"))
        self.rows.append(("start-up list / watch requests", f"{lists} / {watches}", ""))
        self._agents("start-up", agents0)

        # 2. one at a time
        await self._per_snapshot()
        await self._per_claim()
        await self.env.delete(PVC, PROBE)
        await self.until("the probe claim and its PV gone", self._claims_gone({PROBE}))
        await self.quiet()

        # 3. N claims → Bound
        n = self.n
        names = [f"bench-{i:04d}" for i in range(n)]
        before, agents = await self.quiet(), env.agents()
        t = time.monotonic()
        await asyncio.gather(*(env.create(claim(x)) for x in names))
        await self.until(f"{n} claims Bound", lambda: self._all(PVC, is_bound, n))
        bound = time.monotonic() - t
        now = await self.quiet()
        d = _delta(now, before)
        print(f"-- 3. {n} claims (Immediate) → Bound: {bound:.1f} s; requests {_summary(d, n)} per claim")
        _table(d, n)
        self.rows.append((f"{n} PVCs → Bound", f"{bound:.1f} s", "the binder's pace"))
        self._agents(f"{n} PVCs → Bound", agents)

        # 4. N snapshots → readyToUse
        before, agents = now, env.agents()
        t = time.monotonic()
        await asyncio.gather(*(env.create(snapshot(f"snap-{x}", x)) for x in names))
        await self.until(f"{n} snapshots readyToUse", lambda: self._all(VS, is_ready, n))
        ready = time.monotonic() - t
        now = await self.quiet()
        d = _delta(now, before)
        print(
            f"-- 4. {n} VolumeSnapshots → readyToUse: {ready:.1f} s; requests {_summary(d, n)} per snapshot"
        )
        _table(d, n)
        self.rows.append((f"{n} VolumeSnapshots → readyToUse", f"{ready:.1f} s", "≤ 40 s"))
        self._agents(f"{n} VolumeSnapshots → readyToUse", agents)

        # 5. delete all → gone
        before, agents = now, env.agents()
        t = time.monotonic()
        await asyncio.gather(*(env.delete(VS, f"snap-{x}") for x in names))
        await asyncio.gather(*(env.delete(PVC, x) for x in names))

        async def all_gone() -> bool:
            for res in (VS, VSC, PVC):
                if await self.count(res):
                    return False
            if await self.count(PV, ours_pv):
                return False
            vols, snaps = await asyncio.to_thread(self.backend_left)
            return not vols and not snaps

        await self.until("every snapshot, content, claim, PV and backend volume gone", all_gone)
        gone = time.monotonic() - t
        d = _delta(await self.quiet(), before)
        print(f"-- 5. delete {n} snapshots + {n} claims → all gone: {gone:.1f} s; requests {_summary(d)}")
        _table(d)
        self.rows.append((f"delete {n} snapshots + {n} PVCs → gone", f"{gone:.1f} s", "≤ 30 s"))
        self._agents("deletion", agents)
        self._agents("whole run", agents0)

    def _bound(self, name: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return any(_name(o) == name and is_bound(o) for o in await self.env.items(PVC))

        return check

    def _claims_gone(self, names: set[str]) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            if any(_name(o) in names for o in await self.env.items(PVC)):
                return False
            pvs = await self.env.items(PV)
            return not any(((o.get("spec") or {}).get("claimRef") or {}).get("name") in names for o in pvs)

        return check

    async def _all(self, res: Any, pred: Callable[[Obj], bool], n: int) -> bool:
        return await self.count(res, pred) >= n

    async def _per_snapshot(self) -> None:
        create: Counter[Key] = Counter()
        delete: Counter[Key] = Counter()
        for i in range(self.rounds):
            name = f"count-{i}"
            c0 = await self.quiet()
            await self.env.create(snapshot(name, PROBE))

            async def ready(name: str = name) -> bool:
                return any(_name(o) == name and is_ready(o) for o in await self.env.items(VS))

            await self.until(f"snapshot {name} ready", ready)
            c1 = await self.quiet()
            await self.env.delete(VS, name)

            async def gone() -> bool:
                return not await self.count(VS) and not await self.count(VSC)

            await self.until(f"snapshot {name} and its content gone", gone)
            c2 = await self.quiet()
            create += _delta(c1, c0)
            delete += _delta(c2, c1)
        r = self.rounds
        both = create + delete
        print(f"-- 2. one at a time, mean of {r}")
        print(f"   requests per snapshot, create → readyToUse: {_summary(create, r)}")
        _table(create, r)
        print(f"   requests per snapshot, deletion: {_summary(delete, r)}")
        _table(delete, r)
        print(f"   requests per snapshot lifecycle: {_summary(both, r)}")
        self.rows.append(("requests per snapshot (create → ready → deleted)", _summary(both, r), "≤ 12"))

    async def _per_claim(self) -> None:
        create: Counter[Key] = Counter()
        delete: Counter[Key] = Counter()
        for i in range(self.rounds):
            name = f"count-pvc-{i}"
            c0 = await self.quiet()
            await self.env.create(claim(name))
            await self.until(f"claim {name} bound", self._bound(name))
            c1 = await self.quiet()
            await self.env.delete(PVC, name)
            await self.until(f"claim {name} and its PV gone", self._claims_gone({name}))
            c2 = await self.quiet()
            create += _delta(c1, c0)
            delete += _delta(c2, c1)
        r = self.rounds
        print(f"   requests per claim, provision → bound: {_summary(create, r)}")
        _table(create, r)
        print(f"   requests per claim, deletion → PV gone: {_summary(delete, r)}")
        _table(delete, r)
        self.rows.append(("requests per PVC (provision + delete)", _summary(create + delete, r), ""))

    def _agents(self, phase: str, before: Counter[AgentKey] | None) -> None:
        d = self.agents_since(before)
        if d is not None:
            self.phase_agents.append((phase, d))

    def _report(self) -> None:
        print("-- requests by User-Agent")
        if not self.phase_agents:
            print("   not recorded by this API (no requests_by_agent)")
        for phase, d in self.phase_agents:
            by: Counter[str] = Counter()
            for (agent, _, _), n in d.items():
                by[agent] += n
            print(f"   {phase}: {sum(d.values())}")
            for agent, n in sorted(by.items(), key=lambda kv: (-kv[1], kv[0])):
                print(f"      {n:6d}  {agent}")
        if self.phase_agents:
            phase, d = self.phase_agents[-1]
            print(f"   {phase}, by agent, verb and kind:")
            for agent in sorted({a for a, _, _ in d}):
                print(f"      {agent}")
                _table(Counter({(v, p): n for (a, v, p), n in d.items() if a == agent}), indent="        ")
        print("-- summary")
        w0 = max(len(r[0]) for r in self.rows)
        w1 = max(len(r[1]) for r in self.rows)
        print(f"   {'measurement':<{w0}}  {'figure':<{w1}}  target (issue #16)")
        for a, b, c in self.rows:
            print(f"   {a:<{w0}}  {b:<{w1}}  {c}")
        sys.stdout.flush()


async def run_fake(args: argparse.Namespace) -> None:
    from csi_kit.testing.driver import driver_process

    header(f"k8s loops' API budget on the fake API: {args.objects} objects, default QPS")
    with (
        tempfile.TemporaryDirectory(prefix="csi-kit-bench-budget-") as tmp,
        driver_process(os.path.join(tmp, "driver"), driver_name=DRIVER) as drv,
    ):
        env = FakeEnv()
        sim_task = asyncio.create_task(env.sim.run())
        await env.sim.started.wait()
        extra = [
            f"--plugin-registry-dir={tmp}",  # the registration service's socket: not the host kubelet's
            "--health-address=127.0.0.1",
            "--health-port=0",
        ]
        try:
            await Bench(env, drv.endpoint, extra, args.objects, args.rounds).run()
        finally:
            sim_task.cancel()
            await asyncio.gather(sim_task, return_exceptions=True)


def options(doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--objects", type=int, default=100, help="claims and snapshots in the bulk phases")
    p.add_argument("--rounds", type=int, default=3, help="one-at-a-time rounds for requests per object")
    a = p.parse_args()
    if a.objects < 1 or a.rounds < 1:
        p.error("--objects and --rounds must be at least 1")
    return a


if __name__ == "__main__":
    asyncio.run(run_fake(options(__doc__ or "")))
