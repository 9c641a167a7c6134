"""Volume health: a volume's abnormal condition, as an Event on its claim.

What kubernetes-csi/external-health-monitor's controller does, as the loop
`--controllers health-monitor`: every `--monitor-interval` seconds
(upstream's default: one minute) the driver is asked how each volume behind
a Bound PV of this driver is, and an abnormal one gets a `Warning` Event
with reason `VolumeConditionAbnormal` and the driver's message on the PV's
claim -- what `kubectl describe pvc` shows.  The kubelet reports the node's
view (NodeGetVolumeStats' condition) on the pods itself; this loop is the
controller's view.

How the driver is asked (its capabilities decide, as upstream):

- LIST_VOLUMES + VOLUME_CONDITION: one ListVolumes walk (every page) per
  interval, whatever the number of volumes;
- otherwise GET_VOLUME + VOLUME_CONDITION: one ControllerGetVolume per
  volume per interval, `workers` at a time;
- neither, or no controller service: the loop says so once and does nothing
  (upstream's sidecar exits).

Events.  Upstream records an Event every interval for as long as a volume is
abnormal and lets client-go's correlator fold the repeats into one Event
whose count grows.  Here the loop itself decides, per claim:

- one Event when the volume becomes abnormal or its message changes;
- the same Event again after `repeat_after` (30 min) while nothing changes,
  so it outlives the API server's Event TTL (`--event-ttl`, 1 h by default)
  for as long as the problem does;
- nothing when the condition returns to normal (upstream has no reason for
  that either): a log line, and a later abnormal condition is news again,
  even with the same message;
- a volume the driver no longer knows (absent from ListVolumes, NOT_FOUND
  from ControllerGetVolume): no Event, as upstream; a warning in the log
  when it is first seen so.

The claim is named by the PV's `claimRef` (namespace, name, uid), which the
PV controller fills when it binds: no claim is read, so the loop watches
PVs only and needs no access to claims at all (upstream lists and watches
them, and pods and nodes for its node watcher, which this loop does not
have).

Leader election uses upstream's Lease, `external-health-monitor-leader-<driver>`.
Per-node mode (`--node-deployment`, not in upstream) checks only the PVs
whose node affinity names this node, without a Lease: a node-local driver
knows only its own volumes.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from typing import Any, Protocol, Unpack

import attrs
import grpc

from csi_kit.k8s.objects.meta import status_of
from csi_kit.k8s.objects.names import sanitize_lease_name
from csi_kit.k8s.objects.resources import PV
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import KubeAPI, Obj
from csi_kit.k8s.runtime.context import LoopContext, Planned
from csi_kit.k8s.runtime.csi import CSICallError, DriverInfo, VolumeCondition
from csi_kit.k8s.runtime.events import WARNING, EventRecorder
from csi_kit.k8s.runtime.options import env as _env
from csi_kit.k8s.volume.base import LoopArgs, VolumeLoop
from csi_kit.k8s.volume.protocol import HOSTNAME_LABEL, affinity_matches, is_driver_volume, volume_handle

log = logging.getLogger(__name__)

REASON_ABNORMAL = "VolumeConditionAbnormal"
LEASE_PREFIX = "external-health-monitor-leader-"
#: Upstream's event source component is csi-pv-monitor-controller-<driver>.
COMPONENT_PREFIX = "csi-pv-monitor-controller-"
#: An abnormal condition that does not change is recorded again after this long.
REPEAT_AFTER = 1800.0
#: Event messages are cut here (the driver's text is not ours to trust).
MAX_MESSAGE = 1024
DEFAULT_INTERVAL = 60.0
_TICK = "interval"


class HealthDriver(Protocol):
    async def list_volume_conditions(self) -> dict[str, VolumeCondition]: ...

    async def get_volume_condition(self, volume_id: str) -> VolumeCondition: ...


def check_mode(info: DriverInfo) -> str | None:
    """How to ask the driver: `list`, `get`, or None when its controller reports no conditions."""
    caps = info.controller_capabilities
    if "CONTROLLER_SERVICE" not in info.plugin_capabilities or "VOLUME_CONDITION" not in caps:
        return None
    if "LIST_VOLUMES" in caps:
        return "list"
    if "GET_VOLUME" in caps:
        return "get"
    return None


def _unsupported(info: DriverInfo) -> str:
    return (
        f"driver {info.name} does not report volume conditions from its controller "
        "(needs VOLUME_CONDITION with LIST_VOLUMES or GET_VOLUME): the health monitor does nothing"
    )


def _event_message(message: str) -> str:
    message = message.strip() or "the driver reports the volume as abnormal"
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


@attrs.frozen
class _Seen:
    state: str  # "abnormal" or "missing"
    message: str
    since: float


class HealthMonitor(VolumeLoop[HealthDriver]):
    name = "health-monitor"

    def __init__(
        self,
        api: KubeAPI,
        driver: HealthDriver,
        info: DriverInfo,
        *,
        interval: float = DEFAULT_INTERVAL,
        events: EventRecorder | None = None,
        node_topology: dict[str, str] | None = None,
        repeat_after: float = REPEAT_AFTER,
        **loop: Unpack[LoopArgs],
    ) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"the monitor interval must be a positive number of seconds, not {interval}")
        super().__init__(api, driver, info, **loop)
        self.mode = check_mode(info)
        self.interval = interval
        self.events = events
        self.node_topology = node_topology
        self.repeat_after = repeat_after
        self.pvs = self.informer(api, PV)
        self.ticks = self.queue("interval", self.sync_interval)
        self.volumes = self.queue("volume", self.sync_volume)
        self.pvs.add_handler(self._on_pv)
        self._seen: dict[str, _Seen] = {}  # by PV name: volumes abnormal or missing now
        #: Conditions looked at, by PV name (tests wait on these rather than on time).
        self.checks: Counter[str] = Counter()
        self._told = False

    # -- which PVs ------------------------------------------------------------------

    def _watches(self, pv: Obj) -> bool:
        """A live Bound PV of this driver with a claim (and, per node, on this node)."""
        if not is_driver_volume(pv, self.driver_name) or k.is_deleting(pv):
            return False
        if status_of(pv).get("phase") != "Bound" or _claim_of(pv) is None:
            return False
        return self.node_topology is None or affinity_matches(pv, self.node_topology)

    def handle_of(self, pv: Obj) -> str | None:
        """The volume handle of a PV this loop watches over, else None."""
        handle = volume_handle(pv)
        return handle if handle and self._watches(pv) else None

    def _on_pv(self, event: str, old: Obj | None, new: Obj | None) -> None:
        if event == "DELETED":
            self._seen.pop(k.name_of(old or new or {}), None)
            return
        # A volume just bound is checked now, as upstream's add handler does; the rest each interval.
        was = old is not None and self.handle_of(old) is not None
        if self.mode == "get" and new is not None and not was and self.handle_of(new) is not None:
            self.volumes.add(k.name_of(new))

    # -- the checks -----------------------------------------------------------------

    async def run(self) -> None:
        if self.mode is None:
            if not self._told:
                log.warning("%s", _unsupported(self.info))
                self._told = True
            self.started.set()
            await asyncio.Event().wait()  # until cancelled
            return
        self._seen.clear()  # a new term as leader: report what is abnormal afresh
        await self.run_polling(self.ticks, _TICK, self.interval)

    async def sync_interval(self, key: str) -> None:
        watched = [(pv, h) for pv in self.pvs.items() if (h := self.handle_of(pv)) is not None]
        if self.mode == "get":
            for pv, _ in watched:
                self.volumes.add(k.name_of(pv))
            return
        if not watched:
            return
        try:
            conditions = await self.driver.list_volume_conditions()
        except CSICallError as e:
            # Not retried with backoff: the next interval asks again, as upstream.
            log.warning("ListVolumes for volume health: %s", e)
            return
        for pv, handle in watched:
            self._observe(pv, handle, conditions.get(handle))

    async def sync_volume(self, name: str) -> None:
        pv = self.pvs.get(name)
        handle = None if pv is None else self.handle_of(pv)
        if pv is None or handle is None:
            self._seen.pop(name, None)
            return
        try:
            condition = await self.driver.get_volume_condition(handle)
        except CSICallError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                self._observe(pv, handle, None)
            else:
                log.warning("ControllerGetVolume %s (PV %s) for volume health: %s", handle, name, e)
            return
        self._observe(pv, handle, condition)

    def _news(self, prev: _Seen | None, message: str, now: float) -> bool:
        """Whether an abnormal `message` is worth an Event: a change, or `repeat_after` since the last."""
        same = prev is not None and prev.state == "abnormal" and prev.message == message
        return not same or prev is None or now - prev.since >= self.repeat_after

    def _observe(self, pv: Obj, handle: str, condition: VolumeCondition | None) -> None:
        """Record what changed about one volume; the decisions the module docstring lists."""
        name = k.name_of(pv)
        self.checks[name] += 1
        prev = self._seen.get(name)
        now = asyncio.get_running_loop().time()
        if condition is None:
            if prev is None or prev.state != "missing":
                log.warning("PV %s: the driver does not know its volume %s", name, handle)
            self._seen[name] = _Seen("missing", "", now)
            return
        if not condition.abnormal:
            if prev is not None:
                log.info("PV %s: volume %s is no longer %s", name, handle, prev.state)
                del self._seen[name]
            return
        message = _event_message(condition.message)
        if not self._news(prev, message, now):
            return
        claim = _claim_of(pv)
        assert claim is not None  # handle_of checked it
        log.warning("PV %s (claim %s/%s): volume %s is abnormal: %s", name, *claim[:2], handle, message)
        self._seen[name] = _Seen("abnormal", message, now)
        if self.events is not None:
            ref = _claim_ref(*claim)
            self.events.forget(ref)  # a repeat after a change or after `repeat_after` is news
            self.events.event(ref, WARNING, REASON_ABNORMAL, message)


def _claim_of(pv: Obj) -> tuple[str, str, str] | None:
    """(namespace, name, uid) of the claim a PV is bound to, when its claimRef names all three."""
    ref = (pv.get("spec") or {}).get("claimRef") or {}
    parts = (ref.get("namespace"), ref.get("name"), ref.get("uid"))
    if all(isinstance(p, str) and p for p in parts):
        return parts  # type: ignore[return-value]
    return None


def _claim_ref(namespace: str, name: str, uid: str) -> Obj:
    """The claim as the involved object of an Event (what `kubectl describe pvc` matches on)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
    }


