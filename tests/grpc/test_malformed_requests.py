"""Request bodies that do not decode: garbage bytes and invalid UTF-8 in string
fields are INVALID_ARGUMENT with one throttled log line, never UNKNOWN plus a
traceback per request (issue #11, finding 8: a log-flooding vector)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import pytest
from helpers import Csi, create_req, short_dir

from csi_kit._grpc import errors as grpc_errors
from csi_kit._pb import csi_pb2 as pb
from csi_kit.log import LogThrottle
from csi_kit.testing.driver import running_driver

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _with_bad_utf8(message: pb.CreateVolumeRequest | pb.NodePublishVolumeRequest, marker: bytes) -> bytes:
    """``message`` serialised, with a string field's ``marker`` replaced by invalid UTF-8."""
    data = message.SerializeToString()
    assert data.count(marker) == 1
    return data.replace(marker, b"\xff\xfe" + marker[2:])


#: (label, method, body, the message type the answer names)
BODIES: list[tuple[str, str, bytes, str]] = [
    ("garbage", "/csi.v1.Controller/CreateVolume", b"\xff\xff\xff\xff", "csi.v1.CreateVolumeRequest"),
    ("truncated", "/csi.v1.Controller/CreateVolume", b"\x0a\x40abc", "csi.v1.CreateVolumeRequest"),
    (
        "utf8-name",
        "/csi.v1.Controller/CreateVolume",
        _with_bad_utf8(create_req("MARKvol"), b"MARK"),
        "csi.v1.CreateVolumeRequest",
    ),
    (
        "utf8-map-value",
        "/csi.v1.Controller/CreateVolume",
        _with_bad_utf8(create_req("v", params={"k": "MARKval"}), b"MARK"),
        "csi.v1.CreateVolumeRequest",
    ),
    (
        "utf8-target-path",
        "/csi.v1.Node/NodePublishVolume",
        _with_bad_utf8(pb.NodePublishVolumeRequest(volume_id="v", target_path="/MARK/t"), b"MARK"),
        "csi.v1.NodePublishVolumeRequest",
    ),
    ("garbage-identity", "/csi.v1.Identity/GetPluginInfo", b"\x0f\xff", "csi.v1.GetPluginInfoRequest"),
]


@pytest.fixture
def frozen_throttle(monkeypatch: pytest.MonkeyPatch) -> LogThrottle:
    """A fresh throttle whose clock stands still: every request of a test
    falls in one interval, however slow the machine."""
    throttle = LogThrottle(grpc_errors.log, interval=10.0, clock=lambda: 1000.0)
    monkeypatch.setattr(grpc_errors, "undecodable_log", throttle)
    return throttle


@pytest.fixture
def endpoint() -> Iterator[str]:
    with short_dir() as state, running_driver(state) as ep:
        yield ep


def _raw_call(channel: grpc.Channel, method: str, body: bytes) -> grpc.RpcError:
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        call(body, timeout=30)
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"{method} accepted a body that does not decode")


@pytest.mark.parametrize(("label", "method", "body", "type_name"), BODIES, ids=[b[0] for b in BODIES])
def test_undecodable_body_is_invalid_argument(
    endpoint: str, frozen_throttle: LogThrottle, label: str, method: str, body: bytes, type_name: str
) -> None:
    with grpc.insecure_channel(endpoint) as channel:
        err = _raw_call(channel, method, body)
    assert err.code() == INVALID, err.details()
    assert (err.details() or "").startswith(f"request body does not decode as {type_name}: ")


def test_a_flood_of_undecodable_bodies_logs_one_line_per_method_and_no_traceback(
    endpoint: str, frozen_throttle: LogThrottle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(endpoint) as channel, Csi(endpoint) as csi:
        for _ in range(20):
            for _, method, body, _ in BODIES:
                assert _raw_call(channel, method, body).code() == INVALID
        # The driver still serves well-formed calls.
        assert csi.create("after-the-flood").volume_id
    about = [r for r in caplog.records if "does not decode" in r.getMessage()]
    per_method = sorted(getattr(r, "method", "") for r in about)
    assert per_method == ["CreateVolume", "GetPluginInfo", "NodePublishVolume"]
    assert all(r.levelno == logging.WARNING for r in about)
    assert not [r for r in caplog.records if r.exc_info or r.name.startswith("grpc")]
    assert "Traceback" not in caplog.text
    # No per-call line either: the throttled line is the only one.
    assert not [r for r in caplog.records if r.getMessage() == "CreateVolume INVALID_ARGUMENT"]


def test_the_throttle_logs_once_per_interval_with_a_count_of_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    logger = logging.getLogger("csi_kit.test.throttle")
    throttle = LogThrottle(logger, interval=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger=logger.name)
    assert throttle.log(logging.WARNING, "A", "first %s", "a")
    for _ in range(5):
        now[0] += 1.0
        assert not throttle.log(logging.WARNING, "A", "held")
    assert throttle.log(logging.WARNING, "B", "other key")  # keys are throttled apart
    now[0] = 10.0
    assert throttle.log(logging.WARNING, "A", "second")
    assert not throttle.log(logging.WARNING, "A", "held again")
    now[0] = 25.0
    assert throttle.log(logging.WARNING, "A", "third")
    assert [r.getMessage() for r in caplog.records] == [
        "first a",
        "other key",
        "second (5 more since the last report were not logged)",
        "third (1 more since the last report were not logged)",
    ]


#: Every method of the services csi_kit serves (SnapshotMetadata, a streaming
#: service, is not served).
SERVED = ("Identity", "Controller", "GroupController", "Node")
ALL_METHODS = [
    f"/{pb.DESCRIPTOR.services_by_name[svc].full_name}/{m.name}"
    for svc in SERVED
    for m in pb.DESCRIPTOR.services_by_name[svc].methods
]


def test_every_csi_method_answers_garbage_with_invalid_argument(
    endpoint: str, frozen_throttle: LogThrottle
) -> None:
    """Registration goes through the schema, so no method is left with a
    deserializer that raises (the hostPath driver serves all four services)."""
    assert len(ALL_METHODS) > 25
    with grpc.insecure_channel(endpoint) as channel:
        for method in ALL_METHODS:
            err = _raw_call(channel, method, b"\xff\xff\xff\xff")
            assert err.code() == INVALID, f"{method}: {err.code()} {err.details()}"


def test_a_garbage_body_to_the_health_service_logs_no_traceback(
    endpoint: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The gRPC health service is grpc's own code: it answers UNKNOWN, and grpc's ERROR with a
    traceback per request is cut down to one throttled WARNING line."""
    from csi_kit._grpc import server

    monkeypatch.setattr(
        server._decode_filter, "throttle", LogThrottle(server.log, interval=10.0, clock=lambda: 1.0)
    )
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(endpoint) as channel:
        for _ in range(10):
            err = _raw_call(channel, "/grpc.health.v1.Health/Check", b"\xff\xff\xff\x00garbage")
            assert err.code() in (grpc.StatusCode.UNKNOWN, INVALID)
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info]
    assert len([r for r in caplog.records if "did not decode" in r.getMessage()]) == 1
