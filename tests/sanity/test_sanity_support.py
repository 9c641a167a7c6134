"""Unit tests of the conformance suite's own machinery: configuration files,
the command line it hands to pytest, the tally, host observations."""

from __future__ import annotations

import itertools
import os
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from csi_kit.testing.sanity import cli
from csi_kit.testing.sanity._support import (
    Canary,
    _unescape,
    allowed_codes,
    call_ok_or,
    expect_error,
    mounts_under,
)
from csi_kit.testing.sanity.config import SECRET_RPCS, SanityConfig, load_secrets, load_yaml_map

C = grpc.StatusCode


class _Err(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "why") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _raising(code: grpc.StatusCode, details: str = "why") -> Any:
    def call(request: Any, **kw: Any) -> Any:
        raise _Err(code, details)

    call._csi_rpc = "CreateVolume"  # type: ignore[attr-defined]
    return call


def _ok(request: Any, **kw: Any) -> str:
    return "response"


class TestConfig:
    def test_flat_secrets_apply_to_every_rpc(self, tmp_path: Any) -> None:
        p = tmp_path / "s.yaml"
        p.write_text("user: bob\npassword: abc\n")
        secrets = load_secrets(str(p))
        assert set(secrets) == set(SECRET_RPCS)
        assert secrets["NodePublishVolume"] == {"user": "bob", "password": "abc"}

    def test_per_rpc_secrets_with_default(self, tmp_path: Any) -> None:
        p = tmp_path / "s.yaml"
        p.write_text("CreateVolumeSecret: {a: '1'}\nDeleteVolume: {b: 2}\ndefault: {c: '3'}\n")
        secrets = load_secrets(str(p))
        assert secrets["CreateVolume"] == {"a": "1"}
        assert secrets["DeleteVolume"] == {"b": "2"}
        assert secrets["NodeStageVolume"] == {"c": "3"}
        cfg = SanityConfig(endpoint="unix:///x", secrets=secrets)
        assert cfg.secrets_for("DeleteVolume") == {"b": "2"}

    def test_parameters_must_be_a_map(self, tmp_path: Any) -> None:
        p = tmp_path / "p.yaml"
        p.write_text("- a\n- b\n")
        with pytest.raises(ValueError, match="mapping"):
            load_yaml_map(str(p))
        p.write_text("type: thin\nsize: 3\n")
        assert load_yaml_map(str(p)) == {"type": "thin", "size": "3"}

    def test_validation(self) -> None:
        with pytest.raises(ValueError, match="access_type"):
            SanityConfig(endpoint="x", access_type="nfs")
        with pytest.raises(ValueError, match="volume_size"):
            SanityConfig(endpoint="x", volume_size=0)
        assert SanityConfig(endpoint="x", volume_size=10).target_expand_size == 20
        assert SanityConfig(endpoint="x", expand_size=99).target_expand_size == 99


class TestErrorChecks:
    def test_expect_error_accepts_listed_code(self) -> None:
        err = expect_error(_raising(C.NOT_FOUND), None, (C.NOT_FOUND, C.INVALID_ARGUMENT))
        assert err.code() == C.NOT_FOUND

    def test_expect_error_names_the_wrong_code(self) -> None:
        with pytest.raises(
            AssertionError, match="CreateVolume: expected INVALID_ARGUMENT, got NOT_FOUND: why"
        ):
            expect_error(_raising(C.NOT_FOUND), None, C.INVALID_ARGUMENT)

    def test_expect_error_refuses_success(self) -> None:
        with pytest.raises(AssertionError, match="got OK"):
            expect_error(_ok, None, C.INVALID_ARGUMENT)

    def test_expect_error_needs_a_message(self) -> None:
        with pytest.raises(AssertionError, match="without a status message"):
            expect_error(_raising(C.INVALID_ARGUMENT, ""), None, C.INVALID_ARGUMENT)

    def test_call_ok_or(self) -> None:
        assert call_ok_or(_ok, None, (C.NOT_FOUND,)) == ("response", None)
        resp, err = call_ok_or(_raising(C.NOT_FOUND), None, (C.NOT_FOUND,))
        assert resp is None and err is not None
        with pytest.raises(AssertionError, match="OK, NOT_FOUND"):
            call_ok_or(_raising(C.INTERNAL), None, (C.NOT_FOUND,))

    def test_spec_tables(self) -> None:
        assert C.ALREADY_EXISTS in allowed_codes("CreateVolume")
        assert C.OUT_OF_RANGE in allowed_codes("ControllerExpandVolume")
        assert C.NOT_FOUND not in allowed_codes("DeleteVolume")
        for rpc in ("CreateVolume", "DeleteVolume", "NodePublishVolume"):
            assert C.INTERNAL not in allowed_codes(rpc)
            assert C.UNKNOWN not in allowed_codes(rpc)


