"""Command-line hooks for the Kubernetes loops, called by `csi_kit.cli`.

`add_controller_options` adds the options (each with a `CSI_KIT_<NAME>`
environment default, the way a Deployment usually configures a container);
`run_controllers` connects to the driver over CSI, discovers what it can do,
and runs the selected loops -- each under its own Lease when leader election
is on -- until told to stop.
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

from csi_kit.k8s.objects.names import sanitize_lease_name
from csi_kit.k8s.runtime import metrics
from csi_kit.k8s.runtime.api import KubeAPI
from csi_kit.k8s.runtime.controller import Loop
from csi_kit.k8s.runtime.csi import CSICallError, CSIClient, DriverInfo
from csi_kit.k8s.runtime.events import EventRecorder
from csi_kit.k8s.runtime.leader import LeaderElector
from csi_kit.k8s.runtime.options import env as _env
from csi_kit.k8s.runtime.options import env_bool as _env_bool
from csi_kit.k8s.runtime.ratelimit import ThrottledAPI, TokenBucket
from csi_kit.k8s.snapshot import group_controller, group_snapshotter
from csi_kit.k8s.snapshot import metadata as snapshot_metadata
from csi_kit.k8s.snapshot.controller import SnapshotController
from csi_kit.k8s.snapshot.snapshotter import Snapshotter
from csi_kit.k8s.volume import health
from csi_kit.k8s.volume_cli import VOLUME_LOOPS, VolumeLoops, add_volume_options

log = logging.getLogger(__name__)

# Loop names accepted by --controllers.  "snapshot" is both halves; pick one
# half when the other runs elsewhere (e.g. the cluster already has the
# upstream snapshot-controller: then run only "snapshotter").
CONTROLLERS = {
    "snapshot": ("snapshot-controller", "snapshotter"),
    "snapshot-controller": ("snapshot-controller",),
    "snapshotter": ("snapshotter",),
    # Volume group snapshots (groupsnapshot.storage.k8s.io/v1): opt-in, as upstream's
    # --enable-volume-group-snapshots, because they need the group CRDs installed.
    "group-snapshot": ("group-snapshot-controller", "group-snapshotter"),
    "group-snapshot-controller": ("group-snapshot-controller",),
    "group-snapshotter": ("group-snapshotter",),
    "provisioner": ("provisioner",),
    "resizer": ("resizer",),
    "attacher": ("attacher",),
    "capacity": ("capacity",),
    "registration": ("registration",),
    "liveness": ("liveness",),
    # external-health-monitor-controller: opt-in, never part of "all".
    "health-monitor": ("health-monitor",),
    # external-snapshot-metadata (changed-block tracking for backups): opt-in, never part of "all".
    "snapshot-metadata": ("snapshot-metadata",),
    "all": ("snapshot-controller", "snapshotter", *VOLUME_LOOPS),
}

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
        "snapshot-controller, snapshotter, group-snapshot (= group-snapshot-controller + group-snapshotter), "
        "provisioner, resizer, attacher, capacity, registration, "
        "liveness, health-monitor, snapshot-metadata, all; empty runs none",
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
        help="client-side request rate limit (0 lifts it)",
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
        help="record Kubernetes Events as the upstream sidecars do (one API write each; needs events create)",
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
    add_volume_options(g)
    snapshot_metadata.add_options(g)
    health.add_options(g)


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
    out: set[str] = set()
    for item in (args.controllers or "").split(","):
        item = item.strip()
        if not item or item == "none":
            continue
        if item not in CONTROLLERS:
            raise ValueError(f"unknown controller {item!r}; choose from {', '.join(sorted(CONTROLLERS))}")
        out.update(CONTROLLERS[item])
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
    Lease gets its own client, outside the loops' QPS budget.
    """
    wanted = selected(args)
    if not wanted:
        log.warning("no Kubernetes loops selected (--controllers is empty): nothing to run")
        return
    client = CSIClient(csi_endpoint, timeout=args.csi_timeout)
    clients: list[Any] = []
    try:
        if getattr(args, "serve_loop_metrics", False) and args.metrics_address:
            # `csi-kit controllers`: no driver in this process serves the registry.
            clients.append(metrics.serve(args.metrics_address))
        info = await _discover(client, stop)
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
        clients.append(raw)
        api = ThrottledAPI(raw, TokenBucket(args.kube_api_qps, args.kube_api_burst))
        timing = {"base_delay": args.retry_interval_start, "max_delay": args.retry_interval_max}
        events = EventRecorder(api, "csi-kit-snapshot") if args.events else None
        loops: list[tuple[Loop, str | None]] = []
        if "snapshot-controller" in wanted:
            ctrl = SnapshotController(
                api,
                workers=args.k8s_workers,
                resync_period=args.resync_period,
                distributed=args.distributed_snapshotting,
                events=events,
                **timing,
            )
            loops.append((ctrl, "snapshot-controller-leader"))
        if "snapshotter" in wanted:
            if "CREATE_DELETE_SNAPSHOT" not in info.controller_capabilities:
                log.warning(
                    "driver %s does not offer CREATE_DELETE_SNAPSHOT: not running the snapshotter", info.name
                )
            else:
                node = None
                if args.node_deployment:
                    if not args.node_name:
                        raise ValueError("--node-deployment needs --node-name (or NODE_NAME)")
                    node = args.node_name
                snapper = Snapshotter(
                    api,
                    client,
                    info.name,
                    workers=args.k8s_workers,
                    resync_period=args.resync_period,
                    extra_create_metadata=args.extra_create_metadata,
                    node_name=node,
                    list_snapshots="LIST_SNAPSHOTS" in info.controller_capabilities,
                    snapshot_name_prefix=args.snapshot_name_prefix,
                    snapshot_name_uuid_length=args.snapshot_name_uuid_length,
                    events=events,
                    **timing,
                )
                # Per-node snapshotters each own their node's contents: no election among them.
                lease = None if node else "external-snapshotter-leader-" + sanitize_lease_name(info.name)
                loops.append((snapper, lease))

        if "group-snapshot-controller" in wanted:
            gctrl = group_controller.GroupSnapshotController(
                api,
                workers=args.k8s_workers,
                resync_period=args.resync_period,
                distributed=args.distributed_snapshotting,
                **timing,
            )
            loops.append((gctrl, "snapshot-controller-group-leader"))
        if "group-snapshotter" in wanted:
            # Run even without the capability: its contents then say why nothing happens.
            gsnapper = group_snapshotter.GroupSnapshotter(
                api,
                client,
                info.name,
                supported=group_snapshotter.GROUP_CAPABILITY in info.group_capabilities,
                workers=args.k8s_workers,
                resync_period=args.resync_period,
                extra_create_metadata=args.extra_create_metadata,
                **timing,
            )
            loops.append((gsnapper, "external-snapshotter-group-leader-" + sanitize_lease_name(info.name)))
        if "snapshot-metadata" in wanted:
            # A server on every replica (no Lease), with its own API budget: each call costs
            # a TokenReview, a SubjectAccessReview and two reads.
            sm_api = ThrottledAPI(raw, TokenBucket(args.kube_api_qps, args.kube_api_burst))
            sm_loop = snapshot_metadata.loop_from_args(args, sm_api, csi_endpoint, info)
            if sm_loop is not None:
                loops.append((sm_loop, None))

        if "health-monitor" in wanted:
            loops.extend(await health.loops(args, api, client, info))

        namespace = args.leader_election_namespace or _default_namespace()
        volume = VolumeLoops(args, csi_endpoint, client, info, wanted)
        clients.append(volume)
        loops.extend(await volume.loops(api, namespace))
        await volume.start_services()

        lease_api: KubeAPI | None = None
        if args.leader_election:
            lease_api = connect(args)
            clients.append(lease_api)

        async def run_one(loop: Loop, lease: str | None) -> None:
            if lease_api is None or lease is None:
                task = asyncio.create_task(loop.run())
                await stop.wait()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return

            def body() -> Coroutine[Any, Any, None]:
                return loop.run()

            elector = LeaderElector(
                lease_api,
                lease_name=lease,
                namespace=namespace,
                identity=args.leader_election_identity,
                lease_duration=args.leader_election_lease_duration,
                renew_deadline=args.leader_election_renew_deadline,
                retry_period=args.leader_election_retry_period,
                on_change=lambda lead: metrics.LEADER.labels(loop.name).set(1 if lead else 0),
            )
            await elector.run(body, stop)

        await asyncio.gather(*(run_one(loop, lease) for loop, lease in loops))
        await stop.wait()  # services (registration, liveness) may run without any loop
    finally:
        await client.close()
        for c in clients:
            close = getattr(c, "close", None)
            if close is not None:
                await close()
