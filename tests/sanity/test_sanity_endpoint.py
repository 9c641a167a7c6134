"""`csi-kit sanity` after a plain `pip install csi-kit`, and against an
endpoint where no CSI driver answers: one line and exit status 2, not a
failure per test with the same cause."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from concurrent import futures
from typing import Any

import grpc
from setuptools.config.setupcfg import read_configuration

from csi_kit.testing.driver import running_driver
from csi_kit.testing.sanity.cli import endpoint_problem

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_plain_install_brings_the_suite_runtime() -> None:
    options = read_configuration(str(ROOT / "setup.cfg"))["options"]
    names = {r.split(">")[0].split("=")[0].strip().lower() for r in options["install_requires"]}
    assert {"pytest", "hypothesis"} <= names
    assert "sanity" in options["extras_require"], "old `csi-kit[sanity]` install lines keep working"


def sanity(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csi_kit.cli", "sanity", *argv], capture_output=True, text=True, timeout=120
    )


def test_dead_endpoint_is_one_line(tmp_path: Any) -> None:
    p = sanity("--endpoint", f"unix://{tmp_path}/nobody.sock", "--connect-timeout", "1")
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.startswith("csi-kit sanity: no CSI driver answers on ") and p.stderr.count("\n") == 1


def test_a_grpc_server_that_is_not_a_csi_driver_is_one_line(tmp_path: Any) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    sock = f"unix://{tmp_path}/other.sock"
    server.add_insecure_port(sock)
    server.start()
    try:
        p = sanity("--endpoint", sock, "--connect-timeout", "5")
    finally:
        server.stop(None)
    assert p.returncode == 2
    assert p.stdout == ""
    assert "does not serve the CSI Identity service" in p.stderr and p.stderr.count("\n") == 1


def test_a_live_driver_passes_the_check(tmp_path: Any) -> None:
    with running_driver(str(tmp_path)) as ep:
        assert endpoint_problem(ep, 5.0) is None
