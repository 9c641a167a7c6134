"""The documentation site: its pages, its generated CLI reference, and the
``--help`` defaults the reference is made from.  (scripts/test.sh builds the
site itself with ``mkdocs build --strict``.)"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import re

import pytest
import yaml

from csi_kit import call
from csi_kit.cli import build_parser
from csi_kit.testing.sanity import cli as sanity_cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _hooks():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_files(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [f for v in node.values() for f in _nav_files(v)]
    if isinstance(node, list):
        return [f for v in node for f in _nav_files(v)]
    return []


def test_every_nav_entry_exists_and_every_page_is_in_the_nav() -> None:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.SafeLoader)
    nav = _nav_files(config["nav"])
    assert len(nav) == len(set(nav))
    missing = [f for f in nav if not (DOCS / f).is_file()]
    assert not missing
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages - set(nav) == set(), "pages no reader can reach from the navigation"


def _all_parsers() -> list[argparse.ArgumentParser]:
    out = [build_parser(), call.build_parser()]
    todo = list(out)
    while todo:
        parser = todo.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                out.extend(action.choices.values())
                todo.extend(action.choices.values())
    return out


def test_help_shows_every_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSI_KIT_HEALTH_PORT", "9900")  # the environment's default is the one shown
    quiet = (None, False, "", [], argparse.SUPPRESS)
    missing = []
    for parser in _all_parsers():
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if any(action.default is q or action.default == q for q in quiet if q is not False):
                continue
            if action.default is False:
                continue
            if "default" not in (action.help or ""):
                missing.append(f"{parser.prog} {action.option_strings[0]}")
    assert not missing, missing
    serve = next(p for p in _all_parsers() if p.prog.endswith(" serve"))
    text = serve.format_help()
    assert "(default: 9900)" in text and "(default: 16)" in text
    assert "BACKEND.csi-kit.io" in text


def test_cli_reference_covers_every_command_and_no_machine_detail() -> None:
    text = _hooks().render()
    for command in ("serve", "store", "backends", "sanity", "call", "controllers"):
        assert f"## `csi-kit {command}`" in text, command
    # Each command's own options, rendered from its real parser.
    assert "--request-file FILE" in text and "--connect-timeout CONNECT_TIMEOUT" in text
    assert "--csi-parameters" not in text and "--endpoint ENDPOINT" in text
    assert "(default: 9808)" in text and "(default: this machine's host name)" in text
    assert str(pathlib.Path.home()) + "/" not in text
    assert "<!-- cli-reference -->" in (DOCS / "cli.md").read_text()
    assert sanity_cli.build_parser().prog == "csi-kit sanity"


def test_benchmarks_page_lists_every_script_and_no_private_issue() -> None:
    text = (DOCS / "benchmarks.md").read_text()
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    assert scripts
    assert [s for s in scripts if f"| `{s}` |" not in text] == []
    assert not re.search(r"issue\s*#?\d|\| #\d", text, re.I)
