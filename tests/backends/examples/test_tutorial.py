"""The docs' tutorial ("Your first backend", docs/tutorial.md) as a stranger follows it.

The commands are read from the page's ``sh`` blocks and run in order: install
the tutorial distribution (into a private directory instead of the
environment), list it, serve it, call it by hand, and run the conformance
suite against it, which must pass.  The code the page shows is included from
examples/tutorial-backend by the docs build, so page and test share one copy.
Bind mounts: root, in a private mount namespace (scripts/test.sh runs the
tests under ``unshare -m``).
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from csi_kit.testing.driver import DriverProcess

ROOT = pathlib.Path(__file__).resolve().parents[3]
PAGE = ROOT / "docs" / "tutorial.md"
EXAMPLE = ROOT / "examples" / "tutorial-backend"
STATE = "/tmp/dirs-driver"  # the page's state directory, replaced by a test's own
_TALLY = re.compile(r"^(\d+) passed, (\d+) failed, (\d+) skipped$")


def page_commands() -> list[str]:
    """Every command line of the page's ``sh`` blocks, in order."""
    blocks = re.findall(r"^```sh\n(.*?)^```", PAGE.read_text(), re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_page_shows_the_tested_files_not_copies() -> None:
    text = PAGE.read_text()
    for name in ("csi_kit_tutorial/backend.py", "csi_kit_tutorial/plugin.py", "setup.cfg", "pyproject.toml"):
        assert f'--8<-- "examples/tutorial-backend/{name}"' in text, name
        assert (EXAMPLE / name).is_file()
    assert "class DirBackend" not in text, "the code must be included, not pasted"


@pytest.mark.privileged
def test_a_stranger_follows_the_tutorial(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = page_commands()
    assert [c.split()[:2] for c in commands][:1] == [["pip", "install"]]
    assert any(c.startswith("csi-kit sanity ") for c in commands)
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE, source)  # pip builds in place: keep the checkout clean
    site, state = tmp_path / "site", tmp_path / "state"
    for key in [k for k in os.environ if k.startswith("CSI_KIT_")]:
        monkeypatch.delenv(key)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    monkeypatch.setenv("PYTHONPATH", path)  # every command, the driver too, finds the install
    driver: DriverProcess | None = None
    try:
        for line in commands:
            argv = shlex.split(line.replace(STATE, str(state)))
            background = argv[-1] == "&"
            argv = [a for a in argv if a != "&"]
            if argv[:2] == ["pip", "install"]:
                assert argv[2:] == ["./examples/tutorial-backend"], line
                pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
                subprocess.run([*pip, "--target", str(site), str(source)], check=True, capture_output=True)
                continue
            assert argv[0] == "csi-kit", line
            cmd = [sys.executable, "-m", "csi_kit.cli", *argv[1:]]
            if background:
                assert argv[1] == "serve", line
                sock = argv[argv.index("--endpoint") + 1].removeprefix("unix://")
                driver = DriverProcess(cmd, sock, str(tmp_path / "driver.log"))
                driver.start()
                continue
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            assert done.returncode == 0, f"{line}\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
            if argv[1] == "backends":
                assert "dirs\tcsi_kit_tutorial.backend.DirBackend" in done.stdout
            if argv[1:3] == ["call", "--endpoint"] and "GetPluginInfo" in argv:
                assert 'name: "dirs.csi-kit.io"' in done.stdout, (
                    "the default driver name is <backend>.csi-kit.io"
                )
            if argv[1] == "sanity":
                m = _TALLY.match(done.stdout.strip().splitlines()[-1])
                assert m and int(m.group(1)) > 50 and m.group(2) == "0", done.stdout[-3000:]
    finally:
        if driver is not None:
            assert driver.stop() == 0
