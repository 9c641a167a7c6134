"""Unit tests for the machinery behind the suite's node-path attacks: the
mount-namespace guard, the mount-table comparison, the abnormal spellings."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from csi_kit.testing.sanity import _support, cli
from csi_kit.testing.sanity._support import SanityContext, host_mount_namespace, mounts_unchanged
from csi_kit.testing.sanity.config import SanityConfig
from csi_kit.testing.sanity.test_node_paths import SHAPES, abnormal

INIT = 0xEFFFFFF8


def _fake_stat(monkeypatch: pytest.MonkeyPatch, own: int, pid1: int | None, release: str = "6.18.0") -> None:
    real = os.stat

    def stat(path: str, *a: Any, **kw: Any) -> Any:
        if path == "/proc/self/ns/mnt":
            return SimpleNamespace(st_ino=own)
        if path == "/proc/1/ns/mnt":
            if pid1 is None:
                raise PermissionError(13, "Permission denied")
            return SimpleNamespace(st_ino=pid1)
        return real(path, *a, **kw)

    monkeypatch.setattr(_support.os, "stat", stat)
    monkeypatch.setattr(_support.os, "uname", lambda: SimpleNamespace(release=release))


class TestHostMountNamespace:
    def test_the_kernels_initial_namespace(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _fake_stat(monkeypatch, INIT, None)
        assert "initial" in (host_mount_namespace() or "")

    def test_pid_1s_namespace(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _fake_stat(monkeypatch, 0xF0000000, 0xF0000000, release="5.15.0")
        assert "pid 1" in (host_mount_namespace() or "")

    def test_a_namespace_of_its_own(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _fake_stat(monkeypatch, 0xF0000123, 0xF0000000, release="5.15.0")
        assert host_mount_namespace() is None

    def test_pid_1_unreadable_on_a_kernel_with_a_fixed_initial_number(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _fake_stat(monkeypatch, 0xF0000123, None, release="6.18.44-fc")
        assert host_mount_namespace() is None

    def test_pid_1_unreadable_on_an_older_kernel_counts_as_the_machines(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _fake_stat(monkeypatch, 0xF0000000, None, release="6.1.0")
        assert "cannot tell" in (host_mount_namespace() or "")


def _context(reason: str | None, allow: bool) -> SanityContext:
    ctx = object.__new__(SanityContext)
    ctx.config = SanityConfig(endpoint="unix:///x.sock", allow_host_namespace=allow)
    ctx.__dict__["_host_namespace"] = reason  # the cached_property's slot
    return ctx


class TestGuard:
    def test_skips_in_the_machines_namespace(self) -> None:
        with pytest.raises(pytest.skip.Exception, match="unshare -m --propagation private"):
            _context(
                "this is the kernel's initial mount namespace", allow=False
            ).need_private_mount_namespace()

    def test_runs_when_allowed_or_private(self) -> None:
        _context("this is the kernel's initial mount namespace", allow=True).need_private_mount_namespace()
        _context(None, allow=False).need_private_mount_namespace()

    def test_cli_passes_the_flag(self) -> None:
        ns = cli.build_parser().parse_args(["--endpoint", "/run/csi.sock", "--allow-host-namespace"])
        assert "--csi-allow-host-namespace" in cli.pytest_args(ns, "/tmp/ini")
        ns = cli.build_parser().parse_args(["--endpoint", "/run/csi.sock"])
        assert "--csi-allow-host-namespace" not in cli.pytest_args(ns, "/tmp/ini")


def _tables(monkeypatch: pytest.MonkeyPatch, *tables: set[tuple[int, str]]) -> None:
    it: Iterator[set[tuple[int, str]]] = itertools.chain(tables)
    monkeypatch.setattr(_support, "mount_table", lambda: frozenset(next(it)))


class TestMountsUnchanged:
    def test_quiet_when_nothing_changed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _tables(monkeypatch, {(1, "/"), (2, "/t")}, {(1, "/"), (2, "/t")})
        with mounts_unchanged("x"):
            pass

    def test_names_what_was_mounted_and_unmounted(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # The same mount point with a new mount id is a change too.
        _tables(monkeypatch, {(1, "/"), (2, "/t")}, {(1, "/"), (3, "/t"), (4, "/etc")})
        changed = r"unmounted \['/t'\], mounted \['/etc', '/t'\]"
        with pytest.raises(AssertionError, match=changed), mounts_unchanged("NodePublishVolume"):
            pass

    def test_adds_the_changes_to_a_failure_inside(self, monkeypatch: pytest.MonkeyPatch) -> None:
        _tables(monkeypatch, {(1, "/"), (2, "/t")}, {(1, "/")})
        both = r"got OK; and NodeUnpublishVolume .* unmounted \['/t'\]"
        with pytest.raises(AssertionError, match=both), mounts_unchanged("NodeUnpublishVolume"):
            raise AssertionError("got OK")

    def test_reads_this_namespace(self) -> None:
        table = _support.mount_table()
        assert any(mp == "/" for _id, mp in table)


@pytest.mark.parametrize("shape", SHAPES)
def test_abnormal_spellings_name_the_same_path(tmp_path: Any, shape: str) -> None:
    path = os.path.join(str(tmp_path), "target")
    os.mkdir(path)
    bad = abnormal(path, shape)
    assert bad != path
    assert bad != os.path.normpath(bad) or bad.startswith("//") or bad == "/"
    if shape != "root":
        assert os.path.samefile(bad, path), f"{bad} does not resolve to {path}"
