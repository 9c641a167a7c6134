"""Defaults of the Kubernetes loops' command-line options from the environment.

Every ``--some-option`` can also be set as ``CSI_KIT_SOME_OPTION`` (a
Deployment's env is easier to patch than its args); the flag wins.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def env(name: str, default: Any) -> Any:
    """``CSI_KIT_<NAME>`` for the option ``--name``, else `default`."""
    return os.environ.get("CSI_KIT_" + name.upper().replace("-", "_"), default)


def env_bool(name: str, default: bool) -> bool:
    """A boolean option's default: 1/true/yes/on (any case) are true."""
    v = env(name, None)
    return default if v is None else str(v).lower() in ("1", "true", "yes", "on")


def deprecated_alias(new: str) -> type[argparse.BooleanOptionalAction]:
    """A `--flag/--no-flag` action that still works but warns to use `new` instead.

    Give it ``dest`` of the new option and ``default=argparse.SUPPRESS`` so the
    new option's own default stands when the alias is not given.
    """

    class Alias(argparse.BooleanOptionalAction):
        def __call__(
            self, parser: Any, namespace: Any, values: Any, option_string: str | None = None
        ) -> None:
            sys.stderr.write(f"csi-kit: {option_string} is deprecated; use {new}\n")
            super().__call__(parser, namespace, values, option_string)

    return Alias
