"""run(): argv-only, failures kept, timeouts kill the whole process group, missing tools named."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from csi_kit.errors import CommandFailed, DeadlineExceeded, FailedPrecondition
from csi_kit.linux.run import Result, run


def test_success_captures_output() -> None:
    result = run(["sh", "-c", "echo out; echo err >&2"])
    assert result == Result(
        argv=("sh", "-c", "echo out; echo err >&2"), returncode=0, stdout="out\n", stderr="err\n"
    )


def test_failure_raises_with_status_and_stderr() -> None:
    with pytest.raises(CommandFailed) as info:
        run(["sh", "-c", "echo first >&2; echo 'it broke' >&2; exit 3"])
    assert info.value.returncode == 3
    assert "it broke" in info.value.stderr
    assert info.value.argv[0] == "sh"
    assert "status 3" in str(info.value) and "it broke" in str(info.value)
    assert info.value.code == "INTERNAL"


def test_failure_without_check_returns_result() -> None:
    result = run(["sh", "-c", "echo nope >&2; exit 5"], check=False)
    assert result.returncode == 5
    assert result.stderr == "nope\n"


@pytest.mark.parametrize("argv", ["echo hello", b"echo hello"])
def test_string_argv_is_rejected(argv: str) -> None:
    with pytest.raises(TypeError, match="argv list"):
        run(argv)


def test_bad_argv_items_are_rejected() -> None:
    with pytest.raises(ValueError):
        run([])
    with pytest.raises(TypeError):
        run(["echo", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="NUL"):
        run(["echo", "a\0b"])


def test_missing_binary_is_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="csi-kit-no-such-tool is not installed"):
        run(["csi-kit-no-such-tool", "--version"])


def test_no_shell_interpretation() -> None:
    result = run(["echo", "$HOME; rm -rf /tmp/x && `id`"])
    assert result.stdout == "$HOME; rm -rf /tmp/x && `id`\n"


def test_stdin_is_devnull_without_input() -> None:
    # cat would wait forever on an inherited terminal or pipe.
    assert run(["cat"], timeout=10).stdout == ""


def test_input_is_fed_to_stdin() -> None:
    assert run(["cat"], input=b"hello\x00world").stdout == "hello\x00world"


def test_invalid_utf8_is_replaced() -> None:
    assert run(["printf", "a\\377b"]).stdout == "a\ufffdb"


def test_env_overrides_and_locale_is_c() -> None:
    result = run(["sh", "-c", 'echo "$CSI_KIT_TEST_VAR $LC_ALL $PATH"'], env={"CSI_KIT_TEST_VAR": "yes"})
    var, lc_all, path = result.stdout.split()
    assert (var, lc_all) == ("yes", "C")
    assert path == os.environ["PATH"]
    assert run(["sh", "-c", "echo $LC_ALL"], env={"LC_ALL": "C.UTF-8"}).stdout == "C.UTF-8\n"


def test_file_descriptors_are_not_inherited() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    high = os.dup2(fd, 97, inheritable=True)
    try:
        listing = run(["ls", "/proc/self/fd"]).stdout.split()
    finally:
        os.close(fd)
        os.close(high)
    assert "97" not in listing
    assert {"0", "1", "2"} <= set(listing)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"sleep 60 & echo $! > {pidfile}; wait"
    with pytest.raises(DeadlineExceeded, match=r"did not finish within 0\.5 s"):
        run(["sh", "-c", script], timeout=0.5)
    grandchild = int(pidfile.read_text())
    for _ in range(50):  # SIGKILL delivery is asynchronous; reaping by init may lag
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_argv_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="csi_kit.linux"):
        run(["echo", "logged-argument"])
    assert any("logged-argument" in r.getMessage() for r in caplog.records if r.name == "csi_kit.linux")
