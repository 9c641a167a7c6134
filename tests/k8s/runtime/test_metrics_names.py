"""The loops' metrics are the upstream sidecars' metrics: a dashboard or alert
written for external-snapshotter/-provisioner works unchanged.

What csi-lib-utils (metrics/metrics.go) defines and the sidecars export:
``csi_sidecar_operations_seconds``, a histogram with exactly the labels
``driver_name``, ``method_name`` (the full gRPC method) and
``grpc_status_code`` (gRPC-Go's code names), buckets .1 … 600 s.  The test
scrapes the metrics endpoint of a `csi-kit controllers` run after real
loop work, and checks the ports and events options that go with it.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import grpc
import pytest
from csi_peer import ScriptedCSI
from k8s_helpers import DRIVER, cli_running, eventually, is_ready, make_class, make_snapshot, make_volume
from prometheus_client.parser import text_string_to_metric_families

from csi_kit.cli import build_parser, main
from csi_kit.k8s.cli import selected
from csi_kit.k8s.runtime.metrics import grpc_code_name
from csi_kit.testing.fake_k8s import FakeKubeAPI

UPSTREAM_NAME = "csi_sidecar_operations_seconds"
UPSTREAM_LABELS = {"driver_name", "method_name", "grpc_status_code"}
UPSTREAM_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 25, 50, 120, 300, 600, float("inf")]
# gRPC-Go's codes.Code.String(), the label values upstream records.
GO_CODE_NAMES = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def test_status_codes_are_spelled_as_grpc_go_does() -> None:
    assert {c.name: grpc_code_name(c) for c in grpc.StatusCode} == GO_CODE_NAMES


async def test_scrape_after_loop_work_has_the_sidecar_metric(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    _, endpoint = peer
    port = free_port()
    args = build_parser().parse_args(
        [
            "controllers",
            "--controllers",
            "snapshot",
            "--metrics-address",
            f"127.0.0.1:{port}",
            "--kube-api-qps",
            "0",
        ]
    )
    async with cli_running(args, endpoint, api, limit=60):
        await make_volume(api)
        await make_class(api)
        await make_snapshot(api, "m")
        await eventually(lambda: is_ready(api, "m"), "snapshot ready")
        text = await asyncio.to_thread(scrape, port)

    families = {f.name: f for f in text_string_to_metric_families(text)}
    family = families[UPSTREAM_NAME]
    assert family.type == "histogram"
    calls: dict[tuple[str, str], float] = {}
    discovery: set[str] = set()
    buckets: set[float] = set()
    for sample in family.samples:
        labels = dict(sample.labels)
        le = labels.pop("le", None)
        assert set(labels) == UPSTREAM_LABELS, sample
        if sample.name.endswith("_bucket") and labels["driver_name"] == DRIVER:
            buckets.add(float(le or "nan"))
        if sample.name.endswith("_count") and labels["driver_name"] == DRIVER:
            calls[(labels["method_name"], labels["grpc_status_code"])] = sample.value
        if sample.name.endswith("_count") and labels["method_name"] == "/csi.v1.Identity/GetPluginInfo":
            discovery.add(labels["driver_name"])
    assert sorted(buckets) == UPSTREAM_BUCKETS
    # The first call learns the name: upstream records it under "unknown-driver" too.
    assert discovery & {DRIVER, "unknown-driver"}
    assert calls.get(("/csi.v1.Controller/CreateSnapshot", "OK"), 0) >= 1
    # Earlier tests in this process may have left failed calls: all spelled as upstream.
    assert set(GO_CODE_NAMES.values()) | {"unknown-non-grpc"} >= {code for _, code in calls}


def test_metrics_and_liveness_ports_differ_by_default_and_never_clash() -> None:
    args = build_parser().parse_args(["serve", "--controllers", "all"])
    assert args.health_port == 9808
    assert not args.metrics_address, "metrics are off until asked for"
    ok = build_parser().parse_args(["serve", "--controllers", "all", "--metrics-address", ":9809"])
    assert "liveness" in selected(ok)
    clash = build_parser().parse_args(["serve", "--controllers", "all", "--metrics-address", "0.0.0.0:9808"])
    with pytest.raises(ValueError, match="same port"):
        selected(clash)
    other_host = build_parser().parse_args(
        [
            "serve",
            "--controllers",
            "all",
            "--metrics-address",
            "127.0.0.2:9808",
            "--health-address",
            "127.0.0.1",
        ]
    )
    assert "liveness" in selected(other_host)


def test_a_port_clash_is_one_line_before_serving(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--state-dir", str(tmp_path), "--controllers", "all", "--metrics-address", ":9808"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "same port" in err


def test_one_events_switch_on_by_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CSI_KIT_EVENTS", raising=False)
    monkeypatch.delenv("CSI_KIT_K8S_EVENTS", raising=False)
    parse = build_parser().parse_args
    assert parse(["serve"]).events is True
    assert parse(["serve", "--no-events"]).events is False
    assert capsys.readouterr().err == ""
    assert parse(["serve", "--no-k8s-events"]).events is False
    assert "--no-k8s-events is deprecated" in capsys.readouterr().err
    monkeypatch.setenv("CSI_KIT_K8S_EVENTS", "false")  # the old variable still counts
    assert build_parser().parse_args(["controllers"]).events is False
    monkeypatch.setenv("CSI_KIT_EVENTS", "true")  # the new one wins
    assert build_parser().parse_args(["controllers"]).events is True
