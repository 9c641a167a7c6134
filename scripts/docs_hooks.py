"""MkDocs hooks for the documentation site (mkdocs.yml ``hooks:``).

``<!-- cli-reference -->`` in a page becomes the ``--help`` of every
``csi-kit`` command, rendered from the real parsers (`csi_kit.cli.build_parser`,
`csi_kit.call.build_parser`, `csi_kit.testing.sanity.cli.build_parser`), so the
reference cannot drift from the code.  Rendered without any ``CSI_KIT_*``
variable set, so the defaults shown are the built-in ones; defaults that
depend on the machine (its host name, root's or the user's state directory)
are named, not printed.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

MARKER = "<!-- cli-reference -->"


def _help(parser: argparse.ArgumentParser) -> str:
    os.environ["COLUMNS"] = "100"
    text = parser.format_help()
    for host in {os.uname().nodename, socket.gethostname()}:
        text = text.replace(f"(default: {host})", "(default: this machine's host name)")
    home = os.path.expanduser("~")
    text = text.replace(f"(default: {home}/.local/share/csi-kit)", "(default: /var/lib/csi-kit as root)")
    return text


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render() -> str:
    """The CLI reference as Markdown."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("CSI_KIT_") or k == "CSI_ENDPOINT"}
    for key in saved:
        del os.environ[key]
    try:
        from csi_kit import call
        from csi_kit.cli import build_parser
        from csi_kit.testing.sanity import cli as sanity

        top = build_parser()
        own = {"call": call.build_parser(), "sanity": sanity.build_parser()}
        sections = [("csi-kit", top)]
        for name, sub in _subparsers(top).items():
            sections.append((f"csi-kit {name}", own.get(name, sub)))
            for inner, subsub in _subparsers(sub).items():
                sections.append((f"csi-kit {name} {inner}", subsub))
        out = []
        for title, parser in sections:
            out.append(f"## `{title}`\n\n```text\n{_help(parser).rstrip()}\n```\n")
        return "\n".join(out)
    finally:
        os.environ.update(saved)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