# ----------------------------------------------------------------- command line


def add_options(g: Any) -> None:
    """The health monitor's option, added to the "Kubernetes loops" argument group `g`."""
    g.add_argument(
        "--monitor-interval",
        type=float,
        default=float(_env("monitor-interval", DEFAULT_INTERVAL)),
        help="seconds between two looks at every volume's condition (health-monitor)",
    )


# ---------------------------------------------------------------------- wiring
# The loop's factory, listed in k8s/registry.py; kept by the wiring (the module's owner works above).


async def build(ctx: LoopContext) -> list[Planned]:
    """The health monitor (`--controllers health-monitor`) and its Lease; nothing if unsupported."""
    info = ctx.info
    if check_mode(info) is None:
        log.warning("%s", _unsupported(info))
        return []
    node = await ctx.node()
    # The node's labels as a PV's node affinity may name them (ours add the hostname).
    topology = None if node is None else {**node[1], HOSTNAME_LABEL: node[0]}
    monitor = HealthMonitor(
        ctx.clients.api_for("health-monitor"),
        ctx.csi,
        info,
        informers=ctx.clients.informers,
        interval=ctx.args.monitor_interval,
        events=ctx.clients.recorder(COMPONENT_PREFIX + info.name),
        node_topology=topology,
        workers=ctx.args.k8s_workers,
        **ctx.timing,
    )
    return [Planned(monitor, None if node is not None else sanitize_lease_name(LEASE_PREFIX + info.name))]
