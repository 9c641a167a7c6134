"""The health monitor: abnormal volume conditions become Events on the claims.

Against the real hostPath driver (a volume's directory removed underneath),
a scripted driver (ListVolumes paging, ControllerGetVolume, volumes the
driver no longer knows, per-node filtering) and through `run_controllers`
(registration, Lease, a driver without VOLUME_CONDITION).  Tests wait on
the loop's count of conditions looked at (`checks`), never on time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from k8s_helpers import cli_running, loop_context, parse
from volume_peer import VolumeCSI, eventually, make_bound, served, stop_tasks

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit.k8s.cli import CONTROLLERS, run_controllers, selected
from csi_kit.k8s.objects.resources import EVENT, LEASE, PV
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import Obj
from csi_kit.k8s.runtime.csi import Capability, CSIClient, DriverInfo, VolumeCondition
from csi_kit.k8s.runtime.events import EventRecorder
from csi_kit.k8s.volume import health
from csi_kit.k8s.volume.health import COMPONENT_PREFIX, REASON_ABNORMAL, HealthMonitor
from csi_kit.k8s.volume.protocol import HOSTNAME_LABEL
from csi_kit.testing.driver import running_driver
from csi_kit.testing.fake_k8s import FakeKubeAPI

HOSTPATH = "hostpath.csi-kit.io"
SCRIPTED = "health.csi-kit.io"
FAST: dict[str, Any] = {"base_delay": 0.01, "max_delay": 0.05}
CCap = pb.ControllerServiceCapability.RPC


async def bind(
    api: FakeKubeAPI, name: str, handle: str, *, driver: str, node: str | None = None, phase: str = "Bound"
) -> Obj:
    """A claim and its PV as the PV controller leaves them once bound; the claim."""
    pvc, pv = await make_bound(api, name, driver=driver, handle=handle)
    if node is not None:
        expr = {"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}
        pv = await api.patch(
            PV,
            k.name_of(pv),
            {"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [expr]}]}}}},
        )
    pv["status"] = {"phase": phase}
    await api.update_status(PV, pv)
    return pvc


def events_on(api: FakeKubeAPI, claim: Obj) -> list[Obj]:
    return [e for e in api.objects(EVENT) if e["involvedObject"].get("uid") == k.uid_of(claim)]


async def checked(monitor: HealthMonitor, *pvs: str, rounds: int = 3) -> None:
    """Wait until each PV's condition has been looked at `rounds` more times."""
    start = {pv: monitor.checks[pv] for pv in pvs}
    await eventually(
        lambda: all(monitor.checks[pv] >= start[pv] + rounds for pv in pvs), f"{rounds} more checks of {pvs}"
    )


async def start(monitor: HealthMonitor) -> list[asyncio.Task[None]]:
    task = asyncio.create_task(monitor.run())
    await monitor.started.wait()
    return [task]


# ------------------------------------------------------------------ the real hostPath driver


@pytest.fixture
async def hostpath(tmp_path: Any) -> AsyncIterator[tuple[str, CSIClient]]:
    state = str(tmp_path / "driver")
    os.makedirs(state)
    with running_driver(state, backend="hostpath", driver_name=HOSTPATH) as endpoint:
        client = CSIClient(endpoint, timeout=30)
        try:
            yield state, client
        finally:
            await client.close()


async def create(client: CSIClient, name: str) -> str:
    made = await client.create_volume(
        name,
        required_bytes=1 << 20,
        limit_bytes=0,
        capabilities=[Capability("SINGLE_NODE_WRITER")],
        parameters={},
        secrets={},
    )
    return made.volume_id


