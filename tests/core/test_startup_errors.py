"""Ordinary start-up mistakes end in one clear line and exit 2, never a traceback
(issue 11, finding 8): a backend that raises in ``__init__`` or ``start()``, a
bad or busy metrics address, a state directory that cannot be made or
written (a non-root start with the default one), a bad backend option or
socket mode.  Each runs a real ``csi-kit serve`` process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import short_dir

#: ``csi-kit`` with two extra backends registered the way a plugin does: one
#: that raises in ``__init__``, one whose ``start`` fails.
_WITH_BROKEN_BACKENDS = """
import sys

import csi_kit.driver
from csi_kit.backend import Backend
from csi_kit.cli import main
from csi_kit.plugin import hookimpl, load_registry


class BrokenInit(Backend):
    def __init__(self, config, context):
        raise RuntimeError("cannot reach the array")


class BrokenStart(Backend):
    def start(self):
        raise OSError(5, "Input/output error")


class Plugin:
    @hookimpl
    def csi_kit_register_backends(self, registry):
        registry.add("broken-init", BrokenInit)
        registry.add("broken-start", BrokenStart)


csi_kit.driver.load_registry = lambda: load_registry([Plugin()])
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.fixture
def state() -> Iterator[str]:
    with short_dir() as d:
        yield d


def _serve(state: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", _WITH_BROKEN_BACKENDS, "serve", "--state-dir", state, *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env
    )


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The mistake is exit 2 and exactly one stderr line, with no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("csi-kit: ")
    return lines[0]


def test_backend_that_raises_in_init(state: str) -> None:
    line = _one_line(_serve(state, "--backend", "broken-init"))
    assert "backend 'broken-init' failed to initialise: RuntimeError: cannot reach the array" in line


def test_backend_whose_start_fails(state: str) -> None:
    line = _one_line(_serve(state, "--backend", "broken-start"))
    assert "backend 'broken-start' failed to start: Input/output error" in line
    assert not os.path.exists(os.path.join(state, "state.db"))  # nothing made for it


def test_hostpath_root_that_is_a_file(state: str) -> None:
    root = os.path.join(state, "not-a-directory")
    open(root, "w").close()
    line = _one_line(_serve(state, "--backend-option", f"root={root}"))
    assert "backend 'hostpath' failed to start" in line and root in line


def test_busy_metrics_port(state: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        line = _one_line(_serve(state, "--metrics-address", address))
    assert f"cannot serve metrics on {address}" in line
    assert not os.path.exists(os.path.join(state, "csi.sock"))


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:http", "127.0.0.1:99999"])
def test_bad_metrics_address(state: str, address: str) -> None:
    line = _one_line(_serve(state, "--metrics-address", address))
    assert f"metrics address {address!r}" in line


def test_state_dir_that_cannot_be_created(state: str) -> None:
    blocker = os.path.join(state, "file")
    open(blocker, "w").close()
    line = _one_line(_serve(os.path.join(blocker, "state")))
    assert f"cannot create the state directory {blocker}/state" in line


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_non_root_start_with_the_default_state_dir() -> None:
    """As a user whose home it cannot write (nobody), with every default."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"}
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    result = subprocess.run(
        [*argv, "-c", _WITH_BROKEN_BACKENDS, "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd="/",
    )
    if "No module named" in result.stderr:
        pytest.skip("the virtualenv is not readable by nobody here")
    line = _one_line(result)
    assert "cannot create the state directory /nonexistent/.local/share/csi-kit" in line
    assert "--state-dir" in line


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--backend", "nope"], "unknown backend 'nope'"),
        (["--backend-option", "novalue"], "backend option 'novalue' is not KEY=VALUE"),
        (["--backend-option", "quota=maybe"], "backend 'hostpath'"),
        (["--socket-mode", "rw"], "socket mode 'rw' is not an octal mode"),
    ],
)
def test_bad_configuration(state: str, args: list[str], words: str) -> None:
    assert words in _one_line(_serve(state, *args))


def test_bad_environment_value_is_a_usage_error(state: str) -> None:
    result = _serve(state, env={**os.environ, "CSI_KIT_WORKERS": "many"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--workers" in result.stderr and "many" in result.stderr


def test_debug_log_level_shows_the_cause(state: str) -> None:
    result = _serve(state, "--backend", "broken-init", "--log-level", "debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "RuntimeError: cannot reach the array" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("csi-kit: backend 'broken-init'")
