"""Build hook: generate csi_kit/_pb from proto/*.proto (never committed).

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
    """Run protoc (from grpcio-tools) on every proto/*.proto into csi_kit/_pb."""
    import grpc_tools
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = sorted(f for f in os.listdir(os.path.join(HERE, "proto")) if f.endswith(".proto"))
    with tempfile.TemporaryDirectory() as tmp:
        # Each proto is placed at csi_kit/_pb/NAME.proto inside the include root
        # so the generated gRPC modules import their messages package-relative.
        pkg = os.path.join(tmp, "csi_kit", "_pb")
        os.makedirs(pkg)
        for name in protos:
            shutil.copy(os.path.join(HERE, "proto", name), pkg)
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{tmp}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *[f"csi_kit/_pb/{name}" for name in protos],
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        os.makedirs(OUT, exist_ok=True)
        for name in os.listdir(pkg):
            if name.endswith((".py", ".pyi")):
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
