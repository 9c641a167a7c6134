"""Markers that say what a test needs, and skip it with the reason where the
machine does not have it.  CI runs as root, so privileged tests run there."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest


def _has_device_mapper() -> bool:
    try:
        with open("/proc/misc") as f:
            return any(line.split()[-1] == "device-mapper" for line in f if line.strip())
    except OSError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    in_vm = os.environ.get("CSI_KIT_IN_VM") == "1"
    e2e_reason: str | None = None
    if any(item.get_closest_marker("e2e") for item in items):
        from csi_kit.testing.cluster import unavailable_reason

        e2e_reason = unavailable_reason()
    for item in items:
        if e2e_reason and item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.skip(reason=f"no real cluster here: {e2e_reason}"))
        if item.get_closest_marker("privileged") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (real mounts and loop devices)"))
        if item.get_closest_marker("vm") and not in_vm:
            item.add_marker(
                pytest.mark.skip(
                    reason="needs a kernel with quota/device-mapper support: runs in the VM harness"
                )
            )
        if item.get_closest_marker("lvm") and not (in_vm or _has_device_mapper()):
            item.add_marker(
                pytest.mark.skip(reason="no device-mapper in this kernel: runs in the VM harness")
            )


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs `csi-kit` in-process configures the root logger (handlers on the
    stderr pytest captured for that test); put it back, or later records are written to a
    closed stream ("--- Logging error ---" noise in unrelated tests)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