async def test_a_removed_volume_directory_becomes_one_event_on_its_claim(
    api: FakeKubeAPI, hostpath: tuple[str, CSIClient]
) -> None:
    state, client = hostpath
    info = await client.driver_info()
    sick_id, well_id = await create(client, "sick"), await create(client, "well")
    sick = await bind(api, "sick", sick_id, driver=HOSTPATH)
    well = await bind(api, "well", well_id, driver=HOSTPATH)
    events = EventRecorder(api, COMPONENT_PREFIX + HOSTPATH)
    monitor = HealthMonitor(api, client, info, interval=0.02, events=events, **FAST)
    assert monitor.mode == "list"  # hostPath lists volumes with their condition
    tasks = await start(monitor)
    try:
        await checked(monitor, "pv-sick", "pv-well")
        assert api.objects(EVENT) == [], "healthy volumes: no Event"

        directory = os.path.join(state, "hostpath", "volumes", sick_id)
        os.rmdir(directory)  # lost behind the driver's back
        (event,) = await eventually(lambda: events_on(api, sick), "the abnormal Event")
        assert event["type"] == "Warning" and event["reason"] == REASON_ABNORMAL
        assert event["message"] == f"volume directory {directory} is missing"
        assert event["involvedObject"]["kind"] == "PersistentVolumeClaim"
        assert (event["involvedObject"]["name"], event["involvedObject"]["namespace"]) == ("sick", "default")
        assert event["source"]["component"] == "csi-pv-monitor-controller-" + HOSTPATH

        # Still abnormal, nothing new to say: no more Events, and none on the healthy claim.
        await checked(monitor, "pv-sick", "pv-well", rounds=5)
        await events.flush()
        assert len(events_on(api, sick)) == 1 and events_on(api, well) == []

        # Back to normal: no Event; broken again with the same message: news again.
        os.mkdir(directory)
        await checked(monitor, "pv-sick")
        await events.flush()
        assert len(events_on(api, sick)) == 1
        os.rmdir(directory)
        await eventually(lambda: len(events_on(api, sick)) == 2, "the second abnormal Event")
        assert events_on(api, well) == []
    finally:
        await stop_tasks(tasks)
        await events.flush()


async def test_serve_runs_it_under_the_upstream_lease_and_only_when_named(
    api: FakeKubeAPI, hostpath: tuple[str, CSIClient]
) -> None:
    state, client = hostpath
    assert "health-monitor" not in CONTROLLERS["all"], "opt-in, as upstream"
    assert selected(parse("--controllers", "health-monitor")) == {"health-monitor"}
    assert parse().monitor_interval == 60.0  # upstream's --monitor-interval default
    vol = await create(client, "data")
    claim = await bind(api, "data", vol, driver=HOSTPATH)
    os.rmdir(os.path.join(state, "hostpath", "volumes", vol))
    args = parse(
        "--controllers", "health-monitor", "--monitor-interval", "0.02",
        "--leader-election", "--leader-election-namespace", "kube-system",
        "--leader-election-lease-duration", "0.6", "--leader-election-renew-deadline", "0.4",
        "--leader-election-retry-period", "0.05", "--kube-api-qps", "0",
    )  # fmt: skip
    async with cli_running(args, client.endpoint, api):
        (event,) = await eventually(lambda: events_on(api, claim), "the abnormal Event")
        assert event["reason"] == REASON_ABNORMAL and "is missing" in event["message"]
        leases = {k.name_of(o) for o in api.objects(LEASE)}
        assert leases == {"external-health-monitor-leader-hostpath-csi-kit-io"}


