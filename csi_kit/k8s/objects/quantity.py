"""Kubernetes resource quantities ("10Gi", "1.5G", "1e9") as whole bytes, and back."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from csi_kit.k8s.objects.meta import Obj

_SUFFIX = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[a-zA-Z]*)$")
MAX_BYTES = 2**63 - 1  # CSI sizes are int64


def parse_quantity(value: Any) -> int:
    """A Kubernetes quantity ("10Gi", "1.5G", "1e9", 4096) as whole bytes, rounded up.

    Raises ValueError for anything that is not a non-negative quantity that
    fits CSI's int64: a PVC's size is user input and reaches a CSI call.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity {value!r}")
    if isinstance(value, int):
        n = Decimal(value)
    else:
        m = _QUANTITY.match(str(value).strip())
        if not m or m.group(1) in (".", "+", "-", ""):
            raise ValueError(f"invalid quantity {value!r}")
        try:
            number = Decimal(m.group(1))
        except InvalidOperation:
            raise ValueError(f"invalid quantity {value!r}") from None
        suffix = m.group(2)
        if suffix[:1] in ("e", "E") and suffix[1:].lstrip("+-").isdigit():
            exp = int(suffix[1:])
            if abs(exp) > 30:
                raise ValueError(f"quantity {value!r} out of range")
            n = number.scaleb(exp)
        elif suffix in _SUFFIX:
            n = number * _SUFFIX[suffix]
        else:
            raise ValueError(f"invalid quantity suffix in {value!r}")
    if n < 0:
        raise ValueError(f"negative quantity {value!r}")
    whole = int(n.to_integral_value(rounding="ROUND_CEILING"))
    if whole > MAX_BYTES:
        raise ValueError(f"quantity {value!r} out of range")
    return whole


def format_quantity(n: int) -> str:
    """Bytes as the canonical binary-SI quantity Kubernetes itself would print ("1Gi", "1536")."""
    if n == 0:
        return "0"
    for power, suffix in ((6, "Ei"), (5, "Pi"), (4, "Ti"), (3, "Gi"), (2, "Mi"), (1, "Ki")):
        unit = 1024**power
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def storage_of(obj: Obj, *path: str) -> int | None:
    """The `storage` quantity under `path` (e.g. "spec", "resources", "requests"), or None."""
    cur: Any = obj
    for p in path:
        cur = (cur or {}).get(p) if isinstance(cur, dict) else None
    if not isinstance(cur, dict) or cur.get("storage") is None:
        return None
    return parse_quantity(cur["storage"])
