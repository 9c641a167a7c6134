"""The suite catches faults: run it (through `csi-kit sanity`'s entry point,
in a child process) against deliberately broken drivers and check that the
tests that should fail do fail, while unrelated tests in the same run pass.

Two kinds of broken driver: the small gRPC driver in fakedriver.py with one
planted fault each (wrong codes, lost idempotency, races, traversal, and
the node-path faults: followed symlinks, normalised paths, prefix unmounts,
removed directories, targets inside its root), and the real hostPath backend
subclassed to lose data or ignore read-only (brokenhostpath.py).

Driver and suite run together in one child process tree, as root inside
`unshare -m --propagation private`: the planted node faults mount over and
unmount what they should not, and that must stay in a namespace made for
the run — whoever runs this file, and however.
"""

from __future__ import annotations

import os
import re
import sys

import pytest

from csi_kit.linux.run import run

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fakedriver  # noqa: E402

pytestmark = pytest.mark.slow  # each case runs the suite in a child process

_LINE = re.compile(r"^(PASS|FAIL|SKIP) (\S+)")
_TALLY = re.compile(r"^(\d+) passed, (\d+) failed, (\d+) skipped$")


def private_namespace(argv: list[str]) -> list[str]:
    """`argv` in a mount namespace of its own (as root; unprivileged, the
    drivers here cannot mount or unmount, and unshare is not allowed)."""
    if os.geteuid() != 0:
        return argv
    return ["unshare", "-m", "--propagation", "private", "--", *argv]


def fake_driver(tmp: str, *faults: str) -> tuple[list[str], str, str]:
    """The fake driver's command line (with `faults`): (argv, endpoint, root)."""
    endpoint = f"unix://{os.path.join(tmp, 'fake.sock')}"
    root = os.path.join(tmp, "root")
    argv = [sys.executable, fakedriver.__file__, "--endpoint", endpoint, "--root", root]
    return argv + [f"--fault={f}" for f in faults], endpoint, root


def run_suite(
    endpoint: str, keyword: str | None = None, *extra: str, driver: list[str] | None = None
) -> tuple[dict[str, str], str, int]:
    """Run `csi-kit sanity` — beside `driver` (a command that serves while
    the command after its `--` runs) in a private mount namespace, when
    given.  Returns ({test: PASS|FAIL|SKIP}, output, exit code)."""
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
    argv += extra
    if driver is not None:
        argv = private_namespace([*driver, "--", *argv])
    result = run(argv, check=False, timeout=1800)
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


def run_against_fake(tmp: str, keyword: str | None, *faults: str) -> tuple[dict[str, str], str, int]:
    """The suite against the fake driver with `faults` (its root given as a driver root)."""
    driver, endpoint, root = fake_driver(tmp, *faults)
    return run_suite(endpoint, keyword, "--driver-root", root, driver=driver)


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
    (
        "stats-wrong-codes",
        "TestNodeGetVolumeStats or TestNodeExpandVolume or TestHostilePaths and stats",
        [
            "TestNodeGetVolumeStats::test_unknown_volume_relative_path",
            "TestNodeExpandVolume::test_unknown_volume_relative_path",
            "TestHostilePaths::test_stats_of_foreign_path",
        ],
        ["TestNodeGetVolumeStats::test_unknown_volume", "TestNodeExpandVolume::test_missing_volume_id"],
    ),
]