async def test_a_driver_without_volume_condition_is_told_once_and_left_alone(
    api: FakeKubeAPI, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    peer = VolumeCSI(SCRIPTED)  # controller service, but no VOLUME_CONDITION
    await make_bound(api, "data", driver=SCRIPTED)
    before = api.total_requests
    async with served(peer, str(tmp_path / "csi.sock")) as endpoint:
        stop = asyncio.Event()
        args = parse("--controllers", "health-monitor", "--monitor-interval", "0.01", "--kube-api-qps", "0")
        with caplog.at_level(logging.WARNING, logger="csi_kit.k8s.volume.health"):
            task = asyncio.create_task(run_controllers(args, endpoint, stop, connect=lambda a: api))
            await eventually(lambda: "does not report volume conditions" in caplog.text, "the warning")
            await asyncio.sleep(0.1)  # ten intervals' worth, had it started
            stop.set()
            await asyncio.wait_for(task, 10)
    told = [r for r in caplog.records if "does not report volume conditions" in r.getMessage()]
    assert len(told) == 1
    assert api.total_requests == before, "no watch, no Event"
    assert not {"ListVolumes", "ControllerGetVolume"} & set(peer.calls)


# ------------------------------------------------------------------ a scripted driver


class HealthCSI(pbg.IdentityServicer, pbg.ControllerServicer):
    """Volume conditions on demand; ListVolumes pages one entry at a time."""

    def __init__(self, *caps: str) -> None:
        self.caps = set(caps)
        self.conditions: dict[str, VolumeCondition] = {}
        self.calls: Counter[str] = Counter()
        self.asked: Counter[str] = Counter()  # ControllerGetVolume, by volume id
        self.tokens: list[str] = []  # ListVolumes' starting tokens, in order

    async def GetPluginInfo(self, request: Any, context: Any) -> Any:
        return pb.GetPluginInfoResponse(name=SCRIPTED, vendor_version="1")

    async def GetPluginCapabilities(self, request: Any, context: Any) -> Any:
        S = pb.PluginCapability.Service
        return pb.GetPluginCapabilitiesResponse(
            capabilities=[pb.PluginCapability(service=S(type=S.CONTROLLER_SERVICE))]
        )

    async def ControllerGetCapabilities(self, request: Any, context: Any) -> Any:
        caps = [pb.ControllerServiceCapability(rpc=CCap(type=CCap.Type.Value(c))) for c in sorted(self.caps)]
        return pb.ControllerGetCapabilitiesResponse(capabilities=caps)

    @staticmethod
    def _status(c: VolumeCondition) -> Any:
        return pb.ControllerGetVolumeResponse.VolumeStatus(
            volume_condition=pb.VolumeCondition(abnormal=c.abnormal, message=c.message)
        )

    async def ListVolumes(self, request: Any, context: Any) -> Any:
        self.calls["ListVolumes"] += 1
        self.tokens.append(request.starting_token)
        ids = sorted(self.conditions)
        i = int(request.starting_token or 0)
        entries = [
            pb.ListVolumesResponse.Entry(
                volume=pb.Volume(volume_id=v),
                status=pb.ListVolumesResponse.VolumeStatus(
                    volume_condition=pb.VolumeCondition(
                        abnormal=self.conditions[v].abnormal, message=self.conditions[v].message
                    )
                ),
            )
            for v in ids[i : i + 1]
        ]
        more = str(i + 1) if i + 1 < len(ids) else ""
        return pb.ListVolumesResponse(entries=entries, next_token=more)

    async def ControllerGetVolume(self, request: Any, context: Any) -> Any:
        self.calls["ControllerGetVolume"] += 1
        self.asked[request.volume_id] += 1
        c = self.conditions.get(request.volume_id)
        if c is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"volume {request.volume_id} not found")
        assert c is not None
        return pb.ControllerGetVolumeResponse(
            volume=pb.Volume(volume_id=request.volume_id), status=self._status(c)
        )


@pytest.fixture
async def scripted(tmp_path: Any) -> AsyncIterator[tuple[HealthCSI, CSIClient]]:
    peer = HealthCSI()
    server = grpc.aio.server()
    pbg.add_IdentityServicer_to_server(peer, server)
    pbg.add_ControllerServicer_to_server(peer, server)
    sock = str(tmp_path / "health.sock")
    server.add_insecure_port("unix://" + sock)
    await server.start()
    client = CSIClient("unix://" + sock, timeout=5)
    try:
        yield peer, client
    finally:
        await client.close()
        await server.stop(None)


async def claims(api: FakeKubeAPI, peer: HealthCSI) -> dict[str, Obj]:
    """On node-1: a (abnormal), b (healthy), gone (unknown to the driver).  Elsewhere or not
    ours: far (another node), alien (another driver), loose (not Bound) -- all abnormal."""
    peer.conditions = {
        "vol-a": VolumeCondition(True, "disk on fire"),
        "vol-b": VolumeCondition(False, ""),
        "vol-far": VolumeCondition(True, "far away"),
        "vol-alien": VolumeCondition(True, "not ours"),
        "vol-loose": VolumeCondition(True, "not bound"),
    }
    out = {n: await bind(api, n, f"vol-{n}", driver=SCRIPTED, node="node-1") for n in ("a", "b", "gone")}
    out["far"] = await bind(api, "far", "vol-far", driver=SCRIPTED, node="node-2")
    out["alien"] = await bind(api, "alien", "vol-alien", driver="other.csi-kit.io", node="node-1")
    out["loose"] = await bind(api, "loose", "vol-loose", driver=SCRIPTED, node="node-1", phase="Released")
    return out


