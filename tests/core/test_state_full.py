"""A full state filesystem is RESOURCE_EXHAUSTED naming it (issue 11, finding 8).

It used to be INTERNAL "database or disk is full" with a traceback per call.
The state directory here is a small tmpfs of its own (mounted in the test
run's private mount namespace: scripts/test.sh runs the suite under
``unshare -m --propagation private``), filled to the last byte; the hostPath
root lives elsewhere so that only the store runs out of room.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator

import grpc
import pytest
from helpers import Csi, create_req, expect, short_dir

from csi_kit.driver import Driver, DriverConfig
from csi_kit.errors import CSIError, ResourceExhausted
from csi_kit.linux.mounts import mount, unmount
from csi_kit.testing.driver import running_driver

pytestmark = pytest.mark.privileged


@pytest.fixture
def small_fs() -> Iterator[str]:
    with short_dir("ck-full-") as d:
        mount("tmpfs", d, "tmpfs", ["size=8m", "mode=0700"])
        try:
            yield d
        finally:
            try:
                unmount(d)
            except CSIError:
                unmount(d, lazy=True)


@pytest.fixture
def root() -> Iterator[str]:
    with short_dir("ck-root-") as d:
        yield d


def _fill(directory: str) -> str:
    """Fill the filesystem holding ``directory`` to the last byte; returns the filler's path."""
    path = os.path.join(directory, "filler")
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            chunk = b"\0" * size
            while True:
                try:
                    f.write(chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    return path


def test_calls_on_a_full_state_filesystem_are_resource_exhausted(
    small_fs: str, root: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO),
        running_driver(small_fs, backend_options={"root": root}) as ep,
        Csi(ep) as csi,
    ):
        before = csi.create("before")
        filler = _fill(small_fs)
        message = expect(grpc.StatusCode.RESOURCE_EXHAUSTED, csi.controller.CreateVolume, create_req("after"))
        assert f"state store {small_fs}/state.db" in message
        assert f"no space left on the filesystem holding {small_fs}" in message
        # Nothing half-made is left in the backend, and what was there is still listed.
        assert os.listdir(os.path.join(root, "volumes")) == [before.volume_id]
        assert csi.list_volume_ids() == [before.volume_id]
        # Room again: the same name succeeds.
        os.remove(filler)
        after = csi.create("after")
        assert sorted(csi.list_volume_ids()) == sorted([before.volume_id, after.volume_id])
    # The driver has stopped, so every log line of those calls is in: one line for the
    # refused call, no traceback.
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    complaints = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert complaints == ["CreateVolume RESOURCE_EXHAUSTED"]


def test_start_on_a_full_state_filesystem_is_one_clear_error(small_fs: str, root: str) -> None:
    _fill(small_fs)
    config = DriverConfig(
        state_dir=small_fs,
        node_id="node-1",
        endpoints=(f"unix://{small_fs}/csi.sock",),
        backend_options={"root": root},
    )
    with pytest.raises(ResourceExhausted, match=f"no space left on the filesystem holding {small_fs}"):
        Driver(config)
