"""The Kubernetes loops' API budget at the default QPS, on a real kube-apiserver (issue #16).

The measurements of ``k8s_budget.py`` (its `Bench`: start-up, requests per
snapshot and per claim, N claims → Bound, N snapshots → readyToUse,
deletion of all → gone), on a real one-node cluster from
`csi_kit.testing.cluster` (etcd, kube-apiserver 1.36.2 with an audit log,
kube-controller-manager as the binder, the scheduler and a kubelet, which the
harness always starts).  The loops run in this process exactly as the CLI
runs them: ``--controllers all``, the default QPS, ``--kubeconfig`` the
harness's admin kubeconfig, so the CLI's own lightkube client; a hostPath
driver runs as a process.  The asyncio loop runs in a thread that entered
the cluster's network namespace (the API server listens only there); the
benchmark's own creates, deletes and polls go through the harness's client,
which sends no User-Agent.

Requests are counted from the API server's audit log (Metadata level, one
line per request; a watch counted once): "ours" is every request whose
User-Agent is not the benchmark's (empty) and not a Kubernetes component's
(kube-controller-manager, kube-scheduler, kubelet, kube-apiserver).  The
table by User-Agent shows everyone.  The cluster and everything it made are
removed at the end.

    .venv/bin/python benchmarks/k8s_real_api.py [--objects 100] [--rounds 3]

Needs root and ../shared/k8s (or $CSI_KIT_K8S_BINARIES).  A script that
prints figures, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench import header
from k8s_budget import DRIVER, NS, AgentKey, Bench, Env, Key, Obj, options

from csi_kit.linux._libc import check_call, libc
from csi_kit.testing.cluster import NODE_NAME, Cluster, binaries_dir, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
_CLONE_NEWNET = 0x40000000
#: User-Agent prefixes of the cluster's own components: not ours.
COMPONENTS = ("kube-controller-manager/", "kube-scheduler/", "kubelet/", "kube-apiserver/", "kube-probe/")
BENCHMARK = "(none: the benchmark's own client)"


def is_ours(agent: str) -> bool:
    return bool(agent) and not agent.startswith(COMPONENTS)


class AuditLog:
    """Reads the API server's audit log as it grows: requests by User-Agent, and ours by (verb, plural)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        self.seen: set[str] = set()
        self.ours: Counter[Key] = Counter()
        self.by_agent: Counter[AgentKey] = Counter()

    def read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            if line.strip():
                self._event(json.loads(line))

    def _event(self, ev: dict[str, Any]) -> None:
        if ev.get("stage") not in ("ResponseStarted", "ResponseComplete"):
            return
        audit_id = str(ev.get("auditID"))
        if audit_id in self.seen:  # a watch's second line
            return
        self.seen.add(audit_id)
        agent = str(ev.get("userAgent") or "")
        verb = str(ev.get("verb"))
        ref = ev.get("objectRef") or {}
        if ref.get("subresource") == "status" and verb in ("update", "patch"):
            verb += "_status"
        plural = str(ref.get("resource") or "(non-resource) " + str(ev.get("requestURI", "")).split("?")[0])
        label = agent if is_ours(agent) else f"[not ours] {agent}" if agent else BENCHMARK
        self.by_agent[(label, verb, plural)] += 1
        if is_ours(agent):
            self.ours[(verb, plural)] += 1


def _path(res: Any, name: str = "") -> str:
    base = f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"
    if res.namespaced:
        base += f"/namespaces/{NS}"
    return f"{base}/{res.plural}" + (f"/{name}" if name else "")


class RealEnv(Env):
    title = "real kube-apiserver 1.36.2 (csi_kit.testing.cluster), binder: kube-controller-manager"
    poll = 0.2
    quiet_for = 1.5

    def __init__(self, cluster: Cluster) -> None:
        assert cluster.audit_log is not None
        self.api = cluster.api
        self.audit = AuditLog(cluster.audit_log)

    def connect(self) -> Callable[[argparse.Namespace], Any] | None:
        return None  # the CLI's own: lightkube with --kubeconfig

    async def create(self, obj: Obj) -> None:
        await asyncio.to_thread(self.api.create, obj)

    async def delete(self, res: Any, name: str) -> None:
        await asyncio.to_thread(self.api.delete, _path(res, name))

    async def items(self, res: Any) -> list[Obj]:
        got = await asyncio.to_thread(self.api.get, _path(res))
        return list(got.get("items") or [])

    def ours(self) -> Counter[Key]:
        self.audit.read()
        return Counter(self.audit.ours)

    def agents(self) -> Counter[AgentKey] | None:
        self.audit.read()
        return Counter(self.audit.by_agent)


def enter_netns(path: str) -> None:
    """Move the calling thread (and the threads it starts later) into the network namespace at `path`."""
    with open(path) as f:
        setns = libc().setns
        setns.argtypes = [ctypes.c_int, ctypes.c_int]
        check_call(setns(f.fileno(), _CLONE_NEWNET), "setns", path)


def main() -> int:
    args = options(__doc__ or "")
    reason = unavailable_reason(binaries_dir(REPO))
    if reason:
        print(f"k8s_real_api: cannot run a real cluster here: {reason}", file=sys.stderr)
        return 1
    header(f"k8s loops' API budget on a real kube-apiserver: {args.objects} objects, default QPS")
    from csi_kit.testing.driver import driver_process

    failure: list[BaseException] = []
    with Cluster(binaries_dir(REPO), audit=True, keep_logs=os.environ.get("CSI_KIT_BENCH_LOGS")) as cluster:
        state = cluster.work / "bench-driver"
        with driver_process(str(state), driver_name=DRIVER, node_id=NODE_NAME) as drv:
            extra = [
                f"--kubeconfig={cluster.work / 'admin.kubeconfig'}",
                # The kubelet of the cluster registers the driver, as on a node.
                f"--plugin-registry-dir={cluster.kubelet_root / 'plugins_registry'}",
                "--health-address=127.0.0.1",
                "--health-port=0",
            ]

            def worker() -> None:
                try:
                    enter_netns(cluster.netns)
                    env = RealEnv(cluster)
                    asyncio.run(Bench(env, drv.endpoint, extra, args.objects, args.rounds).run())
                except BaseException as e:  # reported by the main thread, after the cluster is gone
                    failure.append(e)

            t = threading.Thread(target=worker, name="bench", daemon=True)
            t.start()
            t.join()
    if failure:
        raise failure[0]
    return 0


if __name__ == "__main__":
    sys.exit(main())
