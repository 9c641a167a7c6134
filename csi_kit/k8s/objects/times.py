"""The two time formats the API uses: metav1.Time (RFC 3339, seconds) and MicroTime (Leases)."""

from __future__ import annotations

import datetime


def rfc3339(at: datetime.datetime | None = None) -> str:
    """metav1.Time: RFC 3339 in UTC with whole seconds (now when `at` is None)."""
    at = at or datetime.datetime.now(datetime.UTC)
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_from_ns(ns: int) -> str:
    """A CSI timestamp (nanoseconds since the epoch) as metav1.Time."""
    return rfc3339(datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC))


def micro_time() -> str:
    """metav1.MicroTime now: what Lease renewTime/acquireTime hold."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
