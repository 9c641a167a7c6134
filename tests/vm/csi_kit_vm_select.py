"""pytest plugin: pick on the host which test files the guest has to import.

Python under TCG runs some 20-50x slower than on the host, so collecting the
whole suite inside the guest only to deselect most of it costs minutes.  The
harness (``--preselect``) therefore collects once on the host with this
plugin in *record* mode, which writes the files that hold selected tests --
and the files that failed to import, so their errors still surface in the
guest -- to ``$CSI_KIT_VM_SELECT_OUT``.  The guest runs the same pytest
arguments with this plugin in *restrict* mode (``$CSI_KIT_VM_ONLY_FILES``)
and collects only those files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

OUT_ENV = "CSI_KIT_VM_SELECT_OUT"
ONLY_ENV = "CSI_KIT_VM_ONLY_FILES"

_errors: set[str] = set()


def _only() -> list[Path] | None:
    value = os.environ.get(ONLY_ENV)
    if value is None:
        return None
    return [Path(p) for p in value.split(os.pathsep) if p]


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    only = _only()
    if only is None:
        return None
    if collection_path.is_dir():
        keep = any(collection_path == p or collection_path in p.parents for p in only)
    else:
        keep = collection_path in only
    return None if keep else True


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if os.environ.get(OUT_ENV) and report.failed:
        path = report.nodeid.split("::", 1)[0]
        if path.endswith(".py"):
            _errors.add(path)


def pytest_collection_finish(session: pytest.Session) -> None:
    out = os.environ.get(OUT_ENV)
    if not out:
        return
    files = {str(item.path) for item in session.items}
    files |= {str(session.config.rootpath / p) for p in _errors}
    with open(out, "w") as f:
        json.dump({"files": sorted(files), "count": len(session.items)}, f)
