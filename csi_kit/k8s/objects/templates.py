"""`${token}` expansion, as Go's os.Expand does it for the sidecars' secret templates."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\$\{([^}]*)\}")


class TemplateError(ValueError):
    """A template named tokens that have no value; `missing` lists them, sorted."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(f"invalid tokens: {missing}")


def expand(template: str, values: dict[str, str]) -> str:
    """`template` with every `${key}` replaced by `values[key]`; unknown keys raise TemplateError."""
    missing: set[str] = set()

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            missing.add(key)
            return ""
        return values[key]

    out = _TOKEN.sub(sub, template)
    if missing:
        raise TemplateError(sorted(missing))
    return out
