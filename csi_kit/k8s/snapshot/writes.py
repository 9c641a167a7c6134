"""The writes every snapshot loop makes, once: one `Writer` per kind a loop writes.

Each write is one API request and its answer goes into the loop's cache at
once (`Informer.store_update`, as upstream's storeObjectUpdate), so the next
sync of that key does not act on the version it has just replaced.  A write
that would change nothing is not sent: every request costs QPS.

The rules here are the ones all four snapshot loops (single and group,
controller and snapshotter) follow:

* finalizer lists are replaced whole, guarded by resourceVersion
  (`objects.meta.set_finalizers_patch`);
* a status write names only the fields it sets, and is skipped when they
  already have those values;
* a create that meets AlreadyExists reads the object instead (a restarted
  loop, or a second replica, made it first: the names are deterministic);
* a delete of a missing object succeeds, and each object is deleted once per
  process (`deleted` remembers the uid until the watch reports the deletion).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from csi_kit.k8s.objects.meta import set_finalizers_patch
from csi_kit.k8s.objects.resources import Resource
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.informer import Informer
from csi_kit.k8s.snapshot import protocol as p

log = logging.getLogger(__name__)


class Writer:
    """Writes to one kind (`res`) through `api`, keeping the loop's `cache` of that kind current."""

    def __init__(self, api: KubeAPI, res: Resource, cache: Informer) -> None:
        self.api = api
        self.res = res
        self.cache = cache
        #: uids this process asked to delete, until the watch says so (see `forget`).
        self.deleted: set[str] = set()

    async def patch(self, obj: Obj, patch: Obj, *, status: bool = False) -> Obj:
        updated = await self.api.patch(self.res, k.name_of(obj), patch, k.namespace_of(obj), status=status)
        self.cache.store_update(updated)
        return updated

    async def set_status(self, obj: Obj, fields: dict[str, Any]) -> Obj:
        """Merge `fields` into status.* unless every one already has that value."""
        current = p.status(obj)
        if all(current.get(f) == v for f, v in fields.items()):
            return obj
        return await self.patch(obj, {"status": fields}, status=True)

    async def report(self, obj: Obj, message: str, extra: dict[str, Any] | None = None) -> bool:
        """Put `message` in status.error (what `kubectl describe` shows) with `extra` fields.

        Returns whether it was written: not when the same message is already
        there, nor when the write fails (logged: the sync's own error is what
        the caller re-raises).
        """
        if (p.status(obj).get("error") or {}).get("message") == message:
            return False
        try:
            await self.set_status(obj, {"error": p.error_status(message), **(extra or {})})
        except ApiError as e:
            log.info("cannot report error on %s %s: %s", self.res.kind, k.key_of(obj), e)
            return False
        return True

    async def set_annotation(self, obj: Obj, key: str, value: str | None) -> Obj:
        """Set (or with None remove) one annotation, unless it already is so."""
        have = k.annotations_of(obj)
        if (value is None and key not in have) or (value is not None and have.get(key) == value):
            return obj
        return await self.patch(obj, {"metadata": {"annotations": {key: value}}})

    async def set_finalizers(
        self, obj: Obj, add: Iterable[str] = (), remove: Iterable[str] = (), *, spec: Obj | None = None
    ) -> Obj:
        """One rv-guarded write for any finalizer change, plus `spec` fields in the same write."""
        patch = set_finalizers_patch(obj, add, remove)
        if patch is None:
            if not spec:
                return obj
            patch = {"metadata": {"resourceVersion": k.rv_of(obj)}}
        if spec:
            patch["spec"] = spec
        return await self.patch(obj, patch)

    async def drop_finalizer(self, obj: Obj, finalizer: str) -> None:
        """Remove `finalizer`; an object already gone is fine (the finalizer went with it)."""
        try:
            await self.set_finalizers(obj, remove={finalizer})
        except ApiError as e:
            if not k.is_not_found(e):
                raise

    async def bind(self, content: Obj, ref_field: str, owner: Obj, finalizer: str) -> Obj:
        """Complete a pre-provisioned content's binding to `owner` and protect it, in one write.

        The owner's uid in `spec.<ref_field>` completes the two-way binding;
        `finalizer` is added unless the content is being deleted.
        """
        protect = finalizer not in k.finalizers_of(content) and not k.is_deleting(content)
        if (p.spec(content).get(ref_field) or {}).get("uid") and not protect:
            return content
        patch: Obj = {"spec": {ref_field: {"uid": k.uid_of(owner)}}}
        if protect:
            patch["metadata"] = {
                "finalizers": [*k.finalizers_of(content), finalizer],
                "resourceVersion": k.rv_of(content),
            }
        return await self.patch(content, patch)

    async def create(self, body: Obj) -> Obj:
        """Create `body`, or read the object of that name when it already exists."""
        meta = body["metadata"]
        try:
            created = await self.api.create(self.res, body)
        except ApiError as e:
            if not k.is_already_exists(e):
                raise
            created = await self.api.get(self.res, meta["name"], meta.get("namespace"))
        self.cache.store_update(created)
        return created

    async def delete(self, obj: Obj, *, uid: bool = False) -> None:
        """Delete `obj` once (not when it is already being deleted); a missing object is fine.

        The delete answer carries no version to put in the cache, so the uid is
        remembered: a sync running before the watch event does not delete twice.
        `uid=True` sends it as a precondition (only this incarnation of the name).
        """
        if k.is_deleting(obj) or k.uid_of(obj) in self.deleted:
            return
        try:
            await self.api.delete(
                self.res, k.name_of(obj), k.namespace_of(obj), uid=k.uid_of(obj) if uid else None
            )
        except ApiError as e:
            if not k.is_not_found(e):
                raise
        self.deleted.add(k.uid_of(obj))

    def forget(self, event: str, old: Obj | None, new: Obj | None) -> None:
        """An informer handler: the watch has seen a deletion this process asked for."""
        obj = new or old
        if obj is not None and (event == "DELETED" or k.is_deleting(obj)):
            self.deleted.discard(k.uid_of(obj))
