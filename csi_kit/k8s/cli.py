"""Command-line hooks for the Kubernetes loops, called by `csi_kit.cli`.

`add_controller_options` adds the options (each with a `CSI_KIT_<NAME>`
environment default, the way a Deployment usually configures a container):
the ones every loop shares here, each loop's own from `k8s/registry.py`.
`run_controllers` connects to the driver over CSI, discovers what it can do,
builds the selected loops through their registry factories -- one CSI
client, one `Clients` (a budget and User-Agent per loop, shared informers,
one Events path) for all -- and runs each under its own Lease when leader
election is on, until told to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from csi_kit.k8s import registry
from csi_kit.k8s.registry import CONTROLLERS
from csi_kit.k8s.runtime import metrics
from csi_kit.k8s.runtime.api import KubeAPI
from csi_kit.k8s.runtime.clients import Clients
from csi_kit.k8s.runtime.context import LoopContext, Planned
from csi_kit.k8s.runtime.csi import CSICallError, CSIClient, DriverInfo
from csi_kit.k8s.runtime.leader import LeaderElector
from csi_kit.k8s.runtime.options import deprecated_alias
from csi_kit.k8s.runtime.options import env as _env
from csi_kit.k8s.runtime.options import env_bool as _env_bool

__all__ = ["CONTROLLERS", "add_controller_options", "run_controllers", "selected"]

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _default_namespace() -> str:
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def add_controller_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Kubernetes loops")
    g.add_argument(
        "--controllers",
        default=_env("controllers", ""),
        help="comma list of loops to run: snapshot (= snapshot-controller + snapshotter), "
        "group-snapshot (= group-snapshot-controller + group-snapshotter), "
        + ", ".join(e.name for e in registry.LOOPS)
        + ", all (= "
        + ", ".join(CONTROLLERS["all"])
        + "); empty runs none",
    )
    g.add_argument(
        "--kubeconfig",
        default=_env("kubeconfig", None),
        help="kubeconfig file; in-cluster service account when not given",
    )
    g.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("leader-election", False),
        help="run each loop only while holding its Lease (needed with more than one replica)",
    )
    g.add_argument("--leader-election-namespace", default=_env("leader-election-namespace", None))
    g.add_argument(
        "--leader-election-identity", default=_env("leader-election-identity", socket.gethostname())
    )
    g.add_argument(
        "--leader-election-lease-duration",
        type=float,
        default=float(_env("leader-election-lease-duration", 15)),
    )
    g.add_argument(
        "--leader-election-renew-deadline",
        type=float,
        default=float(_env("leader-election-renew-deadline", 10)),
    )
    g.add_argument(
        "--leader-election-retry-period", type=float, default=float(_env("leader-election-retry-period", 5))
    )
    g.add_argument(
        "--kube-api-qps",
        type=float,
        default=float(_env("kube-api-qps", 5)),
        help="client-side request rate limit of each loop, as of each upstream sidecar (0 lifts it)",
    )
    g.add_argument("--kube-api-burst", type=int, default=int(_env("kube-api-burst", 10)))
    g.add_argument(
        "--node-deployment",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("node-deployment", False),
        help="per-node mode: the snapshotter handles only contents labelled for --node-name",
    )
    g.add_argument("--node-name", default=_env("node-name", os.environ.get("NODE_NAME")))
    g.add_argument(
        "--distributed-snapshotting",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("distributed-snapshotting", False),
        help="snapshot-controller labels contents with the node of their local volume",
    )
    g.add_argument(
        "--extra-create-metadata",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("extra-create-metadata", False),
        help="pass the VolumeSnapshot/VolumeSnapshotContent names to CreateSnapshot as parameters",
    )
    g.add_argument(
        "--snapshot-name-prefix",
        default=_env("snapshot-name-prefix", "snapshot"),
        help="prefix of the CreateSnapshot name (<prefix>-<VolumeSnapshot UID>), as upstream",
    )
    g.add_argument(
        "--snapshot-name-uuid-length",
        type=int,
        default=int(_env("snapshot-name-uuid-length", -1)),
        help="truncate the UID in CreateSnapshot names to this length (-1: whole UID)",
    )
    g.add_argument(
        "--events",
        action=argparse.BooleanOptionalAction,
        # One switch for every loop, on like the upstream sidecars; the volume
        # loops' old --k8s-events (and CSI_KIT_K8S_EVENTS) is a deprecated alias.
        default=_env_bool("events", _env_bool("k8s-events", True)),
        help="record Kubernetes Events as the upstream sidecars do (own budget; needs events create, patch)",
    )
    g.add_argument(
        "--k8s-events",
        dest="events",
        action=deprecated_alias("--events / --no-events"),
        default=argparse.SUPPRESS,
        help="deprecated alias of --events",
    )
    g.add_argument("--resync-period", type=float, default=float(_env("resync-period", 900)), help="seconds")
    g.add_argument(
        "--k8s-workers",
        type=int,
        default=int(_env("k8s-workers", 10)),
        help="concurrent syncs per work queue",
    )
    g.add_argument("--retry-interval-start", type=float, default=float(_env("retry-interval-start", 1)))
    g.add_argument("--retry-interval-max", type=float, default=float(_env("retry-interval-max", 300)))
    g.add_argument(
        "--csi-timeout", type=float, default=float(_env("csi-timeout", 60)), help="seconds per CSI call"
    )
    registry.add_options(g)


def _port(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return host, port


def _check_ports(args: argparse.Namespace, wanted: set[str]) -> None:
    """--metrics-address and the liveness endpoint must not want the same port."""
    address = getattr(args, "metrics_address", "") or ""
    if "liveness" not in wanted or not address:
        return
    host, port = _port(address)
    health_host = str(getattr(args, "health_address", "") or "")
    wildcard = {"", "0.0.0.0", "::", "[::]"}
    same_host = host in wildcard or health_host in wildcard or host == health_host
    if same_host and port == str(args.health_port):
        raise ValueError(
            f"--metrics-address {address} and the liveness endpoint (--health-port {args.health_port}) "
            "want the same port; give one of them another (docs/metrics.md)"
        )


def selected(args: argparse.Namespace) -> set[str]:
    """The loops `--controllers` selects (groups expanded); ValueError for an unknown name or a port clash."""
    out, _ = registry.expand(args.controllers or "")
    _check_ports(args, out)
    return out


async def _discover(client: CSIClient, stop: asyncio.Event) -> DriverInfo | None:
    """Wait for the driver to answer (it may still be starting), as the sidecars do."""
    while not stop.is_set():
        try:
            return await client.driver_info()
        except CSICallError as e:
            log.info("waiting for the CSI driver at %s: %s", client.endpoint, e)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    return None


def _connect(args: argparse.Namespace) -> KubeAPI:
    from csi_kit.k8s.runtime.lightkube import LightkubeAPI

    return LightkubeAPI.connect(args.kubeconfig)


async def run_controllers(
    args: argparse.Namespace,
    csi_endpoint: str,
    stop: asyncio.Event,
    *,
    connect: Callable[[argparse.Namespace], KubeAPI] = _connect,
) -> None:
    """Run the loops selected by `args` against the driver at `csi_endpoint` until `stop` is set.

    `connect` builds an API client (the lightkube adapter by default; tests
    pass the fake).  It is called twice when leader election is on: the
    Lease gets its own client, outside the loops' budgets.
    """
    wanted = selected(args)
    if not wanted:
        log.warning("no Kubernetes loops selected (--controllers is empty): nothing to run")
        return
    csi = CSIClient(csi_endpoint, timeout=args.csi_timeout)
    closers: list[Any] = [csi]
    try:
        if getattr(args, "serve_loop_metrics", False) and args.metrics_address:
            # `csi-kit controllers`: no driver in this process serves the registry.
            closers.append(metrics.serve(args.metrics_address))
        info = await _discover(csi, stop)
        if info is None:
            return
        log.info(
            "CSI driver %s %s, controller capabilities %s",
            info.name,
            info.vendor_version,
            sorted(info.controller_capabilities),
        )
        metrics.set_driver_name(info.name)
        raw = connect(args)
        closers.append(raw)
        clients = Clients(raw, qps=args.kube_api_qps, burst=args.kube_api_burst, events=args.events)
        closers.insert(0, clients)  # flushes its Events before the raw connection closes
        ctx = LoopContext(
            args=args,
            info=info,
            csi=csi,
            csi_endpoint=csi_endpoint,
            clients=clients,
            namespace=args.leader_election_namespace or _default_namespace(),
            stop=stop,
            named=registry.expand(args.controllers or "")[1],
        )
        plans = await registry.build(ctx, wanted)
        lease_api: KubeAPI | None = None
        if args.leader_election:
            lease_raw = connect(args)
            closers.append(lease_raw)
            lease_api = clients.lease_api(lease_raw)
        await _run(plans, ctx, lease_api)
    finally:
        for c in closers:
            close = getattr(c, "close", None)
            if close is not None:
                await close()


async def _run(plans: list[Planned], ctx: LoopContext, lease_api: KubeAPI | None) -> None:
    """Run every plan until `ctx.stop` (a loop under its Lease when elected); the first failure ends all."""
    args = ctx.args

    async def run_one(plan: Planned) -> None:
        loop, lease = plan.loop, plan.lease
        if lease_api is None or lease is None:
            task = asyncio.create_task(loop.run())
            waiter = asyncio.create_task(ctx.stop.wait())
            try:
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (task, waiter):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
            return

        def body() -> Coroutine[Any, Any, None]:
            return loop.run()

        elector = LeaderElector(
            lease_api,
            lease_name=lease,
            namespace=ctx.namespace,
            identity=args.leader_election_identity,
            lease_duration=args.leader_election_lease_duration,
            renew_deadline=args.leader_election_renew_deadline,
            retry_period=args.leader_election_retry_period,
            on_change=lambda lead: metrics.LEADER.labels(loop.name).set(1 if lead else 0),
        )
        await elector.run(body, ctx.stop)

    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(run_one(plan)) for plan in plans]
    tasks.append(asyncio.create_task(ctx.stop.wait()))  # services may run without any loop
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            t.result()  # a loop that failed: say why
        await ctx.stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
