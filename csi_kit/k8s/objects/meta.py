"""Accessors for an object's metadata, the work-queue key, and RFC 7386 merge patches."""

from __future__ import annotations

import base64
import binascii
import copy
from collections.abc import Iterable
from typing import Any

Obj = dict[str, Any]


def meta(obj: Obj) -> dict[str, Any]:
    m: dict[str, Any] = obj.setdefault("metadata", {})
    return m


def name_of(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("name", ""))


def namespace_of(obj: Obj) -> str | None:
    ns = obj.get("metadata", {}).get("namespace")
    return str(ns) if ns else None


def key_of(obj: Obj) -> str:
    """The work-queue key: `namespace/name`, or `name` for cluster-scoped objects."""
    ns = namespace_of(obj)
    return f"{ns}/{name_of(obj)}" if ns else name_of(obj)


def split_key(key: str) -> tuple[str | None, str]:
    if "/" in key:
        ns, name = key.split("/", 1)
        return ns, name
    return None, key


def uid_of(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("uid", ""))


def rv_of(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("resourceVersion", ""))


def finalizers_of(obj: Obj) -> list[str]:
    return list(obj.get("metadata", {}).get("finalizers") or [])


def annotations_of(obj: Obj) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("annotations") or {})


def labels_of(obj: Obj) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("labels") or {})


def spec_of(obj: Obj) -> dict[str, Any]:
    """The object's `spec` ({} when absent or null)."""
    s: dict[str, Any] = obj.get("spec") or {}
    return s


def status_of(obj: Obj) -> dict[str, Any]:
    """The object's `status` ({} when absent or null)."""
    s: dict[str, Any] = obj.get("status") or {}
    return s


def is_deleting(obj: Obj) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


def deep_copy(obj: Obj) -> Obj:
    return copy.deepcopy(obj)


def rv_newer(a: str, b: str) -> bool:
    """Whether resourceVersion `a` is newer than `b`.

    Versions are opaque to clients in general; every API server (etcd3) and our
    fake hand out integers, and upstream controllers compare them the same way.
    Non-integers compare as "not newer" so the cache keeps what it has.
    """
    try:
        return int(a) > int(b)
    except ValueError:
        return False


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch and return the result (inputs unchanged)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def set_finalizers_patch(obj: Obj, add: Iterable[str] = (), remove: Iterable[str] = ()) -> Obj | None:
    """A merge patch setting the finalizer list (guarded by resourceVersion); None if unchanged.

    Finalizers keep their order; added ones go last, sorted, so two writers
    that agree on the set agree on the list.
    """
    current = finalizers_of(obj)
    gone = set(remove)
    wanted = [f for f in current if f not in gone] + sorted(f for f in set(add) if f not in current)
    if wanted == current:
        return None
    return {"metadata": {"finalizers": wanted or None, "resourceVersion": rv_of(obj)}}


def secret_data(secret: Obj) -> dict[str, str]:
    """A Secret's `data`, decoded; ValueError (naming the secret, never a value) if not base64 UTF-8."""
    try:
        return {
            str(key): base64.b64decode(v, validate=True).decode()
            for key, v in (secret.get("data") or {}).items()
        }
    except (binascii.Error, UnicodeDecodeError, TypeError):
        raise ValueError(f"secret {key_of(secret)} holds a value that is not base64 of UTF-8 text") from None
