"""DNS-1123 names: what a namespace (label, ≤63) and most object names (subdomain, ≤253) must be."""

from __future__ import annotations

import re

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def is_dns1123_label(name: str) -> bool:
    return len(name) <= 63 and bool(_LABEL.match(name))


def is_dns1123_subdomain(name: str) -> bool:
    return len(name) <= 253 and bool(_SUBDOMAIN.match(name))


def sanitize_lease_name(name: str) -> str:
    """What csi-lib-utils does to a driver name before using it in a Lease name."""
    out = re.sub(r"[^a-zA-Z0-9-]", "-", name)
    if out.endswith("-"):
        out += "X"
    return out
