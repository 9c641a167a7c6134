"""Run a system tool: the one place in csi_kit that starts a subprocess.

Every tool csi_kit uses (mount, mkfs.*, losetup, lvm...) goes through `run()`
so that the same rules hold everywhere:

- argv is a list, never a string, and no shell is involved, so a volume name
  or path can never be interpreted as shell syntax;
- stdin is /dev/null unless input is given, so a tool that prompts (mkfs on a
  device holding a filesystem, lvm asking "are you sure") fails instead of
  hanging the driver;
- the child runs in its own session and, on timeout, the whole process group
  is killed: a hung `mount` must not keep a worker thread forever;
- the environment is the driver's with ``LC_ALL=C``, so that messages we
  match on are the untranslated ones;
- failures keep argv, exit status and stderr (`CommandFailed`), a missing
  binary is `FailedPrecondition` (the node image lacks a package), a timeout
  is `DeadlineExceeded`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

import attrs

from csi_kit.errors import CommandFailed, DeadlineExceeded, FailedPrecondition

__all__ = ["Result", "run"]

log = logging.getLogger("csi_kit.linux")

# After a timeout kill, how long to wait for the pipes to close.  A
# grandchild that left the process group could hold them open forever.
_REAP_TIMEOUT = 5.0


@attrs.frozen
class Result:
    """What a finished command returned; stdout/stderr decoded as UTF-8 (invalid bytes replaced)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _decode(data: bytes | None) -> str:
    return data.decode("utf-8", errors="replace") if data else ""


def _check_argv(argv: Sequence[str]) -> tuple[str, ...]:
    if isinstance(argv, (str, bytes)):
        raise TypeError("run() takes an argv list, not a string: no shell is ever used")
    args = tuple(argv)
    if not args:
        raise ValueError("run() needs a non-empty argv")
    for arg in args:
        if not isinstance(arg, str):
            raise TypeError(f"argv items must be str, got {type(arg).__name__}: {arg!r}")
        if "\0" in arg:
            raise ValueError(f"argv item contains a NUL byte: {arg!r}")
    return args


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:  # pragma: no cover - only if the child changed credentials
        proc.kill()


def run(
    argv: Sequence[str],
    *,
    timeout: float = 120.0,
    input: bytes | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Result:
    """Run argv and wait for it; raise `CommandFailed` on a non-zero exit when `check`.

    `env` entries are added to (and override) the driver's environment, which
    always carries ``LC_ALL=C`` unless `env` sets it.  `pass_fds` are
    inherited by the child at the same numbers (for ``/proc/self/fd/N`` paths).
    """
    args = _check_argv(argv)
    child_env = dict(os.environ)
    child_env["LC_ALL"] = "C"
    if env is not None:
        child_env.update(env)
    log.debug("run: %s", args)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            pass_fds=tuple(pass_fds),
            env=child_env,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise FailedPrecondition(f"{args[0]} is not installed (not found in PATH)") from None
    except PermissionError:
        raise FailedPrecondition(f"{args[0]} is not executable") from None
    try:
        stdout, stderr = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            proc.communicate(timeout=_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("run: a child of %s still holds its pipes after being killed", args[0])
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            proc.wait()
        raise DeadlineExceeded(f"{args[0]} did not finish within {timeout:g} s and was killed") from None
    except BaseException:
        # KeyboardInterrupt, a cancelled thread...: never leave the child behind.
        _kill_group(proc)
        proc.wait()
        raise
    result = Result(argv=args, returncode=proc.returncode, stdout=_decode(stdout), stderr=_decode(stderr))
    log.debug("run: %s exited %d in %.3f s", args[0], result.returncode, time.monotonic() - started)
    if check and result.returncode != 0:
        raise CommandFailed(args, result.returncode, result.stderr)
    return result
