"""The conformance suite against the real built-in backends.

Each test module here imports the suite and names its backend in a module
attribute `BACKEND` (and optionally `ACCESS_TYPE`); the driver is started
once per module as a `csi-kit serve` child process, exactly as a user runs
it (CSI_SANITY_DRIVER=thread serves it in-process instead: quicker to
debug, same gRPC socket).  `csi_sanity` is overridden at module scope so
that every module talks to its own driver.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from csi_kit.testing.sanity import SanityConfig
from csi_kit.testing.sanity._support import SanityContext


@pytest.fixture(scope="module")
def backend_driver(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """The module's backend served by a real driver; yields (endpoint, state dir)."""
    from csi_kit.testing.driver import driver_process, running_driver

    backend = getattr(request.module, "BACKEND", "hostpath")
    state = str(tmp_path_factory.mktemp(f"{backend}-state"))
    kw = {"backend": backend, "node_id": "node-1", "driver_name": f"{backend}.csi-kit.io"}
    if os.environ.get("CSI_SANITY_DRIVER") == "thread":
        with running_driver(state, **kw) as endpoint:
            yield endpoint, state
    else:
        with driver_process(state, **kw) as proc:
            yield proc.endpoint, state


@pytest.fixture(scope="module")
def csi_sanity_config(
    request: pytest.FixtureRequest, backend_driver: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> SanityConfig:
    endpoint, state = backend_driver
    mounts = str(tmp_path_factory.mktemp("sanity-mounts"))
    return SanityConfig(
        endpoint=endpoint,
        mount_dir=mounts,
        volume_size=getattr(request.module, "VOLUME_SIZE", 16 * 1024 * 1024),
        access_type=getattr(request.module, "ACCESS_TYPE", "mount"),
        # The state dir and the backend's root (hostPath's default lies
        # inside it; named apart so the node-path attacks aim at both).
        driver_roots=(state, os.path.join(state, getattr(request.module, "BACKEND", "hostpath"))),
        idempotency_repeats=int(os.environ.get("CSI_SANITY_REPEATS", "10")),
        # A valid ControllerModifyVolume for the module's backend, if it names one.
        modify_parameters=getattr(request.module, "MODIFY_PARAMETERS", {}),
    )


@pytest.fixture(scope="module")
def csi_sanity(csi_sanity_config: SanityConfig) -> Iterator[SanityContext]:
    ctx = SanityContext(csi_sanity_config)
    yield ctx
    problems = ctx.close()
    if problems:
        pytest.fail("session cleanup failed:\n  " + "\n  ".join(problems), pytrace=False)
