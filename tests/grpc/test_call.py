"""`csi-kit call` against the real hostPath driver: requests from flags and
files, the three output formats, exit status from the gRPC status, secrets
that never show, and a dead endpoint that is one line."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from csi_kit import call
from csi_kit._pb import csi_pb2
from csi_kit.testing.driver import running_driver

UNAVAILABLE = call.EXIT_OFFSET + 14


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_driver(str(tmp_path_factory.mktemp("call-driver"))) as ep:
        yield ep


def run(*argv: str, stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    rc = call.main(list(argv), stdin=io.StringIO(stdin), out=out)
    return rc, out.getvalue()


def run_json(*argv: str, stdin: str = "") -> dict[str, Any]:
    rc, out = run(*argv, "-o", "json", stdin=stdin)
    assert rc == 0, out
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def test_every_rpc_of_the_schema_is_listed() -> None:
    out = io.StringIO()
    assert call.main(["--list"], out=out) == 0
    listed = {line.split(":")[0].removesuffix(" (stream)") for line in out.getvalue().splitlines()}
    expected = {f"{s.name}.{m.name}" for s in csi_pb2.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert listed == expected
    assert {"Node.NodePublishVolume", "GroupController.CreateVolumeGroupSnapshot"} <= listed
    assert "SnapshotMetadata.GetMetadataDelta (stream)" in out.getvalue()


@pytest.mark.parametrize(
    "spelling", ["CreateVolume", "Controller.CreateVolume", "controller/create-volume", "createvolume"]
)
def test_method_spellings(spelling: str) -> None:
    m = call.find_method(spelling)
    assert (m.service, m.name) == ("Controller", "CreateVolume")


def test_create_list_delete_from_flags(endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    created = run_json("--endpoint", endpoint, "CreateVolume", "--name", "call-a", "--size", "2Mi")
    vol = created["volume"]
    assert int(vol["capacity_bytes"]) >= 2 * 2**20
    rc, out = run("--endpoint", endpoint, "ListVolumes", "-o", "yaml")
    assert rc == 0
    ids = [e["volume"]["volume_id"] for e in yaml.safe_load(out)["entries"]]
    assert vol["volume_id"] in ids
    rc, out = run("--endpoint", endpoint, "DeleteVolume", "--volume-id", vol["volume_id"])
    assert (rc, out) == (0, "")
    rc, out = run("--endpoint", endpoint, "ListVolumes", "-o", "json")
    assert vol["volume_id"] not in out


def test_text_output_is_protobuf_text_format(endpoint: str) -> None:
    rc, out = run("--endpoint", endpoint, "GetPluginInfo")
    assert rc == 0
    assert 'name: "hostpath.csi-kit.io"' in out.splitlines()


def test_request_from_json_on_stdin_and_yaml_file(endpoint: str, tmp_path: Any) -> None:
    body = json.dumps({"name": "call-json", "capacityRange": {"requiredBytes": "3145728"}})
    got = run_json("--endpoint", endpoint, "CreateVolume", "--request-file", "-", stdin=body)
    assert got["volume"]["capacity_bytes"] == "3145728"
    f = tmp_path / "req.yaml"
    f.write_text("name: call-yaml\ncapacity_range:\n  required_bytes: 1048576\n")
    got = run_json("--endpoint", endpoint, "CreateVolume", "--request-file", str(f), "--size", "4Mi")
    assert got["volume"]["capacity_bytes"] == str(4 * 2**20), "a flag wins over the file"


def test_request_file_errors_are_one_line(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    for args in (
        ["--request-file", str(bad)],
        ["--request-file", str(tmp_path / "missing.yaml")],
        ["--request-file", "-"],
        ["--volume-id", "v"],  # CreateVolume has no volume_id
    ):
        rc, _ = run("--endpoint", "unix:///nonexistent.sock", "CreateVolume", *args, stdin="[1, 2]")
        err = capsys.readouterr().err
        assert rc == 2
        assert len(err.strip().splitlines()) == 1 and err.startswith("csi-kit call: "), err
    rc, _ = run("--endpoint", "unix:///x.sock", "CreateVolume", "--request-file", "-", stdin='{"nosuch": 1}')
    assert rc == 2 and "nosuch" in capsys.readouterr().err


def test_exit_status_is_ten_plus_the_grpc_code(endpoint: str, tmp_path: Any) -> None:
    run_json("--endpoint", endpoint, "CreateVolume", "--name", "call-codes", "--size", "1Mi")
    rc, _ = run("--endpoint", endpoint, "CreateVolume", "--name", "call-codes", "--size", "5Mi")
    assert rc == call.EXIT_OFFSET + 6  # ALREADY_EXISTS
    rc, _ = run("--endpoint", endpoint, "CreateVolume", "--size", "1Mi")
    assert rc == call.EXIT_OFFSET + 3  # INVALID_ARGUMENT: no name
    target = tmp_path / "stats"
    target.mkdir()
    rc, _ = run(
        "--endpoint", endpoint, "NodeGetVolumeStats", "--volume-id", "nosuch", "--volume-path", str(target)
    )
    assert rc == call.EXIT_OFFSET + 5  # NOT_FOUND
    # The streaming service goes through the same road (hostPath does not serve it).
    rc, _ = run("--endpoint", endpoint, "GetMetadataAllocated", "--snapshot-id", "s")
    assert rc == call.EXIT_OFFSET + 12  # UNIMPLEMENTED


def test_secrets_go_into_the_request_and_are_never_printed(
    endpoint: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "secrets.yaml"
    f.write_text("password: hunter2-very-secret\nport: 5432\n")
    ns = call.build_parser().parse_args(["CreateSnapshot", "--secrets-file", str(f), "--name", "s"])
    req: Any = call.build_request(call.find_method("CreateSnapshot"), ns)
    assert dict(req.secrets) == {"password": "hunter2-very-secret", "port": "5432"}

    rc, out = run("--endpoint", endpoint, "CreateVolume", "--name", "call-sec", "--secrets-file", str(f))
    assert rc == 0
    # A broken secrets file: the error names the file and line, never its content.
    f.write_text("password: 'hunter2-very-secret\n")
    rc2, out2 = run("--endpoint", endpoint, "CreateVolume", "--name", "call-sec2", "--secrets-file", str(f))
    err = capsys.readouterr().err
    assert rc2 == 2 and str(f) in err
    assert "hunter2" not in out + out2 + err
    # A method without a secrets field refuses the file instead of dropping it.
    assert run("--endpoint", endpoint, "Probe", "--secrets-file", str(f))[0] == 2


def test_volume_capability_defaults_and_flags() -> None:
    method = call.find_method("CreateVolume")
    req: Any = call.build_request(method, call.build_parser().parse_args(["CreateVolume", "--name", "n"]))
    (cap,) = req.volume_capabilities
    assert cap.HasField("mount")
    assert cap.access_mode.mode == csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    argv = ["NodePublishVolume", "--access-type", "block", "--access-mode", "single-node-multi-writer"]
    req = call.build_request(call.find_method("NodePublishVolume"), call.build_parser().parse_args(argv))
    assert req.volume_capability.HasField("block")
    assert (
        req.volume_capability.access_mode.mode == csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_MULTI_WRITER
    )


@pytest.mark.privileged
def test_publish_and_unpublish_through_call(tmp_path: Any) -> None:
    """A bind mount: run in a private mount namespace (`unshare -m`), as test.sh does."""
    with running_driver(str(tmp_path / "state")) as ep:
        vol = run_json("--endpoint", ep, "CreateVolume", "--name", "call-pub", "--size", "1Mi")["volume"]
        target = str(tmp_path / "target")
        args = ["--volume-id", vol["volume_id"], "--target-path", target]
        ctx = [f"--volume-context={k}={v}" for k, v in vol.get("volume_context", {}).items()]
        rc, _ = run("--endpoint", ep, "NodePublishVolume", *args, *ctx)
        assert rc == 0
        with open("/proc/self/mountinfo") as f:
            assert any(line.split()[4] == target for line in f)
        assert run("--endpoint", ep, "NodeUnpublishVolume", *args)[0] == 0
        with open("/proc/self/mountinfo") as f:
            assert not any(line.split()[4] == target for line in f)
        assert run("--endpoint", ep, "DeleteVolume", "--volume-id", vol["volume_id"])[0] == 0


def test_dead_endpoints_are_one_line_and_unavailable(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # A bound socket nobody accepts on, a missing socket, a TCP port with nothing behind it.
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    try:
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
        for ep in (f"unix://{stale}", f"unix://{tmp_path}/none.sock", f"127.0.0.1:{port}"):
            rc, out = run("--endpoint", ep, "--connect-timeout", "0.5", "Probe")
            err = capsys.readouterr().err
            assert rc == UNAVAILABLE and out == ""
            assert len(err.strip().splitlines()) == 1 and ep in err, err
    finally:
        s.close()


def test_the_cli_hands_call_over(tmp_path: Any) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "csi_kit.cli", "call", "--endpoint", f"unix://{tmp_path}/x.sock", "Probe"],
        capture_output=True,
        text=True,
        env={**os.environ, "CSI_KIT_ENDPOINT": ""},
    )
    assert p.returncode == UNAVAILABLE
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_a_stream_prints_one_document_per_message() -> None:
    method = call.find_method("GetMetadataDelta")
    assert method.streaming and method.path == "/csi.v1.SnapshotMetadata/GetMetadataDelta"
    msgs = [
        csi_pb2.GetMetadataDeltaResponse(
            volume_capacity_bytes=2**20,
            block_metadata=[csi_pb2.BlockMetadata(byte_offset=i, size_bytes=4096)],
        )
        for i in (0, 8192)
    ]
    out = io.StringIO()
    call.render(iter(msgs), "json", True, out)
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["block_metadata"][0].get("byte_offset", "0") for line in lines] == ["0", "8192"]
    out = io.StringIO()
    call.render(iter(msgs), "yaml", True, out)
    docs = list(yaml.safe_load_all(out.getvalue()))
    assert [d["volume_capacity_bytes"] for d in docs] == [str(2**20)] * 2
