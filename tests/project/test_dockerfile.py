"""The container recipe, checked without a container engine (none runs here).

What can be known without building: every base image is pinned (exact
release tag or digest, never `latest` or a floating minor), every file it
copies exists and is not excluded by .dockerignore, the package it installs is
this distribution, the entry point it names is installed and importable, and
the system packages cover the tools the backends run.
"""

from __future__ import annotations

import configparser
import fnmatch
import importlib
import importlib.metadata
import os
import pathlib
import re
import shlex
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def test_every_base_image_is_pinned() -> None:
    stages: set[str] = set()
    froms = [args for ins, args in instructions() if ins == "FROM"]
    assert froms
    for args in froms:
        parts = args.split()
        image = parts[0]
        if len(parts) >= 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
        if image in stages:
            continue
        if "@sha256:" in image:
            assert re.search(r"@sha256:[0-9a-f]{64}$", image), image
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{image}: pin an exact tag or a digest"
        # An exact release: major.minor.patch (a bare "3.11" or "3" floats).
        assert re.match(r"^\d+\.\d+\.\d+([-.][a-z0-9.-]+)?$", tag), (
            f"{image}: tag {tag!r} is not an exact release"
        )


def _ignored(path: str) -> bool:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.rstrip("/") + "/*") for p in patterns)


def test_copied_files_exist_and_are_in_the_build_context() -> None:
    copies = [args for ins, args in instructions() if ins == "COPY" and not args.startswith("--from")]
    assert copies
    for args in copies:
        *sources, _dest = shlex.split(args)
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"COPY {src}: missing from the repository"
            assert not _ignored(src.rstrip("/")), f"COPY {src}: excluded by .dockerignore"
    # Everything the wheel build needs is copied: the build files and every package dir.
    copied = {s.rstrip("/") for args in copies for s in shlex.split(args)[:-1]}
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    package_dirs = {line.split("=")[1].strip() for line in cfg["options"]["package_dir"].strip().splitlines()}
    assert package_dirs | {"proto", "setup.py", "setup.cfg", "pyproject.toml", "README.md"} <= copied
    # The generated modules must come from the build, never from a developer's tree.
    assert _ignored("csi_kit/_pb/csi_pb2.py")


def test_the_installed_package_and_entry_point() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    runs = " ".join(args for ins, args in instructions() if ins == "RUN")
    assert re.search(rf"pip install [^&]*\b{re.escape(cfg['metadata']['name'])}\b", runs)
    (entry,) = [args for ins, args in instructions() if ins == "ENTRYPOINT"]
    (command,) = __import__("json").loads(entry)
    scripts = {
        line.split("=")[0].strip(): line.split("=")[1].strip()
        for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    }
    assert command in scripts, f"ENTRYPOINT {command} is not a console script of the distribution"
    # Installed in this environment (the same install the image makes), and its target imports.
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert eps.get(command) == scripts[command]
    module, _, attr = scripts[command].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert os.access(os.path.join(sysconfig.get_path("scripts"), command), os.X_OK), (
        f"{command} not installed"
    )


def test_system_packages_cover_the_tools_the_backends_run() -> None:
    runs = " ".join(args for ins, args in instructions() if ins == "RUN")
    # Tool (as csi_kit.linux / the backends call it) → Debian package that ships it.
    needed = {
        "mount": "mount",
        "blkid": "util-linux",
        "mkfs.ext4": "e2fsprogs",
        "resize2fs": "e2fsprogs",
        "e2fsck": "e2fsprogs",
        "mkfs.xfs": "xfsprogs",
        "xfs_growfs": "xfsprogs",
        "lvcreate": "lvm2",
        "thin_pool": "thin-provisioning-tools",
    }
    sources = " ".join(
        p.read_text() for p in [*ROOT.glob("csi_kit/linux/*.py"), *ROOT.glob("backends/*/*.py")]
    )
    for tool, package in needed.items():
        if f'"{tool}"' in sources:
            assert re.search(rf"\b{re.escape(package)}\b", runs), f"{tool} needs the {package} package"