class TestHost:
    def test_mountinfo_unescape(self) -> None:
        assert _unescape(r"/mnt/a\040b\011c\134d") == "/mnt/a b\tc\\d"

    def test_no_mounts_under_fresh_dir(self, tmp_path: Any) -> None:
        assert mounts_under(str(tmp_path)) == []
        assert mounts_under("/") != []

    def test_canary_detects_removal_and_additions(self, tmp_path: Any) -> None:
        canary = Canary.create(str(tmp_path))
        canary.assert_intact()
        assert canary.relative_escape().startswith("../../")
        assert os.path.normpath(os.path.join("/a/b", canary.relative_escape())) == canary.victim
        open(os.path.join(canary.victim, "intruder"), "w").close()
        with pytest.raises(AssertionError, match="created"):
            canary.assert_intact()
        os.unlink(os.path.join(canary.victim, "intruder"))
        with open(os.path.join(canary.victim, "file"), "wb") as f:
            f.write(b"changed")
        with pytest.raises(AssertionError, match="modified"):
            canary.assert_intact()
        os.unlink(os.path.join(canary.victim, "file"))
        with pytest.raises(AssertionError, match="removed"):
            canary.assert_intact()


class TestCli:
    def _ns(self, *argv: str) -> Any:
        return cli.build_parser().parse_args(["--endpoint", "/run/csi.sock", *argv])

    def test_pytest_args_map_every_option(self) -> None:
        ns = self._ns(
            "--mount-dir", "/m", "--staging-dir", "/s", "--volume-size", "5", "--expand-size", "9",
            "--parameters", "p.yaml", "--secrets", "s.yaml", "--access-type", "block", "-k", "Identity",
            "--driver-root", "/r1", "--driver-root", "/r2",
        )  # fmt: skip
        args = cli.pytest_args(ns, "/tmp/ini")
        pairs = dict(itertools.pairwise(args))
        assert pairs["--csi-endpoint"] == "unix:///run/csi.sock"
        assert pairs["--csi-mount-dir"] == "/m"
        assert pairs["--csi-staging-dir"] == "/s"
        assert pairs["--csi-volume-size"] == "5"
        assert pairs["--csi-expand-size"] == "9"
        assert pairs["--csi-parameters"] == "p.yaml"
        assert pairs["--csi-secrets"] == "s.yaml"
        assert pairs["--csi-access-type"] == "block"
        assert pairs["-k"] == "Identity"
        assert pairs["--pyargs"] == "csi_kit.testing.sanity"
        assert pairs["-c"] == "/tmp/ini"
        assert [args[i + 1] for i, a in enumerate(args) if a == "--csi-driver-root"] == ["/r1", "/r2"]

    def test_endpoint_is_required(self, capsys: Any) -> None:
        with pytest.raises(SystemExit):
            cli.main([])
        assert "--endpoint" in capsys.readouterr().err

    def test_reporter_counts_each_test_once_by_its_worst_phase(self, tmp_path: Any) -> None:
        out_path = tmp_path / "out"
        with open(out_path, "w") as out:
            rep = cli.Reporter(out, verbose=False)

            def report(nodeid: str, when: str, outcome: str, longrepr: Any = None) -> None:
                rep.pytest_runtest_logreport(
                    SimpleNamespace(
                        nodeid=nodeid, when=when, failed=outcome == "failed", skipped=outcome == "skipped",
                        passed=outcome == "passed", longrepr=longrepr, longreprtext="E   boom",
                    )
                )  # fmt: skip

            for phase in ("setup", "call", "teardown"):
                report("a/test_x.py::T::test_ok", phase, "passed")
            report("a/test_x.py::T::test_teardown_error", "setup", "passed")
            report("a/test_x.py::T::test_teardown_error", "call", "passed")
            report("a/test_x.py::T::test_teardown_error", "teardown", "failed")
            report("a/test_x.py::T::test_skip", "setup", "skipped", ("f", 1, "Skipped: no caps"))
            report("a/test_x.py::T::test_skip", "teardown", "passed")
            assert rep.counts() == (1, 1, 1)
        text = out_path.read_text()
        assert "PASS test_x.py::T::test_ok" in text
        assert "FAIL test_x.py::T::test_teardown_error" in text
        assert "SKIP test_x.py::T::test_skip  [no caps]" in text
