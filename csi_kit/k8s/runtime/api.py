"""The narrow Kubernetes API the loops are written against.

Objects travel as plain JSON dicts (what the API server sends), not typed models:
the snapshot kinds are CRDs with no models in lightkube-models, the loops touch
few fields, and one representation lets the in-memory fake
(`csi_kit.testing.fake_k8s`) and the production adapter (`runtime.lightkube`) be
swapped without conversion.  Errors are `ApiError` with the HTTP code, so the
loops can branch on 404/409/410 whichever side answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import attrs

# The accessors live with the other pure helpers; re-exported because every loop reads them as `k.*`.
from csi_kit.k8s.objects import selectors
from csi_kit.k8s.objects.meta import Obj as Obj
from csi_kit.k8s.objects.meta import annotations_of as annotations_of
from csi_kit.k8s.objects.meta import deep_copy as deep_copy
from csi_kit.k8s.objects.meta import finalizers_of as finalizers_of
from csi_kit.k8s.objects.meta import is_deleting as is_deleting
from csi_kit.k8s.objects.meta import key_of as key_of
from csi_kit.k8s.objects.meta import labels_of as labels_of
from csi_kit.k8s.objects.meta import merge_patch as merge_patch
from csi_kit.k8s.objects.meta import meta as meta
from csi_kit.k8s.objects.meta import name_of as name_of
from csi_kit.k8s.objects.meta import namespace_of as namespace_of
from csi_kit.k8s.objects.meta import rv_newer as rv_newer
from csi_kit.k8s.objects.meta import rv_of as rv_of
from csi_kit.k8s.objects.meta import secret_data
from csi_kit.k8s.objects.meta import split_key as split_key
from csi_kit.k8s.objects.meta import uid_of as uid_of
from csi_kit.k8s.objects.resources import SECRET
from csi_kit.k8s.objects.resources import Resource as Resource


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


def match_labels(obj: Obj, selector: str | None) -> bool:
    """Whether the object's labels satisfy a selector string (both equality and set-based terms)."""
    return selectors.matches(selector, labels_of(obj))


async def read_secret(api: KubeAPI, ref: tuple[str, str] | None) -> dict[str, str]:
    """The data of Secret `ref` = (name, namespace), decoded; {} for no secret.

    ApiError when it cannot be read; ValueError (naming the secret, never a
    value) when a value is not base64 of UTF-8 text.
    """
    if ref is None:
        return {}
    return secret_data(await api.get(SECRET, ref[0], ref[1]))
