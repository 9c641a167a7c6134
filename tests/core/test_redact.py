"""Secrets never reach a log line: the redaction of csi_secret fields, and the
logs of a real driver (in-process through caplog, and a `csi-kit serve`
process at debug level) after calls that carry secrets."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from helpers import Csi, create_req, mount_cap, short_dir

from csi_kit._grpc.redact import REDACTED, is_secret, redacted, request_fields
from csi_kit._pb import csi_pb2 as pb
from csi_kit.log import JsonFormatter, TextFormatter
from csi_kit.testing.driver import driver_process, running_driver

SECRET = "hunter2"
SECRETS = {"password": SECRET, "token": "s3cr3t-t0k3n"}


def _secret_fields() -> list[tuple[str, str]]:
    out = []
    for msg in pb.DESCRIPTOR.message_types_by_name.values():
        for field in msg.fields:
            if is_secret(field):
                out.append((msg.name, field.name))
    return out


def test_the_schema_marks_the_known_secret_fields() -> None:
    fields = set(_secret_fields())
    assert {
        ("CreateVolumeRequest", "secrets"),
        ("DeleteVolumeRequest", "secrets"),
        ("ControllerPublishVolumeRequest", "secrets"),
        ("CreateSnapshotRequest", "secrets"),
        ("NodeStageVolumeRequest", "secrets"),
        ("NodePublishVolumeRequest", "secrets"),
        ("ControllerExpandVolumeRequest", "secrets"),
        ("NodeExpandVolumeRequest", "secrets"),
        ("ListSnapshotsRequest", "secrets"),
        ("CreateVolumeGroupSnapshotRequest", "secrets"),
    } <= fields
    assert len(fields) >= 15


@pytest.mark.parametrize(("message", "field"), _secret_fields())
def test_every_secret_field_is_redacted(message: str, field: str) -> None:
    msg = getattr(pb, message)()
    desc = msg.DESCRIPTOR.fields_by_name[field]
    if desc.message_type is not None and desc.message_type.GetOptions().map_entry:
        getattr(msg, field).update(SECRETS)
    elif desc.type == FieldDescriptor.TYPE_STRING:
        setattr(msg, field, SECRET)
    else:  # pragma: no cover - the schema has no other secret shapes today
        pytest.fail(f"unexpected secret field shape {message}.{field}")
    out = redacted(msg)
    assert out[field] == REDACTED
    assert SECRET not in repr(out) and "s3cr3t" not in repr(out)
    assert SECRET not in repr(request_fields(msg))


def test_redacted_keeps_everything_else() -> None:
    req = create_req("vol-a", required=5, params={"k": "v"}, secrets=SECRETS)
    out = redacted(req)
    assert out["name"] == "vol-a"
    assert out["parameters"] == {"k": "v"}
    assert out["capacity_range"] == {"required_bytes": 5}
    assert out["volume_capabilities"][0]["access_mode"] == {"mode": 1}
    assert out["secrets"] == REDACTED
    assert request_fields(req) == {"object_name": "vol-a"}
    pub = pb.NodePublishVolumeRequest(volume_id="v", target_path="/t", secrets=SECRETS)
    assert request_fields(pub) == {"volume_id": "v", "target_path": "/t"}


def _calls_with_secrets(csi: Csi, state: str) -> None:
    """Calls that succeed and calls that fail, each carrying secrets."""
    vol = csi.controller.CreateVolume(create_req("sec-vol", secrets=SECRETS)).volume
    csi.controller.CreateSnapshot(
        pb.CreateSnapshotRequest(name="sec-snap", source_volume_id=vol.volume_id, secrets=SECRETS)
    )
    csi.controller.ListSnapshots(pb.ListSnapshotsRequest(secrets=SECRETS))
    csi.controller.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 << 30), secrets=SECRETS
        )
    )
    failing: list[tuple[Any, Any]] = [
        (csi.controller.CreateVolume, create_req("", secrets=SECRETS)),
        (csi.controller.CreateVolume, create_req("sec-bad", params={"bad": "x"}, secrets=SECRETS)),
        (
            csi.node.NodePublishVolume,
            pb.NodePublishVolumeRequest(
                volume_id="no-such-volume",
                target_path=os.path.join(state, "target"),
                volume_capability=mount_cap(),
                secrets=SECRETS,
            ),
        ),
        (
            csi.node.NodeStageVolume,
            pb.NodeStageVolumeRequest(
                volume_id=vol.volume_id,
                staging_target_path="/tmp/s",
                volume_capability=mount_cap(),
                secrets=SECRETS,
            ),
        ),
    ]
    for call, req in failing:
        with pytest.raises(Exception):  # noqa: B017 - any RpcError; only the logs matter here
            call(req, timeout=30)
    csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id, secrets=SECRETS))


def test_secrets_never_reach_in_process_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with short_dir() as state, running_driver(state) as ep, Csi(ep) as csi:
        _calls_with_secrets(csi, state)
    records = caplog.records
    requests = [r for r in records if r.getMessage() == "request"]
    assert len(requests) >= 8, "debug request logging did not happen: the check below would prove nothing"
    assert any(getattr(r, "request", {}).get("secrets") == REDACTED for r in requests)
    text, js = TextFormatter(), JsonFormatter()
    for record in records:
        for rendered in (text.format(record), js.format(record), repr(vars(record))):
            assert SECRET not in rendered and "s3cr3t" not in rendered, rendered


def test_secrets_never_reach_the_driver_process_log() -> None:
    with short_dir() as state:
        with driver_process(state, extra_args=["--log-level", "debug"]) as proc:
            with Csi(proc.endpoint) as csi:
                _calls_with_secrets(csi, state)
            assert proc.stop() == 0
        with open(proc.log_path) as f:
            log = f.read()
    assert "CreateVolume" in log and "NodePublishVolume" in log and "DeleteVolume" in log
    assert REDACTED in log  # request bodies were logged, with the secrets stripped
    assert SECRET not in log and "s3cr3t" not in log
