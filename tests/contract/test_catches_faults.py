"""The suite catches faults: run it (through `csi-kit sanity`'s entry point,
in a child process) against deliberately broken drivers and check that the
tests that should fail do fail, while unrelated tests in the same run pass.

Two kinds of broken driver: the small gRPC driver in fakedriver.py with one
planted fault each (wire-level faults: wrong codes, lost idempotency, races,
traversal), and the real hostPath backend subclassed to lose data or leave
targets behind (served in-process through csi_kit.testing.driver).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from csi_kit.linux.run import run

sys.path.insert(0, os.path.dirname(__file__))
import fakedriver

pytestmark = pytest.mark.slow  # each case runs the suite in a child process

_LINE = re.compile(r"^(PASS|FAIL|SKIP) (\S+)")
_TALLY = re.compile(r"^(\d+) passed, (\d+) failed, (\d+) skipped$")


@contextmanager
def fake_driver(tmp: str, *faults: str) -> Iterator[str]:
    """Serve the fake driver (with `faults`) in this process; yields its endpoint."""
    sock = os.path.join(tmp, "fake.sock")
    root = os.path.join(tmp, "root")
    server = fakedriver.serve(f"unix://{sock}", root, set(faults))
    try:
        yield f"unix://{sock}"
    finally:
        server.stop(None).wait()


def run_suite(endpoint: str, keyword: str | None = None, *extra: str) -> tuple[dict[str, str], str, int]:
    """Run `csi-kit sanity`; returns ({test: PASS|FAIL|SKIP}, output, exit code)."""
    argv = [
        sys.executable,
        "-m",
        "csi_kit.testing.sanity.cli",
        "--endpoint",
        endpoint,
        "--idempotency-repeats",
        "3",
    ]
    if keyword:
        argv += ["-k", keyword]
    result = run([*argv, *extra], check=False, timeout=1800)
    outcomes: dict[str, str] = {}
    for line in result.stdout.splitlines():
        m = _LINE.match(line)
        if m:
            outcomes[m.group(2)] = m.group(1)
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert _TALLY.match(last), (
        f"the last line is not the tally:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return outcomes, result.stdout, result.returncode


def outcome(outcomes: dict[str, str], test: str) -> str:
    hits = [o for name, o in outcomes.items() if name.endswith(test)]
    assert hits, f"{test} did not run; ran: {sorted(outcomes)[:20]}..."
    return "FAIL" if "FAIL" in hits else hits[0]


# (fault, -k expression, tests that must fail, tests in the same run that must pass)
CASES = [
    (
        "create-not-idempotent",
        "TestCreateVolume and same_name or TestIdempotency and test_create_volume or probe_succeeds",
        [
            "TestCreateVolume::test_same_name_same_request_returns_same_volume",
            "TestCreateVolume::test_same_name_different_capacity_already_exists",
            "TestIdempotency::test_create_volume",
        ],
        ["TestIdentity::test_probe_succeeds"],
    ),
    (
        "notfound-for-invalid",
        "missing or probe_succeeds",
        [
            "TestCreateVolume::test_missing_name",
            "TestCreateVolume::test_missing_volume_capabilities",
            "TestDeleteVolume::test_missing_volume_id",
            "TestCreateSnapshot::test_missing_source_volume_id",
            "TestNodePublishVolume::test_missing_volume_id",
            "TestNodeGetVolumeStats::test_missing_volume_id",
        ],
        ["TestIdentity::test_probe_succeeds", "TestNodePublishVolume::test_missing_target_path"],
    ),
    (
        "traversal",
        "TestHostileIds and delete_volume",
        ["TestHostileIds::test_delete_volume[escape]"],
        ["TestHostileIds::test_delete_volume[dotdot]", "TestHostileIds::test_delete_volume[newline]"],
    ),
    (
        "ignore-bad-token",
        "starting_token or pagination",
        [
            "TestListVolumes::test_invalid_starting_token_is_aborted",
            "TestListSnapshots::test_invalid_starting_token_is_aborted",
        ],
        ["TestListVolumes::test_pagination_visits_every_volume_once"],
    ),
    (
        "snapshot-any-source",
        "TestCreateSnapshot",
        ["TestCreateSnapshot::test_same_name_different_source_already_exists"],
        ["TestCreateSnapshot::test_same_name_same_source_returns_same_snapshot"],
    ),
    (
        "racy-create",
        "TestConcurrency",
        ["TestConcurrency::test_duplicate_create_volume_makes_one_volume"],
        ["TestConcurrency::test_distinct_creates_in_parallel"],
    ),
    (
        "group-ignores-sources",
        "TestGroupController",
        ["TestGroupController::test_same_name_different_sources_already_exists"],
        ["TestGroupController::test_create_returns_member_snapshots", "TestGroupController::test_get"],
    ),
    (
        "crash-on-nul",
        "TestHostileIds and validate",
        ["TestHostileIds::test_validate_volume_capabilities[nul]"],
        ["TestHostileIds::test_validate_volume_capabilities[dotdot]"],
    ),
    (
        "shrink",
        "TestControllerExpandVolume",
        ["TestControllerExpandVolume::test_smaller_request_does_not_shrink"],
        ["TestControllerExpandVolume::test_grows_the_volume"],
    ),
]

# Faults only visible through real mounts (the suite's node tests need root).
PRIVILEGED_CASES = [
    (
        "keep-target",
        "TestNodeLifecycle and publish_write",
        ["TestNodeLifecycle::test_publish_write_unpublish"],
        [],
    ),
    (
        "empty-restore",
        "TestNodeLifecycle and (restored or clone)",
        ["TestNodeLifecycle::test_restored_volume_has_snapshot_data"],
        ["TestNodeLifecycle::test_clone_is_independent"],
    ),
    (
        "shallow-clone",
        "TestNodeLifecycle and (restored or clone)",
        ["TestNodeLifecycle::test_clone_is_independent"],
        ["TestNodeLifecycle::test_restored_volume_has_snapshot_data"],
    ),
]


def _check(tmp: str, fault: str, keyword: str, must_fail: list[str], must_pass: list[str]) -> None:
    with fake_driver(tmp, fault) as endpoint:
        outcomes, out, rc = run_suite(endpoint, keyword)
    assert rc != 0, f"the suite exited 0 against a driver with fault {fault!r}:\n{out}"
    for test in must_fail:
        assert outcome(outcomes, test) == "FAIL", f"{test} did not catch {fault!r}:\n{out}"
    for test in must_pass:
        assert outcome(outcomes, test) == "PASS", (
            f"{test} failed for an unrelated reason under {fault!r}:\n{out}"
        )


@pytest.mark.parametrize(("fault", "keyword", "must_fail", "must_pass"), CASES, ids=[c[0] for c in CASES])
def test_fault_is_caught(
    tmp_path: object, fault: str, keyword: str, must_fail: list[str], must_pass: list[str]
) -> None:
    _check(str(tmp_path), fault, keyword, must_fail, must_pass)


@pytest.mark.privileged
@pytest.mark.parametrize(
    ("fault", "keyword", "must_fail", "must_pass"), PRIVILEGED_CASES, ids=[c[0] for c in PRIVILEGED_CASES]
)
def test_node_fault_is_caught(
    tmp_path: object, fault: str, keyword: str, must_fail: list[str], must_pass: list[str]
) -> None:
    _check(str(tmp_path), fault, keyword, must_fail, must_pass)


@pytest.mark.slow
def test_correct_driver_passes_the_whole_suite(tmp_path: object) -> None:
    """The control: the same fake driver without faults fails nothing."""
    with fake_driver(str(tmp_path)) as endpoint:
        outcomes, out, rc = run_suite(endpoint)
    failed = sorted(n for n, o in outcomes.items() if o == "FAIL")
    assert not failed, f"the suite fails a correct driver: {failed}\n{out[-5000:]}"
    assert rc == 0
    assert sum(o == "PASS" for o in outcomes.values()) > 250


def test_exit_status_and_tally_when_nothing_listens(tmp_path: object) -> None:
    """No driver at the endpoint: every test fails, the exit status says so."""
    _outcomes, out, rc = run_suite(
        f"unix://{tmp_path}/nobody.sock", "probe_succeeds", "--connect-timeout", "2"
    )
    assert rc != 0
    assert out.strip().splitlines()[-1] == "0 passed, 1 failed, 0 skipped", out
    assert "cannot connect" in out


# -- the real hostPath backend, subclassed to break it ------------------------------


def _hostpath_subclass(kind: str) -> type:
    from csi_kit_backends.hostpath.backend import HostPathBackend

    if kind == "empty-restore":

        class EmptyRestore(HostPathBackend):
            """Restores a snapshot as an empty volume: data loss."""

            def restore_snapshot(self, volume_id, request, snapshot):  # type: ignore[no-untyped-def]
                return self.create_volume(volume_id, request)

        return EmptyRestore

    class KeepTarget(HostPathBackend):
        """Unmounts but leaves the target directory behind."""

        def node_unpublish(self, volume_id: str, target_path: str) -> None:
            from csi_kit.linux import mounts

            mounts.unmount_all(target_path)

    return KeepTarget


@pytest.mark.privileged
@pytest.mark.parametrize(
    ("kind", "keyword", "must_fail", "must_pass"),
    [
        (
            "empty-restore",
            "TestNodeLifecycle and (restored or clone)",
            ["TestNodeLifecycle::test_restored_volume_has_snapshot_data"],
            ["TestNodeLifecycle::test_clone_is_independent"],
        ),
        (
            "keep-target",
            "TestNodeLifecycle and (publish_write or restored)",
            ["TestNodeLifecycle::test_publish_write_unpublish"],
            [],
        ),
    ],
    ids=["empty-restore", "keep-target"],
)
def test_broken_hostpath_backend_is_caught(
    tmp_path: object, kind: str, keyword: str, must_fail: list[str], must_pass: list[str]
) -> None:
    from csi_kit.backend import BackendContext
    from csi_kit.testing.driver import running_driver

    state = os.path.join(str(tmp_path), "state")
    os.makedirs(state)
    backend = _hostpath_subclass(kind)(None, BackendContext("hostpath.csi-kit.io", "node-1", state))
    with running_driver(state, backend_object=backend) as endpoint:
        outcomes, out, rc = run_suite(endpoint, keyword)
    assert rc != 0, out
    for test in must_fail:
        assert outcome(outcomes, test) == "FAIL", f"{test} did not catch the broken backend {kind!r}:\n{out}"
    for test in must_pass:
        assert outcome(outcomes, test) == "PASS", f"{test} failed for an unrelated reason ({kind}):\n{out}"
