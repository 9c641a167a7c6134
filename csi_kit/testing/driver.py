"""Start a real csi_kit driver for a test: in-process (a thread) or as a process.

Both serve real gRPC on a real unix socket.  The in-process form is fast and
lets a test reach the `Driver` object; the subprocess form is what crash
tests need (``kill -9`` of a real driver process).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import grpc

from csi_kit.backend import Backend
from csi_kit.driver import Driver, DriverConfig

__all__ = ["running_driver", "driver_process", "wait_for_socket", "DriverProcess"]


def wait_for_socket(path: str, timeout: float = 30.0, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until a gRPC server answers on the unix socket ``path``.

    ``alive`` is polled too: when it turns False (the server process died)
    the wait ends at once instead of running out the timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise TimeoutError(f"the server for {path} exited before it answered")
        if os.path.exists(path):
            with grpc.insecure_channel(f"unix://{path}") as ch:
                try:
                    grpc.channel_ready_future(ch).result(timeout=1.0)
                    return
                except grpc.FutureTimeoutError:
                    pass
        time.sleep(0.05)
    raise TimeoutError(f"no gRPC server on {path} after {timeout} s")


@contextmanager
def running_driver(
    state_dir: str,
    *,
    backend: str = "hostpath",
    backend_options: Mapping[str, str] | None = None,
    node_id: str = "node-1",
    driver_name: str = "hostpath.csi-kit.io",
    mode: str = "all",
    backend_object: Backend | None = None,
    socket_path: str | None = None,
) -> Iterator[str]:
    """Serve a driver from a background thread; yields its ``unix://`` endpoint.

    The driver is stopped (drained) when the block ends, even on failure.
    """
    sock = socket_path or os.path.join(state_dir, "csi.sock")
    config = DriverConfig(
        backend=backend,
        backend_options=dict(backend_options or {}),
        driver_name=driver_name,
        node_id=node_id,
        endpoints=(f"unix://{sock}",),
        state_dir=state_dir,
        mode=mode,  # type: ignore[arg-type]
        drain_seconds=5.0,
    )
    started = threading.Event()
    failure: list[BaseException] = []
    holder: dict[str, object] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        holder["loop"] = loop
        stop = asyncio.Event()
        holder["stop"] = stop

        async def main() -> None:
            driver = Driver(config, backend=backend_object)
            holder["driver"] = driver
            await driver.start()
            started.set()
            await stop.wait()
            await driver.stop(grace=5.0)

        try:
            loop.run_until_complete(main())
        except BaseException as e:
            failure.append(e)
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=serve, name="csi-kit-test-driver", daemon=True)
    thread.start()
    started.wait(60)
    if failure:
        raise failure[0]
    try:
        yield f"unix://{sock}"
    finally:
        loop = holder.get("loop")
        stop = holder.get("stop")
        if isinstance(loop, asyncio.AbstractEventLoop) and isinstance(stop, asyncio.Event):
            loop.call_soon_threadsafe(stop.set)
        thread.join(30)


class DriverProcess:
    """A ``csi-kit serve`` child process."""

    def __init__(self, argv: list[str], socket_path: str, log_path: str) -> None:
        self.argv = argv
        self.socket_path = socket_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        try:
            wait_for_socket(
                self.socket_path, timeout, alive=lambda: self.proc is not None and self.proc.poll() is None
            )
        except TimeoutError:
            self.stop()
            with open(self.log_path, errors="replace") as f:
                raise RuntimeError(f"driver did not start:\n{f.read()[-4000:]}") from None

    def kill(self) -> None:
        """SIGKILL: the crash a driver must survive."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait: the graceful drain."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@contextmanager
def driver_process(
    state_dir: str,
    *,
    backend: str = "hostpath",
    backend_options: Mapping[str, str] | None = None,
    node_id: str = "node-1",
    driver_name: str = "hostpath.csi-kit.io",
    extra_args: list[str] | None = None,
) -> Iterator[DriverProcess]:
    """Run ``csi-kit serve`` as a child process; stopped (SIGTERM) at the end."""
    os.makedirs(state_dir, exist_ok=True)
    sock = os.path.join(state_dir, "csi.sock")
    argv = [
        sys.executable,
        "-m",
        "csi_kit.cli",
        "serve",
        "--backend",
        backend,
        "--endpoint",
        f"unix://{sock}",
        "--node-id",
        node_id,
        "--driver-name",
        driver_name,
        "--state-dir",
        state_dir,
        *[f"--backend-option={k}={v}" for k, v in (backend_options or {}).items()],
        *(extra_args or []),
    ]
    proc = DriverProcess(argv, sock, os.path.join(state_dir, "driver.log"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