@pytest.mark.parametrize("mode", ["list", "get"])
async def test_each_interval_asks_the_driver_the_way_its_capabilities_allow(
    api: FakeKubeAPI,
    scripted: tuple[HealthCSI, CSIClient],
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    peer, client = scripted
    peer.caps = {"VOLUME_CONDITION", "GET_VOLUME"} | ({"LIST_VOLUMES"} if mode == "list" else set())
    made = await claims(api, peer)
    info = await client.driver_info()
    events = EventRecorder(api, COMPONENT_PREFIX + SCRIPTED)
    monitor = HealthMonitor(
        api, client, info, interval=0.02, events=events, node_topology={HOSTNAME_LABEL: "node-1"}, **FAST
    )
    assert monitor.mode == mode
    with caplog.at_level(logging.WARNING, logger="csi_kit.k8s.volume.health"):
        tasks = await start(monitor)
        try:
            await checked(monitor, "pv-a", "pv-b", "pv-gone")
            (event,) = await eventually(lambda: events_on(api, made["a"]), "the abnormal Event")
            assert (event["type"], event["reason"], event["message"]) == (
                "Warning",
                REASON_ABNORMAL,
                "disk on fire",
            )

            # A new message is a new Event; the same one is not repeated.
            peer.conditions["vol-a"] = VolumeCondition(True, "disk on fire, smoke everywhere")
            await eventually(lambda: len(events_on(api, made["a"])) == 2, "the changed condition's Event")
            await checked(monitor, "pv-a", "pv-gone")
        finally:
            await stop_tasks(tasks)
            await events.flush()
    assert [e["message"] for e in events_on(api, made["a"])] == [
        "disk on fire",
        "disk on fire, smoke everywhere",
    ]
    assert {k.name_of(e) for e in api.objects(EVENT)} == {k.name_of(e) for e in events_on(api, made["a"])}
    assert not {"pv-far", "pv-alien", "pv-loose"} & set(monitor.checks), (
        "not this node's, not ours, not bound"
    )
    # Upstream records nothing for a volume the driver does not know: one log line, no Event.
    gone = [r for r in caplog.records if "does not know its volume vol-gone" in r.getMessage()]
    assert len(gone) == 1
    if mode == "list":
        assert peer.calls["ControllerGetVolume"] == 0
        # One paged walk per interval: every page of the five volumes, in order, each time.
        walks = peer.tokens.count("")
        assert walks >= 3 and peer.tokens[: 5 * walks - 5] == ["", "1", "2", "3", "4"] * (walks - 1)
    else:
        assert peer.calls["ListVolumes"] == 0
        assert set(peer.asked) == {"vol-a", "vol-b", "vol-gone"}


async def test_a_persistent_condition_is_recorded_again_before_its_event_expires(
    api: FakeKubeAPI, scripted: tuple[HealthCSI, CSIClient]
) -> None:
    peer, client = scripted
    peer.caps = {"VOLUME_CONDITION", "LIST_VOLUMES"}
    peer.conditions = {"vol-a": VolumeCondition(True, "")}  # no message: a default one
    claim = await bind(api, "a", "vol-a", driver=SCRIPTED)
    events = EventRecorder(api, COMPONENT_PREFIX + SCRIPTED)
    info = await client.driver_info()
    monitor = HealthMonitor(api, client, info, interval=0.02, events=events, repeat_after=0.0, **FAST)
    tasks = await start(monitor)
    try:
        await eventually(lambda: len(events_on(api, claim)) >= 2, "the repeated Event")
    finally:
        await stop_tasks(tasks)
        await events.flush()
    assert {e["message"] for e in events_on(api, claim)} == {"the driver reports the volume as abnormal"}


def test_the_interval_must_be_a_positive_number() -> None:
    info = DriverInfo("x", "1", frozenset(), frozenset(), frozenset())
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number of seconds"):
            HealthMonitor(FakeKubeAPI(), None, info, interval=bad)  # type: ignore[arg-type]


async def test_per_node_it_needs_the_node_name_and_takes_no_lease(
    api: FakeKubeAPI, hostpath: tuple[str, CSIClient]
) -> None:
    _, client = hostpath
    info = await client.driver_info()
    args = parse("--controllers", "health-monitor", "--node-deployment", "--node-name", "node-1")
    ctx = loop_context(args, api, client, info)
    try:
        (plan,) = await health.build(ctx)
        monitor = plan.loop
        assert plan.lease is None
        assert isinstance(monitor, HealthMonitor) and monitor.node_topology is not None
        assert monitor.node_topology[HOSTNAME_LABEL] == "node-1"
        with pytest.raises(ValueError, match="--node-name"):
            await health.build(loop_context(parse("--node-deployment", "--node-name", ""), api, client, info))
    finally:
        await ctx.clients.close()
