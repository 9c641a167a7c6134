"""The third-party path: install examples/scratch-backend as its own
distribution, find it through the entry point, serve it over a real socket."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import grpc
import pytest

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pb_grpc
from csi_kit.testing.driver import DriverProcess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
EXAMPLE = os.path.join(REPO, "examples", "scratch-backend")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> str:
    target = str(tmp_path_factory.mktemp("site"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            target,
            EXAMPLE,
        ],
        check=True,
        capture_output=True,
    )
    return target


def _env(site: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH", "")) if p)
    return env


def test_listed_by_csi_kit_backends(installed: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "csi_kit.cli", "backends"],
        env=_env(installed),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "scratch\tcsi_kit_scratch.backend.ScratchBackend" in out
    assert "hostpath\t" in out


def test_served_and_its_parameter_applies(installed: str, tmp_path) -> None:
    state = str(tmp_path / "state")
    sock = str(tmp_path / "csi.sock")
    argv = [
        sys.executable,
        "-m",
        "csi_kit.cli",
        "serve",
        "--backend",
        "scratch",
        "--endpoint",
        f"unix://{sock}",
        "--state-dir",
        state,
        "--node-id",
        "n1",
        "--driver-name",
        "scratch.example.io",
    ]
    proc = DriverProcess(argv, sock, str(tmp_path / "driver.log"))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = _env(installed)["PYTHONPATH"]
    try:
        proc.start()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    try:
        with grpc.insecure_channel(proc.endpoint) as ch:
            ctl = pb_grpc.ControllerStub(ch)
            cap = pb.VolumeCapability(
                mount=pb.VolumeCapability.MountVolume(),
                access_mode=pb.VolumeCapability.AccessMode(
                    mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
                ),
            )
            info = pb_grpc.IdentityStub(ch).GetPluginInfo(pb.GetPluginInfoRequest())
            assert info.name == "scratch.example.io"
            vol = ctl.CreateVolume(
                pb.CreateVolumeRequest(name="a", volume_capabilities=[cap], parameters={"mode": "0750"})
            ).volume
            path = os.path.join(state, "scratch", "volumes", vol.volume_id)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o750
            with pytest.raises(grpc.RpcError) as bad:
                ctl.CreateVolume(
                    pb.CreateVolumeRequest(name="b", volume_capabilities=[cap], parameters={"mode": "rwx"})
                )
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "octal" in bad.value.details()
            with pytest.raises(grpc.RpcError) as unknown:
                ctl.CreateVolume(
                    pb.CreateVolumeRequest(name="c", volume_capabilities=[cap], parameters={"colour": "blue"})
                )
            assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "colour" in unknown.value.details()
            # nothing half-made after the rejected parameter
            assert os.listdir(os.path.join(state, "scratch", "volumes")) == [vol.volume_id]
    finally:
        proc.stop()
