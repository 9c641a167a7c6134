"""The conformance suite against the real hostPath driver, started as a
`csi-kit serve` child process for the session, exactly as a user runs it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from csi_kit.testing.sanity import SanityConfig


@pytest.fixture(scope="session")
def hostpath_driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A hostPath driver; yields (endpoint, state dir).

    A `csi-kit serve` child process by default; CSI_SANITY_DRIVER=thread
    serves it in-process instead (quicker to debug, same gRPC socket).
    """
    from csi_kit.testing.driver import driver_process, running_driver

    state = str(tmp_path_factory.mktemp("hostpath-state"))
    kw = {"backend": "hostpath", "node_id": "node-1", "driver_name": "hostpath.csi-kit.io"}
    if os.environ.get("CSI_SANITY_DRIVER") == "thread":
        with running_driver(state, **kw) as endpoint:
            yield endpoint, state
    else:
        with driver_process(state, **kw) as proc:
            yield proc.endpoint, state


@pytest.fixture(scope="session")
def csi_sanity_config(
    hostpath_driver: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> SanityConfig:
    endpoint, state = hostpath_driver
    mounts = str(tmp_path_factory.mktemp("sanity-mounts"))
    return SanityConfig(
        endpoint=endpoint,
        mount_dir=mounts,
        volume_size=16 * 1024 * 1024,
        driver_roots=(state,),
        idempotency_repeats=int(os.environ.get("CSI_SANITY_REPEATS", "10")),
    )
