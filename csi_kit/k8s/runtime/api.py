"""The narrow Kubernetes API the loops are written against.

Objects travel as plain JSON dicts (what the API server sends), not typed models:
the snapshot kinds are CRDs with no models in lightkube-models, the loops touch
few fields, and one representation lets the in-memory fake
(`csi_kit.testing.fake_k8s`) and the production adapter (`lightkube_api`) be
swapped without conversion.  Errors are `ApiError` with the HTTP code, so the
loops can branch on 404/409/410 whichever side answered.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any, Protocol

import attrs

Obj = dict[str, Any]


@attrs.frozen
class Resource:
    """Where a kind lives in the API (group/version/plural) and whether it is namespaced."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    has_status: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


PVC = Resource("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", True)
PV = Resource("", "v1", "PersistentVolume", "persistentvolumes", False)
SECRET = Resource("", "v1", "Secret", "secrets", True, has_status=False)
NODE = Resource("", "v1", "Node", "nodes", False)
EVENT = Resource("", "v1", "Event", "events", True, has_status=False)
LEASE = Resource("coordination.k8s.io", "v1", "Lease", "leases", True, has_status=False)
VOLUME_SNAPSHOT = Resource("snapshot.storage.k8s.io", "v1", "VolumeSnapshot", "volumesnapshots", True)
VOLUME_SNAPSHOT_CONTENT = Resource(
    "snapshot.storage.k8s.io",
    "v1",
    "VolumeSnapshotContent",
    "volumesnapshotcontents",
    False,
)
VOLUME_SNAPSHOT_CLASS = Resource(
    "snapshot.storage.k8s.io",
    "v1",
    "VolumeSnapshotClass",
    "volumesnapshotclasses",
    False,
    has_status=False,
)


class ApiError(Exception):
    """An API server answer other than success, keyed by its HTTP code and reason."""

    def __init__(self, code: int, reason: str, message: str = "") -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


def not_found(message: str) -> ApiError:
    return ApiError(404, "NotFound", message)


def conflict(message: str) -> ApiError:
    return ApiError(409, "Conflict", message)


def already_exists(message: str) -> ApiError:
    return ApiError(409, "AlreadyExists", message)


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def invalid(message: str) -> ApiError:
    return ApiError(422, "Invalid", message)


def is_not_found(e: BaseException) -> bool:
    return isinstance(e, ApiError) and e.code == 404


def is_conflict(e: BaseException) -> bool:
    return isinstance(e, ApiError) and e.code == 409 and e.reason != "AlreadyExists"


def is_already_exists(e: BaseException) -> bool:
    return isinstance(e, ApiError) and e.code == 409 and e.reason == "AlreadyExists"


def is_gone(e: BaseException) -> bool:
    return isinstance(e, ApiError) and e.code == 410


@attrs.frozen
class WatchEvent:
    """One watch notification: ADDED, MODIFIED, DELETED or BOOKMARK."""

    type: str
    object: Obj


@attrs.frozen
class ObjectList:
    items: list[Obj]
    resource_version: str


class KubeAPI(Protocol):
    """The verbs the loops use, nothing more: each call is one API request.

    `update` replaces the object (a stale metadata.resourceVersion gives 409);
    for kinds with a status subresource it ignores `.status`, which only
    `update_status` writes.  `patch` is a JSON merge patch (RFC 7386).
    `watch` yields events after `resource_version` and raises ApiError(410)
    when that version is too old; it ends (without error) on a server timeout.
    """

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> Obj: ...

    async def list(
        self,
        res: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> ObjectList: ...

    def watch(
        self,
        res: Resource,
        resource_version: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        timeout_seconds: int | None = None,
    ) -> AsyncIterator[WatchEvent]: ...

    async def create(self, res: Resource, obj: Obj, namespace: str | None = None) -> Obj: ...

    async def update(self, res: Resource, obj: Obj) -> Obj: ...

    async def update_status(self, res: Resource, obj: Obj) -> Obj: ...

    async def patch(
        self,
        res: Resource,
        name: str,
        patch: Obj,
        namespace: str | None = None,
        *,
        status: bool = False,
    ) -> Obj: ...

    async def delete(
        self,
        res: Resource,
        name: str,
        namespace: str | None = None,
        *,
        uid: str | None = None,
    ) -> None: ...


# Small accessors shared by the loops, the fake and the tests.


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


def match_labels(obj: Obj, selector: str | None) -> bool:
    """Equality-based label selectors (`a=b,c!=d,e`), the subset the loops use."""
    if not selector:
        return True
    have = labels_of(obj)
    for term in selector.split(","):
        term = term.strip()
        if not term:
            continue
        if "!=" in term:
            k, v = term.split("!=", 1)
            if have.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            k, v = k.strip(), v.strip().lstrip("=")
            if have.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in have:
                return False
        elif term not in have:
            return False
    return True
