"""Build hook: generate csi_kit/_pb from proto/csi.proto (never committed).

All metadata lives in setup.cfg; this file only adds the protoc step so that
every build (wheel, sdist install, editable) carries code made from the
project's own schema with the grpcio-tools version pinned in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "csi_kit", "_pb")


def generate_protos() -> None:
    """Run protoc (from grpcio-tools) on proto/csi.proto into csi_kit/_pb."""
    import grpc_tools
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        # The proto is placed at csi_kit/_pb/csi.proto inside the include root
        # so the generated gRPC module imports its messages package-relative.
        pkg = os.path.join(tmp, "csi_kit", "_pb")
        os.makedirs(pkg)
        shutil.copy(os.path.join(HERE, "proto", "csi.proto"), pkg)
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{tmp}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                "csi_kit/_pb/csi.proto",
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        os.makedirs(OUT, exist_ok=True)
        for name in ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py"):
            shutil.copy(os.path.join(pkg, name), os.path.join(OUT, name))


class BuildPy(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


class SDist(sdist):
    def run(self) -> None:
        generate_protos()
        super().run()


def packages() -> list[str]:
    """csi_kit's packages, plus backends/ installed as csi_kit_backends."""
    ours = find_packages(HERE, include=["csi_kit", "csi_kit.*"])
    backends = [f"csi_kit_backends.{p}" for p in find_packages(os.path.join(HERE, "backends"))]
    return [*ours, "csi_kit_backends", *backends]


setup(packages=packages(), cmdclass={"build_py": BuildPy, "sdist": SDist})