_SHAPES = ("dotdot", "dot", "double-slash", "trailing-slash")

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
    # The node-path attacks (test_node_paths.py), one planted fault each.
    (
        "follow-symlinks",
        "TestNodeSymlinkPaths or TestNodeUndoThroughSymlink or TestNodeNeverPublishedPaths",
        [
            *(
                f"TestNodeSymlinkPaths::test_publish[{k}]"
                for k in ("last-dir", "last-file", "parent-dir", "parent-file")
            ),
            "TestNodeSymlinkPaths::test_stage[last-dir]",
            "TestNodeSymlinkPaths::test_stage[parent-dir]",
            "TestNodeUndoThroughSymlink::test_unpublish",
            "TestNodeUndoThroughSymlink::test_unstage",
        ],
        ["TestNodeNeverPublishedPaths::test_unpublish", "TestNodeNeverPublishedPaths::test_unstage"],
    ),
    (
        "normalise-paths",
        "TestNodeAbnormalPaths",
        [
            f"TestNodeAbnormalPaths::test_{rpc}[{shape}]"
            for rpc in ("publish", "unpublish", "stage", "unstage")
            for shape in _SHAPES
        ],
        [f"TestNodeAbnormalPaths::test_{rpc}[root]" for rpc in ("publish", "unpublish", "stage", "unstage")],
    ),
    (
        "unmount-prefix",
        "TestNodeAbnormalPaths and root or TestNodeLifecycle and publish_write",
        ["TestNodeAbnormalPaths::test_unpublish[root]", "TestNodeAbnormalPaths::test_unstage[root]"],
        [
            "TestNodeLifecycle::test_publish_write_unpublish",
            "TestNodeAbnormalPaths::test_publish[root]",
            "TestNodeAbnormalPaths::test_stage[root]",
        ],
    ),
    (
        "rmdir-unpublished",
        "TestNodeNeverPublishedPaths or TestNodeUnpublishVolume or TestNodeUnstageVolume",
        ["TestNodeNeverPublishedPaths::test_unpublish", "TestNodeNeverPublishedPaths::test_unstage"],
        [
            "TestNodeUnpublishVolume::test_not_published_succeeds",
            "TestNodeUnstageVolume::test_not_staged_succeeds",
        ],
    ),
    (
        "target-in-root",
        "TestNodePathsInDriverRoots or TestNodeSymlinkPaths and publish",
        [
            "TestNodePathsInDriverRoots::test_publish[root-itself]",
            "TestNodePathsInDriverRoots::test_publish[below-root]",
            "TestNodePathsInDriverRoots::test_stage[root-itself]",
        ],
        [
            "TestNodeSymlinkPaths::test_publish[last-dir]",
            "TestNodePathsInDriverRoots::test_stage[below-root]",
        ],
    ),
]


def _check(tmp: str, fault: str, keyword: str, must_fail: list[str], must_pass: list[str]) -> None:
    outcomes, out, rc = run_against_fake(tmp, keyword, fault)
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
    outcomes, out, rc = run_against_fake(str(tmp_path), None)
    failed = sorted(n for n, o in outcomes.items() if o == "FAIL")
    assert not failed, f"the suite fails a correct driver: {failed}\n{out[-5000:]}"
    assert rc == 0
    assert sum(o == "PASS" for o in outcomes.values()) > 250


def test_exit_status_when_nothing_listens(tmp_path: object) -> None:
    """No driver at the endpoint: one line before any test runs, exit status 2."""
    sock = f"unix://{tmp_path}/nobody.sock"
    argv = [sys.executable, "-m", "csi_kit.testing.sanity.cli", "--endpoint", sock, "--connect-timeout", "2"]
    result = run(argv, check=False, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no CSI driver answers" in result.stderr


# -- the real hostPath backend, subclassed to break it ------------------------------


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
            "ignore-readonly",
            "TestNodeLifecycle and (readonly or publish_write)",
            ["TestNodeLifecycle::test_readonly_publish_refuses_writes"],
            ["TestNodeLifecycle::test_publish_write_unpublish"],
        ),
    ],
    ids=["empty-restore", "ignore-readonly"],
)
def test_broken_hostpath_backend_is_caught(
    tmp_path: object, kind: str, keyword: str, must_fail: list[str], must_pass: list[str]
) -> None:
    state = os.path.join(str(tmp_path), "state")
    driver = [sys.executable, os.path.join(HERE, "brokenhostpath.py"), "--kind", kind, "--state", state]
    outcomes, out, rc = run_suite(f"unix://{state}/csi.sock", keyword, driver=driver)
    assert rc != 0, out
    for test in must_fail:
        assert outcome(outcomes, test) == "FAIL", f"{test} did not catch the broken backend {kind!r}:\n{out}"
    for test in must_pass:
        assert outcome(outcomes, test) == "PASS", f"{test} failed for an unrelated reason ({kind}):\n{out}"
