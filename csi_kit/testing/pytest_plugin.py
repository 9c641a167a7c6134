"""pytest plugin (entry point `pytest11: csi_kit`): the fixtures the CSI
conformance suite runs on.

A backend author points the suite at their driver by overriding one
session-scoped fixture in their conftest.py and importing the suite's test
classes into a test module::

    # conftest.py
    @pytest.fixture(scope="session")
    def csi_sanity_config():
        return SanityConfig(endpoint="unix:///run/my-driver/csi.sock")

    # test_conformance.py
    from csi_kit.testing.sanity import *  # noqa: F403  (collects every Test* class)

Without an override the config comes from the `--csi-*` options added here
(which is what `csi-kit sanity` uses); with neither, the suite's tests skip.

This module is loaded into every pytest run once csi_kit is installed, so it
stays cheap: the suite's own modules are imported only by the fixtures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from csi_kit.testing.sanity._support import Resources, SanityContext
    from csi_kit.testing.sanity.config import SanityConfig

__all__ = ["csi_sanity_config", "csi_sanity", "csi_resources"]

# Plain asserts in the suite get pytest's explanations when they fail.
pytest.register_assert_rewrite("csi_kit.testing.sanity")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("csi_kit", "CSI conformance suite (csi_kit.testing.sanity)")
    group.addoption("--csi-endpoint", default=None, help="CSI endpoint, e.g. unix:///path/csi.sock")
    group.addoption("--csi-controller-endpoint", default=None, help="controller endpoint if different")
    group.addoption("--csi-mount-dir", default=None, help="parent directory for publish targets")
    group.addoption("--csi-staging-dir", default=None, help="parent directory for staging paths")
    group.addoption("--csi-volume-size", type=int, default=None, help="volume size in bytes")
    group.addoption("--csi-expand-size", type=int, default=None, help="size to expand volumes to, in bytes")
    group.addoption("--csi-parameters", default=None, help="YAML file: CreateVolume parameters")
    group.addoption("--csi-snapshot-parameters", default=None, help="YAML file: CreateSnapshot parameters")
    group.addoption(
        "--csi-modify-parameters", default=None, help="YAML file: a valid ControllerModifyVolume change"
    )
    group.addoption("--csi-secrets", default=None, help="YAML file: secrets (flat or per RPC)")
    group.addoption("--csi-access-type", default=None, choices=("mount", "block"), help="volume access type")
    group.addoption("--csi-fs-type", default=None, help="fs_type for mount volumes")
    group.addoption("--csi-idempotency-repeats", type=int, default=None, help="repeats per idempotency test")
    group.addoption(
        "--csi-connect-timeout", type=float, default=None, help="seconds to wait for the endpoint"
    )
    group.addoption(
        "--csi-driver-root", action="append", default=None, help="a directory the driver stores in"
    )
    group.addoption(
        "--csi-allow-host-namespace",
        action="store_true",
        default=False,
        help="run the node-path attacks in the initial mount namespace too (disposable nodes only)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "csi_sanity: a test of the CSI conformance suite")
    config.addinivalue_line("markers", "privileged: needs root (real mounts and loop devices)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the suite's tests `csi_sanity` (wherever they were imported to),
    so `-m csi_sanity` selects them; skip its privileged ones without root."""
    root = os.geteuid() == 0
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and cls.__module__.startswith("csi_kit.testing.sanity"):
            item.add_marker(pytest.mark.csi_sanity)
            if not root and item.get_closest_marker("privileged"):
                item.add_marker(pytest.mark.skip(reason="needs root: stages/publishes real volumes"))


def config_from_options(config: pytest.Config) -> SanityConfig | None:
    """The SanityConfig the `--csi-*` options (or CSI_SANITY_ENDPOINT) describe."""
    from csi_kit.testing.sanity.config import SanityConfig, load_secrets, load_yaml_map

    endpoint = config.getoption("--csi-endpoint") or os.environ.get("CSI_SANITY_ENDPOINT")
    if not endpoint:
        return None
    kw: dict[str, object] = {"endpoint": endpoint}
    opt = config.getoption
    if opt("--csi-controller-endpoint"):
        kw["controller_endpoint"] = opt("--csi-controller-endpoint")
    if opt("--csi-mount-dir"):
        kw["mount_dir"] = opt("--csi-mount-dir")
    if opt("--csi-staging-dir"):
        kw["staging_dir"] = opt("--csi-staging-dir")
    if opt("--csi-volume-size"):
        kw["volume_size"] = opt("--csi-volume-size")
    if opt("--csi-expand-size"):
        kw["expand_size"] = opt("--csi-expand-size")
    if opt("--csi-parameters"):
        kw["parameters"] = load_yaml_map(opt("--csi-parameters"))
    if opt("--csi-snapshot-parameters"):
        kw["snapshot_parameters"] = load_yaml_map(opt("--csi-snapshot-parameters"))
    if opt("--csi-modify-parameters"):
        kw["modify_parameters"] = load_yaml_map(opt("--csi-modify-parameters"))
    if opt("--csi-secrets"):
        kw["secrets"] = load_secrets(opt("--csi-secrets"))
    if opt("--csi-access-type"):
        kw["access_type"] = opt("--csi-access-type")
    if opt("--csi-fs-type"):
        kw["fs_type"] = opt("--csi-fs-type")
    if opt("--csi-idempotency-repeats"):
        kw["idempotency_repeats"] = opt("--csi-idempotency-repeats")
    if opt("--csi-connect-timeout"):
        kw["connect_timeout"] = opt("--csi-connect-timeout")
    if opt("--csi-driver-root"):
        kw["driver_roots"] = tuple(opt("--csi-driver-root"))
    if opt("--csi-allow-host-namespace"):
        kw["allow_host_namespace"] = True
    return SanityConfig(**kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def csi_sanity_config(pytestconfig: pytest.Config) -> SanityConfig:
    """The driver under test.  Override this (session scope) to point the
    suite at your driver; by default it is built from the `--csi-*` options."""
    cfg = config_from_options(pytestconfig)
    if cfg is None:
        pytest.skip("no CSI endpoint: pass --csi-endpoint or override the csi_sanity_config fixture")
    return cfg


@pytest.fixture(scope="session")
def csi_sanity(csi_sanity_config: SanityConfig) -> Iterator[SanityContext]:
    """The session's connection to the driver: stubs, capabilities, node id."""
    from csi_kit.testing.sanity._support import SanityContext

    try:
        ctx = SanityContext(csi_sanity_config)
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    yield ctx
    problems = ctx.close()
    if problems:
        pytest.fail("session cleanup failed:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def csi_resources(csi_sanity: SanityContext) -> Iterator[Resources]:
    """Everything one test creates on the driver, undone afterwards (even
    when the test failed); an undo that fails is reported as an error."""
    from csi_kit.testing.sanity._support import Resources

    res = Resources(csi_sanity)
    csi_sanity.tracker = res
    try:
        yield res
    finally:
        csi_sanity.tracker = None
    problems = res.cleanup()
    csi_sanity.check_canary()
    if problems:
        pytest.fail("cleanup failed:\n  " + "\n  ".join(problems), pytrace=False)
