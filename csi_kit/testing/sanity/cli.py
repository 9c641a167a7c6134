"""`csi-kit sanity`: run the conformance suite against a CSI endpoint.

The suite is ordinary pytest tests; this front end runs them through
`pytest.main` with a private, empty ini file (so the caller's own pytest
configuration cannot change what is checked), prints one line per test and
ends with exactly `N passed, N failed, N skipped`.  The exit status is 0 only
when nothing failed.  An endpoint where no CSI driver answers stops the run
before it starts: one line on stderr and exit status 2, not a failure per
test with the same cause.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from importlib import metadata
from typing import IO, Any

__all__ = ["main", "build_parser", "pytest_args"]

PLUGIN = "csi_kit.testing.pytest_plugin"
SUITE = "csi_kit.testing.sanity"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csi-kit sanity",
        description="Check a CSI driver against the CSI v1.12.0 spec over its gRPC endpoint.",
    )
    p.add_argument("--endpoint", required=True, help="unix:///path/csi.sock, a socket path, or host:port")
    p.add_argument("--controller-endpoint", help="controller endpoint when it differs from --endpoint")
    p.add_argument("--mount-dir", help="parent directory for publish targets (default: a private temp dir)")
    p.add_argument("--staging-dir", help="parent directory for staging paths (default: under --mount-dir)")
    p.add_argument("--volume-size", type=int, help="volume size to request, in bytes (default 64 MiB)")
    p.add_argument(
        "--expand-size", type=int, help="size to expand to, in bytes (default twice --volume-size)"
    )
    p.add_argument("--parameters", metavar="FILE.yaml", help="CreateVolume parameters (a flat map)")
    p.add_argument("--snapshot-parameters", metavar="FILE.yaml", help="CreateSnapshot parameters")
    p.add_argument("--modify-parameters", metavar="FILE.yaml", help="a valid ControllerModifyVolume change")
    p.add_argument("--secrets", metavar="FILE.yaml", help="secrets: a flat map or one map per RPC name")
    p.add_argument("--access-type", choices=("mount", "block"), help="volume access type (default mount)")
    p.add_argument("--fs-type", help="fs_type for mount volumes")
    p.add_argument("--idempotency-repeats", type=int, help="repeats per idempotency test (default 10)")
    p.add_argument("--connect-timeout", type=float, help="seconds to wait for the endpoint (default 30)")
    p.add_argument("--driver-root", action="append", help="a directory the driver keeps data in (repeatable)")
    p.add_argument(
        "--allow-host-namespace",
        action="store_true",
        help="run the node-path attacks in the initial mount namespace too (disposable nodes only)",
    )
    p.add_argument(
        "-k", dest="keyword", metavar="EXPR", help="only run tests matching the pytest -k expression"
    )
    p.add_argument("-x", "--exitfirst", action="store_true", help="stop at the first failure")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="print the full failure report of each failure"
    )
    return p


def _endpoint(value: str) -> str:
    if value.startswith("/"):
        return "unix://" + value
    return value


def endpoint_problem(endpoint: str, connect_timeout: float) -> str | None:
    """Why `endpoint` cannot be checked at all, or None when a CSI driver answers there.

    Asked once before the suite starts: a dead endpoint would otherwise fail
    every test with the same cause.  Only "nobody answers" and "not a CSI
    driver" stop the run; any other answer is the suite's business.
    """
    import grpc

    from csi_kit._pb import csi_pb2, csi_pb2_grpc
    from csi_kit.testing.sanity._support import make_channel

    with make_channel(endpoint) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            return f"no CSI driver answers on {endpoint} (waited {connect_timeout:g} s; --connect-timeout)"
        try:
            csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest(), timeout=max(connect_timeout, 10.0)
            )
        except grpc.RpcError as e:
            code = e.code() if callable(getattr(e, "code", None)) else None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return f"the CSI driver on {endpoint} does not answer GetPluginInfo ({code.name})"
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return f"{endpoint} does not serve the CSI Identity service (GetPluginInfo: UNIMPLEMENTED)"
    return None


def _plugin_autoloaded() -> bool:
    """Whether pytest will load our plugin from its pytest11 entry point."""
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    try:
        eps = metadata.entry_points(group="pytest11")
    except Exception:
        return False
    return any(ep.value == PLUGIN for ep in eps)


def pytest_args(ns: argparse.Namespace, inifile: str) -> list[str]:
    """The pytest command line for the parsed `csi-kit sanity` options."""
    import csi_kit

    rootdir = os.path.dirname(os.path.dirname(os.path.abspath(csi_kit.__file__)))
    args = [
        "--pyargs",
        SUITE,
        "-c",
        inifile,
        "--rootdir",
        rootdir,
        "-p",
        "no:cacheprovider",
        "-p",
        "no:terminal",
        "-o",
        "python_files=test_*.py",
        "-o",
        "python_classes=Test*",
        "-o",
        "python_functions=test_*",
        "--csi-endpoint",
        _endpoint(ns.endpoint),
    ]
    if not _plugin_autoloaded():
        args[:0] = ["-p", PLUGIN]
    pairs = {
        "--csi-controller-endpoint": ns.controller_endpoint and _endpoint(ns.controller_endpoint),
        "--csi-mount-dir": ns.mount_dir,
        "--csi-staging-dir": ns.staging_dir,
        "--csi-volume-size": ns.volume_size,
        "--csi-expand-size": ns.expand_size,
        "--csi-parameters": ns.parameters,
        "--csi-snapshot-parameters": ns.snapshot_parameters,
        "--csi-modify-parameters": ns.modify_parameters,
        "--csi-secrets": ns.secrets,
        "--csi-access-type": ns.access_type,
        "--csi-fs-type": ns.fs_type,
        "--csi-idempotency-repeats": ns.idempotency_repeats,
        "--csi-connect-timeout": ns.connect_timeout,
    }
    for flag, value in pairs.items():
        if value is not None:
            args += [flag, str(value)]
    for root in ns.driver_root or ():
        args += ["--csi-driver-root", root]
    if ns.allow_host_namespace:
        args.append("--csi-allow-host-namespace")
    if ns.keyword:
        args += ["-k", ns.keyword]
    if ns.exitfirst:
        args.append("-x")
    return args


class Reporter:
    """Prints one line per test as it finishes and keeps the tally.

    A test counts once, by its worst phase: an error in setup or teardown
    is a failure, a skip in any phase is a skip.
    """

    def __init__(self, out: IO[str], verbose: bool) -> None:
        self.out = out
        self.verbose = verbose
        self.outcome: dict[str, str] = {}
        self.detail: dict[str, str] = {}
        self.collect_errors: list[str] = []

    @staticmethod
    def _short(nodeid: str) -> str:
        path, _, rest = nodeid.partition("::")
        return f"{os.path.basename(path)}::{rest}" if rest else nodeid

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.collect_errors.append(f"{report.nodeid}: {report.longreprtext}")

    def pytest_runtest_logreport(self, report: Any) -> None:
        nid = report.nodeid
        prev = self.outcome.get(nid)
        if report.failed:
            self.outcome[nid] = "failed"
            phase = "" if report.when == "call" else f" (in {report.when})"
            text = report.longreprtext or ""
            if not self.verbose:
                lines = [ln for ln in text.splitlines() if ln.startswith("E ")] or text.splitlines()[-3:]
                text = "\n".join(lines[-6:])
            self.detail[nid] = f"{phase}\n{text}".rstrip()
        elif report.skipped and prev != "failed":
            self.outcome[nid] = "skipped"
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
            self.detail[nid] = reason.removeprefix("Skipped: ")
        elif report.passed and report.when == "call" and prev is None:
            self.outcome[nid] = "passed"
        if report.when == "teardown":
            self._print(nid)

    def _print(self, nid: str) -> None:
        outcome = self.outcome.get(nid, "passed")
        label = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[outcome]
        line = f"{label} {self._short(nid)}"
        detail = self.detail.get(nid, "")
        if outcome == "skipped" and detail:
            line += f"  [{detail}]"
        self.out.write(line + "\n")
        if outcome == "failed" and detail:
            for dl in detail.splitlines():
                self.out.write(f"    {dl}\n")
        self.out.flush()

    def counts(self) -> tuple[int, int, int]:
        values = list(self.outcome.values())
        failed = values.count("failed") + len(self.collect_errors)
        return values.count("passed"), failed, values.count("skipped")


def main(argv: list[str] | None = None) -> int:
    """Run the suite; print per-test results and `N passed, N failed, N skipped`."""
    ns = build_parser().parse_args(argv)
    try:
        import hypothesis  # noqa: F401 - the state machine needs it
        import pytest
    except ImportError as err:
        sys.stderr.write(
            f"csi-kit sanity needs pytest and hypothesis ({err}): pip install 'csi-kit[sanity]'\n"
        )
        return 2
    timeout = 30.0 if ns.connect_timeout is None else ns.connect_timeout
    for ep in dict.fromkeys(_endpoint(e) for e in (ns.endpoint, ns.controller_endpoint) if e):
        problem = endpoint_problem(ep, timeout)
        if problem:
            sys.stderr.write(f"csi-kit sanity: {problem}\n")
            return 2
    # pytest captures fd 1 around tests; report on a duplicate of the real one.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
    reporter = Reporter(out, ns.verbose)
    try:
        with tempfile.TemporaryDirectory(prefix="csi-sanity-ini-") as tmp:
            inifile = os.path.join(tmp, "pytest.ini")
            with open(inifile, "w", encoding="utf-8") as f:
                f.write("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
            rc = pytest.main(pytest_args(ns, inifile), plugins=[reporter])
        for problem in reporter.collect_errors:
            out.write(f"ERROR collecting {problem}\n")
        passed, failed, skipped = reporter.counts()
        out.write(f"{passed} passed, {failed} failed, {skipped} skipped\n")
        out.flush()
    finally:
        out.close()
    if failed:
        return 1
    if int(rc) not in (0, int(pytest.ExitCode.NO_TESTS_COLLECTED)) or passed + skipped == 0:
        return int(rc) or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
