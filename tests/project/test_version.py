"""The version lives in one place, ``csi_kit/_version.py``; everything else agrees.

setup.cfg reads it (``attr:``), the installed metadata and ``csi-kit --version``
report it, and every image tag ``csi-kit:X.Y.Z`` that the Dockerfile, the
README, the docs and the example manifests name is that version: the release
checklist (docs/releasing.md) bumps one file and this test names the rest.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import pathlib
import re
import subprocess
import sys

from csi_kit._version import __version__

ROOT = pathlib.Path(__file__).resolve().parents[2]
_TAG = re.compile(r"csi-kit:(\d+\.\d+\.\d+\S*?|latest)(?=[\s`'\"]|$)", re.M)


def test_setup_cfg_reads_the_version_module() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"].strip() == "attr: csi_kit._version.__version__"


def test_installed_metadata_and_cli_report_it() -> None:
    assert importlib.metadata.version("csi-kit") == __version__
    out = subprocess.run(
        [sys.executable, "-m", "csi_kit.cli", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"csi-kit {__version__}"


def test_every_image_tag_names_this_version() -> None:
    files = [ROOT / "Dockerfile", ROOT / "README.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    files += sorted((ROOT / "examples").rglob("*.yaml"))
    seen: list[tuple[str, str]] = []
    for f in files:
        for m in _TAG.finditer(f.read_text(encoding="utf-8")):
            seen.append((str(f.relative_to(ROOT)), m.group(1)))
    assert seen, "no csi-kit:X.Y.Z image tag found; the test lost its subject"
    wrong = [(f, v) for f, v in seen if v != __version__]
    assert not wrong, f"image tags naming another version than {__version__}: {wrong}"
