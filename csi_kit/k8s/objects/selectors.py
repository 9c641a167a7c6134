"""Label selectors in both forms Kubernetes uses, matched the way the API server matches them.

The string form (`a=b,c!=d,e,!f,g in (x,y),h notin (z)`) is what list/watch take;
the structured form (metav1.LabelSelector: matchLabels + matchExpressions) is
what objects such as VolumeGroupSnapshot carry.  Both parse to the same terms.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

_SET_TERM = re.compile(r"^\s*(\S+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


@attrs.frozen
class Term:
    """One requirement: `op` is one of =, !=, in, notin, exists, !exists."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        have = labels.get(self.key)
        if self.op == "=":
            return have == self.values[0]
        if self.op == "!=":
            return have != self.values[0]
        if self.op == "in":
            return have is not None and have in self.values
        if self.op == "notin":
            return have is None or have not in self.values
        if self.op == "exists":
            return self.key in labels
        return self.key not in labels  # "!exists"


def _split(selector: str) -> list[str]:
    """Split on the commas that are not inside a `( … )` value set."""
    out, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [t.strip() for t in out if t.strip()]


def parse(selector: str | None) -> list[Term]:
    """The terms of a selector string; raises ValueError for one the API server would refuse."""
    terms: list[Term] = []
    for term in _split(selector or ""):
        m = _SET_TERM.match(term)
        if m:
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            terms.append(Term(m.group(1), m.group(2), values))
        elif "!=" in term:
            key, value = term.split("!=", 1)
            terms.append(Term(key.strip(), "!=", (value.strip(),)))
        elif "=" in term:
            key, value = term.split("=", 1)
            terms.append(Term(key.strip(), "=", (value.strip().lstrip("="),)))  # "a==b" is "a=b"
        elif term.startswith("!"):
            terms.append(Term(term[1:].strip(), "!exists"))
        elif " " in term or "(" in term or ")" in term:
            raise ValueError(f"invalid label selector term {term!r}")
        else:
            terms.append(Term(term, "exists"))
    return terms


def matches(selector: str | None, labels: dict[str, str]) -> bool:
    """Whether `labels` satisfy the selector string (an empty selector matches everything)."""
    return all(t.matches(labels) for t in parse(selector))


_OPS = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!exists"}


def from_label_selector(selector: dict[str, Any]) -> list[Term]:
    """The terms of a metav1.LabelSelector; raises ValueError for an unknown operator."""
    terms = [Term(str(k), "=", (str(v),)) for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        op = expr.get("operator")
        if op not in _OPS:
            raise ValueError(f"invalid label selector operator {op!r}")
        terms.append(Term(str(expr.get("key")), _OPS[op], tuple(str(v) for v in expr.get("values") or [])))
    return terms


def label_selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics: matchLabels AND every matchExpression; empty matches all."""
    return all(t.matches(labels) for t in from_label_selector(selector))


def format_label_selector(selector: dict[str, Any]) -> str:
    """A metav1.LabelSelector in the string form (`<none>` when empty), for messages."""
    parts = []
    for t in from_label_selector(selector):
        if t.op in ("in", "notin"):
            parts.append(f"{t.key} {t.op} ({','.join(t.values)})")
        elif t.op == "=":
            parts.append(f"{t.key}={t.values[0]}")
        else:
            parts.append(("!" if t.op == "!exists" else "") + t.key)
    return ",".join(parts) or "<none>"
