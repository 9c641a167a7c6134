"""`run_controllers` as the CLI runs it: discovery over CSI, Leases, leader loss, clean stop."""

from __future__ import annotations

import argparse
import asyncio

import pytest
from csi_peer import ScriptedCSI
from k8s_helpers import (
    DRIVER,
    cli_running,
    contents,
    eventually,
    is_ready,
    make_class,
    make_snapshot,
    make_volume,
    parse,
    settle,
)
from prometheus_client import REGISTRY

from csi_kit.k8s.cli import add_controller_options, run_controllers, selected
from csi_kit.k8s.objects.resources import LEASE
from csi_kit.k8s.runtime.api import ApiError, Obj, Resource
from csi_kit.testing.fake_k8s import FakeKubeAPI


def test_options_take_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSI_KIT_CONTROLLERS", "snapshotter")
    monkeypatch.setenv("CSI_KIT_KUBE_API_QPS", "50")
    monkeypatch.setenv("CSI_KIT_LEADER_ELECTION", "true")
    args = parse()
    assert args.controllers == "snapshotter" and args.kube_api_qps == 50.0 and args.leader_election
    assert selected(args) == {"snapshotter"}
    args = parse("--controllers", "snapshot", "--no-leader-election")
    assert selected(args) == {"snapshot-controller", "snapshotter"} and not args.leader_election
    with pytest.raises(ValueError):
        selected(parse("--controllers", "bogus"))


def leading(loop: str) -> float | None:
    return REGISTRY.get_sample_value("csi_kit_k8s_leader", {"loop": loop})


async def test_run_controllers_with_leader_election_and_leader_loss(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    _, endpoint = peer
    cut = [False]

    def partition(verb: str, res: Resource, name: str, body: Obj | None) -> None:
        if cut[0] and res == LEASE and verb in ("update", "create", "get"):
            raise ApiError(503, "ServiceUnavailable", "partitioned")

    api.reactors.append(partition)
    args = parse(
        "--controllers", "snapshot",
        "--leader-election", "--leader-election-namespace", "kube-system",
        "--leader-election-lease-duration", "0.6", "--leader-election-renew-deadline", "0.4",
        "--leader-election-retry-period", "0.05",
        "--kube-api-qps", "0", "--retry-interval-start", "0.01", "--retry-interval-max", "0.05",
    )  # fmt: skip
    async with cli_running(args, endpoint, api):
        await make_volume(api)
        await make_class(api)
        await make_snapshot(api, "a")
        await eventually(lambda: is_ready(api, "a"), "ready under leader election")
        names = {o["metadata"]["name"] for o in api.objects(LEASE)}
        assert names == {
            "snapshot-controller-leader",
            "external-snapshotter-leader-" + DRIVER.replace(".", "-"),
        }
        assert leading("snapshot-controller") == 1 and leading("snapshotter") == 1

        cut[0] = True  # the API becomes unreachable for the lease: loops must stop
        await eventually(lambda: leading("snapshot-controller") == 0 and leading("snapshotter") == 0, "lost")
        await make_snapshot(api, "b")
        await settle(api)
        assert len(contents(api)) == 1, "no loop runs without the lease"

        cut[0] = False
        await eventually(lambda: is_ready(api, "b"), "work resumes after re-election")
    for lease in api.objects(LEASE):
        assert not lease["spec"].get("holderIdentity"), "leases released on clean stop"


async def test_run_controllers_without_snapshot_capability_skips_snapshotter(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    csi, endpoint = peer

    async def no_snapshots(request, context):  # type: ignore[no-untyped-def]
        from csi_kit._pb import csi_pb2 as pb

        return pb.ControllerGetCapabilitiesResponse()

    monkeypatch.setattr(csi, "ControllerGetCapabilities", no_snapshots)
    stop = asyncio.Event()
    args = parse("--controllers", "snapshotter", "--kube-api-qps", "0")
    task = asyncio.create_task(run_controllers(args, endpoint, stop, connect=lambda a: api))
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(task, 10)


def test_options_fit_the_csi_kit_parser() -> None:
    """The lead's `serve` and `controllers` commands take our options without a clash."""
    from csi_kit.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "--controllers", "snapshot", "--k8s-workers", "3", "--workers", "7"])
    assert args.controllers == "snapshot" and args.k8s_workers == 3 and args.workers == 7
    args = parser.parse_args(["controllers", "--csi-address", "unix:///x.sock", "--kube-api-qps", "0"])
    # `csi-kit controllers` alone runs the snapshot loops (CSI_KIT_CONTROLLERS changes that).
    assert args.kube_api_qps == 0 and selected(args) == {"snapshot-controller", "snapshotter"}


def test_an_unknown_loop_ends_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from csi_kit.cli import main

    assert (
        main(["controllers", "--controllers", "snapshot,bogus", "--csi-address", "unix:///nowhere.sock"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("csi-kit: unknown controller 'bogus'; choose from all,") and err.count("\n") == 1


def test_every_registered_loop_is_a_controllers_choice() -> None:
    from csi_kit.k8s import registry

    parser = argparse.ArgumentParser()
    add_controller_options(parser)
    (group,) = [g for g in parser._action_groups if g.title == "Kubernetes loops"]
    help_text = next(a.help for a in group._group_actions if a.dest == "controllers") or ""
    for entry in registry.LOOPS:
        assert selected(parse("--controllers", entry.name)) == {entry.name}
        assert entry.name in help_text
    assert selected(parse("--controllers", "all")) == {e.name for e in registry.LOOPS if e.in_all}


async def test_hand_over_between_two_processes_mid_create_snapshot(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    """A leader cut off with CreateSnapshot in flight: its successor finishes the job; one snapshot cut."""
    csi, endpoint = peer
    csi.create_gate = asyncio.Event()
    cut: set[str] = set()

    def partition(verb: str, res: Resource, name: str, body: Obj | None) -> None:
        holder = ((body or {}).get("spec") or {}).get("holderIdentity")
        if res == LEASE and verb in ("update", "create") and holder in cut:
            raise ApiError(503, "ServiceUnavailable", "partitioned")

    api.reactors.append(partition)
    common = ("--controllers", "snapshot", "--leader-election", "--leader-election-namespace", "ns",
              "--leader-election-lease-duration", "0.6", "--leader-election-renew-deadline", "0.4",
              "--leader-election-retry-period", "0.05", "--kube-api-qps", "0",
              "--retry-interval-start", "0.01", "--retry-interval-max", "0.05")  # fmt: skip
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    a = asyncio.create_task(
        run_controllers(
            parse(*common, "--leader-election-identity", "a"), endpoint, stop_a, connect=lambda x: api
        )
    )
    await eventually(
        lambda: {(o["spec"] or {}).get("holderIdentity") for o in api.objects(LEASE)} == {"a"}, "a leads"
    )
    b = asyncio.create_task(
        run_controllers(
            parse(*common, "--leader-election-identity", "b"), endpoint, stop_b, connect=lambda x: api
        )
    )
    try:
        await make_volume(api)
        await make_class(api)
        await make_snapshot(api)
        await eventually(lambda: csi.create_started.is_set(), "a sent CreateSnapshot")
        cut.add("a")
        await eventually(
            lambda: {(o["spec"] or {}).get("holderIdentity") for o in api.objects(LEASE)} == {"b"},
            "b took over",
        )
        csi.create_gate.set()
        await eventually(lambda: is_ready(api), "b finished the snapshot")
        assert len(csi.names) == 1 and len(csi.snapshots) == 1, "one backend snapshot, same name"
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.wait_for(asyncio.gather(a, b), 10)
