"""Command-line wiring of the volume loops (part 2), called from `csi_kit.k8s.cli`.

`add_volume_options` adds their options (with `CSI_KIT_<NAME>` environment
defaults, like the rest); `VolumeLoops` builds the loops the `--controllers`
selection asks for, each with the Lease name its upstream sidecar uses (so
ours and theirs never both lead), and runs the two non-loop services of a
one-process node deployment: kubelet plugin registration and `/healthz`.

Per-node (`--node-deployment`): the provisioner, resizer and capacity tracker
handle only this node (node-local backends), without leader election; the
node's topology comes from the driver's own NodeGetInfo.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from csi_kit.k8s.objects.names import sanitize_lease_name
from csi_kit.k8s.runtime.api import KubeAPI
from csi_kit.k8s.runtime.controller import Loop
from csi_kit.k8s.runtime.csi import CSIClient, DriverInfo
from csi_kit.k8s.runtime.options import deprecated_alias
from csi_kit.k8s.runtime.options import env as _env
from csi_kit.k8s.runtime.options import env_bool as _env_bool
from csi_kit.k8s.volume.attacher import Attacher
from csi_kit.k8s.volume.capacity import CapacityTracker
from csi_kit.k8s.volume.liveness import LivenessServer
from csi_kit.k8s.volume.protocol import HOSTNAME_LABEL
from csi_kit.k8s.volume.provisioner import Provisioner
from csi_kit.k8s.volume.registration import KUBELET_REGISTRY, RegistrationServer
from csi_kit.k8s.volume.resizer import Resizer

log = logging.getLogger(__name__)

VOLUME_LOOPS = ("provisioner", "resizer", "attacher", "capacity", "registration", "liveness")


def add_volume_options(g: Any) -> None:
    """Options of the volume loops, added to the "Kubernetes loops" argument group `g`."""
    g.add_argument("--volume-name-prefix", default=_env("volume-name-prefix", "pvc"))
    g.add_argument("--volume-name-uuid-length", type=int, default=int(_env("volume-name-uuid-length", -1)))
    g.add_argument("--default-fstype", default=_env("default-fstype", ""))
    g.add_argument(
        "--immediate-binding",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("immediate-binding", True),
        help="per-node provisioners race for Immediate-mode claims (else they only take scheduled ones)",
    )
    g.add_argument(
        "--cross-namespace-data-sources",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("cross-namespace-data-sources", False),
        help="allow dataSourceRef in another namespace when a ReferenceGrant permits it",
    )
    g.add_argument(
        "--k8s-events",
        dest="events",
        action=deprecated_alias("--events / --no-events"),
        default=argparse.SUPPRESS,
        help="deprecated alias of --events",
    )
    g.add_argument("--capacity-poll-interval", type=float, default=float(_env("capacity-poll-interval", 60)))
    g.add_argument("--capacity-namespace", default=_env("capacity-namespace", None))
    g.add_argument(
        "--kubelet-registration-path",
        default=_env("kubelet-registration-path", None),
        help="the CSI socket path as the kubelet sees it (default: the driver's socket path)",
    )
    g.add_argument("--plugin-registry-dir", default=_env("plugin-registry-dir", KUBELET_REGISTRY))
    g.add_argument("--health-port", type=int, default=int(_env("health-port", 9808)))
    g.add_argument("--health-address", default=_env("health-address", "0.0.0.0"))
    g.add_argument("--probe-timeout", type=float, default=float(_env("probe-timeout", 1.0)))


def lease_names(driver: str) -> dict[str, str]:
    """The Lease each upstream sidecar takes for `driver` (so two implementations never both lead)."""
    s = sanitize_lease_name(driver)
    return {
        "provisioner": s,
        "resizer": "external-resizer-" + s,
        "attacher": "external-attacher-leader-" + s,
        "capacity": s + "-capacity",  # upstream runs it inside the provisioner; ours elects alone
    }


class VolumeLoops:
    """The loops and services of part 2 selected in `wanted`, for one driver."""

    def __init__(
        self,
        args: argparse.Namespace,
        csi_endpoint: str,
        client: CSIClient,
        info: DriverInfo,
        wanted: set[str],
    ) -> None:
        self.args = args
        self.endpoint = csi_endpoint
        self.info = info
        self.wanted = wanted & set(VOLUME_LOOPS)
        self.client = client
        self.registration: RegistrationServer | None = None
        self.liveness: LivenessServer | None = None

    async def loops(self, api: KubeAPI, namespace: str) -> list[tuple[Loop, str | None]]:
        a, info, wanted = self.args, self.info, self.wanted
        timing = {"base_delay": a.retry_interval_start, "max_delay": a.retry_interval_max}
        node: str | None = None
        topology: dict[str, str] | None = None
        if a.node_deployment and wanted & {"provisioner", "resizer", "capacity"}:
            if not a.node_name:
                raise ValueError("--node-deployment needs --node-name (or NODE_NAME)")
            node = a.node_name
            _, topology = await self.client.node_info()
        leases = lease_names(info.name)

        def lease(name: str) -> str | None:
            return None if node is not None else leases[name]

        out: list[tuple[Loop, str | None]] = []
        controller = "CONTROLLER_SERVICE" in info.plugin_capabilities
        if "provisioner" in wanted:
            if "CREATE_DELETE_VOLUME" not in info.controller_capabilities:
                log.warning("driver %s does not offer CREATE_DELETE_VOLUME: no provisioner", info.name)
            else:
                p = Provisioner(
                    api,
                    self.client,
                    info,
                    node_name=node,
                    node_topology=topology,
                    immediate_binding=a.immediate_binding,
                    extra_create_metadata=a.extra_create_metadata,
                    volume_name_prefix=a.volume_name_prefix,
                    volume_name_uuid_length=a.volume_name_uuid_length,
                    default_fstype=a.default_fstype,
                    cross_namespace=a.cross_namespace_data_sources,
                    events=a.events,
                    workers=a.k8s_workers,
                    resync_period=a.resync_period,
                    **timing,
                )
                out.append((p, lease("provisioner")))
        if "resizer" in wanted and controller:
            r = Resizer(
                api,
                self.client,
                info,
                # The node's labels as a PV's node affinity may name them (ours add the hostname).
                node_topology=None if topology is None else {**topology, HOSTNAME_LABEL: str(node)},
                events=a.events,
                workers=a.k8s_workers,
                **timing,
            )
            out.append((r, lease("resizer")))
        named = {x.strip() for x in (a.controllers or "").split(",")}
        publishes = "PUBLISH_UNPUBLISH_VOLUME" in info.controller_capabilities
        # `all` means the loops this driver needs: a driver without controller publish
        # runs with attachRequired: false, so no attachments exist.  Asked for by name,
        # the attacher runs anyway (upstream's trivial handler marks attachments attached).
        if "attacher" in wanted and controller and (publishes or "attacher" in named):
            # Attachments are cluster-wide even for node-local drivers: always one elected attacher.
            out.append(
                (Attacher(api, self.client, info, workers=a.k8s_workers, **timing), leases["attacher"])
            )
        if "capacity" in wanted and "GET_CAPACITY" in info.controller_capabilities:
            c = CapacityTracker(
                api,
                self.client,
                info,
                a.capacity_namespace or namespace,
                node_name=node,
                node_topology=topology,
                poll_interval=a.capacity_poll_interval,
                **timing,
            )
            out.append((c, lease("capacity")))
        return out

    async def start_services(self) -> None:
        a = self.args
        if "registration" in self.wanted:
            path = a.kubelet_registration_path or self.endpoint.removeprefix("unix://")
            self.registration = RegistrationServer(self.info.name, path, a.plugin_registry_dir)
            await self.registration.start()
        if "liveness" in self.wanted:
            checks = [self.registration.healthy] if self.registration is not None else []
            self.liveness = LivenessServer(
                self.client.probe,
                host=a.health_address,
                port=a.health_port,
                probe_timeout=a.probe_timeout,
                checks=checks,
            )
            await self.liveness.start()

    async def close(self) -> None:
        if self.liveness is not None:
            await self.liveness.stop()
        if self.registration is not None:
            await self.registration.stop()
