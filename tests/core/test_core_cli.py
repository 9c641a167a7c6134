"""The ``csi-kit`` command: backends listing, flags and their environment
variables, defaults that make a bare ``csi-kit`` serve, clear errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from helpers import Csi, short_dir

from csi_kit._pb import csi_pb2 as pb
from csi_kit._version import __version__
from csi_kit.cli import build_parser, main
from csi_kit.testing.driver import DriverProcess

CSI_KIT = os.path.join(os.path.dirname(sys.executable), "csi-kit")


@pytest.fixture
def state() -> Iterator[str]:
    with short_dir() as d:
        yield d


def test_backends_lists_hostpath(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("hostpath\t"))
    assert "csi_kit_backends.hostpath.backend.HostPathBackend" in line
    assert "(from csi_kit_backends.hostpath.plugin)" in line
    block = out[out.index("hostpath\t") :]
    assert "snapshots" in block.splitlines()[1] and "group_snapshots" in block.splitlines()[1]
    assert "access: mount" in block


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"csi-kit {__version__}"


def test_every_serve_flag_reads_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "CSI_KIT_BACKEND": "mine",
        "CSI_KIT_BACKEND_OPTIONS": "root=/srv/x quota=off",
        "CSI_KIT_NODE_ID": "env-node",
        "CSI_KIT_DRIVER_NAME": "env.example.io",
        "CSI_KIT_STATE_DIR": "/srv/state",
        "CSI_KIT_MODE": "node",
        "CSI_KIT_WORKERS": "3",
        "CSI_KIT_METRICS_ADDRESS": "127.0.0.1:9999",
        "CSI_KIT_SOCKET_MODE": "0660",
        "CSI_KIT_DRAIN_SECONDS": "7.5",
        "CSI_KIT_LOG_LEVEL": "debug",
        "CSI_KIT_LOG_FORMAT": "json",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(["serve"])
    assert args.backend == "mine"
    assert args.backend_option == ["root=/srv/x quota=off"]
    assert args.node_id == "env-node"
    assert args.driver_name == "env.example.io"
    assert args.state_dir == "/srv/state"
    assert args.mode == "node"
    assert args.workers == 3
    assert args.metrics_address == "127.0.0.1:9999"
    assert args.socket_mode == "0660"
    assert args.drain_seconds == 7.5
    assert args.log_level == "debug"
    assert args.log_format == "json"
    # A flag wins over its variable.
    assert build_parser().parse_args(["serve", "--node-id", "flag-node"]).node_id == "flag-node"


def test_defaults_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CSI_KIT_"):
            monkeypatch.delenv(key)
    args = build_parser().parse_args(["serve"])
    assert args.backend == "hostpath"
    assert args.node_id == os.uname().nodename
    assert args.mode == "all"
    assert args.endpoint is None  # resolved to unix://STATE_DIR/csi.sock when serving
    if os.geteuid() == 0:
        assert args.state_dir == "/var/lib/csi-kit"
    else:
        assert args.state_dir.endswith("/.local/share/csi-kit")


def test_unknown_backend_is_a_clear_error(state: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--backend", "nope", "--state-dir", state, "--endpoint", f"unix://{state}/s.sock"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown backend 'nope'" in err and "hostpath" in err


def test_unknown_backend_option_is_a_clear_error(state: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--state-dir", state, "--backend-option", "colour=red"])
    assert code == 2
    assert "no option 'colour'" in capsys.readouterr().err


def test_malformed_backend_option_exits(state: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--state-dir", state, "--backend-option", "novalue"]) == 2
    assert "not KEY=VALUE" in capsys.readouterr().err


def test_bare_csi_kit_serves_with_environment_only(state: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`csi-kit` with no arguments at all: the state directory from the environment,
    the socket and the hostPath root under it, and where it listens printed."""
    for key in list(os.environ):
        if key.startswith("CSI_KIT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CSI_KIT_STATE_DIR", state)
    monkeypatch.setenv("CSI_KIT_NODE_ID", "env-node")
    monkeypatch.setenv("CSI_KIT_DRIVER_NAME", "env.example.io")
    sock = os.path.join(state, "csi.sock")
    proc = DriverProcess([CSI_KIT], sock, os.path.join(state, "out.log"))
    proc.start()
    try:
        with Csi(proc.endpoint) as csi:
            assert csi.identity.GetPluginInfo(pb.GetPluginInfoRequest()).name == "env.example.io"
            assert csi.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id == "env-node"
            vol = csi.create("bare")
        assert os.path.isdir(os.path.join(state, "hostpath", "volumes", vol.volume_id))
    finally:
        assert proc.stop() == 0
    with open(proc.log_path) as f:
        out = f.read()
    assert f"listening on unix://{sock}" in out
    assert f"state in {state}" in out
