"""The pytest11 plugin as a backend author uses it: import the suite's
classes into a test module and point it at a driver — by option, or by
overriding `csi_sanity_config` in a conftest."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

pytest_plugins = ["pytester"]

sys.path.insert(0, os.path.dirname(__file__))
import fakedriver  # noqa: E402


@pytest.fixture
def fake_endpoint(tmp_path: object) -> Iterator[str]:
    sock = os.path.join(str(tmp_path), "fake.sock")
    server = fakedriver.serve(f"unix://{sock}", os.path.join(str(tmp_path), "root"), set())
    try:
        yield f"unix://{sock}"
    finally:
        server.stop(None).wait()


MODULE = """
from csi_kit.testing.sanity import TestIdentity, TestCreateSnapshot  # noqa: F401
"""


def test_without_an_endpoint_the_suite_skips(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_conformance=MODULE)
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=14)
    result.stdout.fnmatch_lines(
        ["*no CSI endpoint: pass --csi-endpoint or override the csi_sanity_config fixture*"]
    )


def test_endpoint_option(pytester: pytest.Pytester, fake_endpoint: str) -> None:
    pytester.makepyfile(test_conformance=MODULE)
    result = pytester.runpytest_subprocess("--csi-endpoint", fake_endpoint, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=14)


def test_fixture_override_and_marker(pytester: pytest.Pytester, fake_endpoint: str) -> None:
    pytester.makeconftest(
        f"""
import pytest
from csi_kit.testing.sanity import SanityConfig

@pytest.fixture(scope="session")
def csi_sanity_config():
    return SanityConfig(endpoint={fake_endpoint!r}, idempotency_repeats=2)
"""
    )
    pytester.makepyfile(test_conformance=MODULE, test_other="def test_unrelated():\n    pass\n")
    result = pytester.runpytest_subprocess("-m", "csi_sanity", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=14, deselected=1)
