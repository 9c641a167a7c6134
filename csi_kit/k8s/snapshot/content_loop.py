"""What the two snapshotters share: a queue of their driver's contents, and the leak guard.

`Snapshotter` (VolumeSnapshotContent, `snapshotter.py`) and `GroupSnapshotter`
(VolumeGroupSnapshotContent, `group_snapshotter.py`) are the same loop over
two kinds, as upstream's csi-snapshotter runs both: a `ContentKind` names
what differs (the resource, the reference field, the annotations and the
finalizer), and `ContentLoop` holds the rules they follow alike:

- only contents of this driver are synced (`spec.driver`);
- **the leak guard**: the being-created annotation is on a content from
  before the first create call until the driver has answered with success
  or a final error (`creating`), and while it is there a deletion waits
  (`should_delete`) -- so a content deleted while the call is in flight (or
  across a restart of this process) is created, recorded, and only then
  deleted, never leaked;
- a content is deleted on the driver only after the controller marked it
  being-deleted (or when it is pre-provisioned and was never bound), and
  then loses its bound finalizer (`release`);
- errors go to the content's status.error once per message (`report`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs

from csi_kit.k8s.objects.resources import Resource
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import KubeAPI, Obj, read_secret
from csi_kit.k8s.runtime.controller import Loop
from csi_kit.k8s.runtime.csi import CSICallError, is_final_error
from csi_kit.k8s.runtime.events import WARNING, EventRecorder
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.snapshot import protocol as p
from csi_kit.k8s.snapshot.writes import Writer

T = TypeVar("T")


@attrs.frozen
class ContentKind:
    """The names a snapshotter reads on its kind of content (upstream's, per kind)."""

    res: Resource
    class_res: Resource
    class_field: str  # spec.<class_field>: the class's name
    ref_field: str  # spec.<ref_field>: the (group) snapshot it is bound to
    preprovisioned_field: str  # spec.source.<field>: set on a pre-provisioned content
    being_created: str
    being_deleted: str
    bound_finalizer: str
    deletion_secret: tuple[str, str]  # annotations naming the secret for the delete call
    #: the class's secret for the create call: name key, namespace key, template kind, sidecar (errors).
    create_secret: tuple[str, str, str, str]
    #: reserved `csi.storage.k8s.io/` class parameters this sidecar reads (any other is refused).
    sidecar_keys: frozenset[str]
    #: `--extra-create-metadata` parameters: the (group) snapshot's name and namespace, the content's name.
    metadata_keys: tuple[str, str, str]
    #: the error for a content whose class is missing ({content}, {cls}), as upstream words it.
    class_missing: str
    #: status fields an error report also sets (the group snapshotter says readyToUse false).
    error_extra: tuple[tuple[str, bool], ...] = ()


class ContentLoop(Loop):
    """One queue of this driver's contents of `kind`, with the rules both snapshotters follow."""

    kind: ContentKind

    def __init__(
        self,
        api: KubeAPI,
        driver_name: str,
        *,
        informers: InformerFactory | None,
        workers: int,
        resync_period: float,
        base_delay: float,
        max_delay: float,
        extra_create_metadata: bool = False,
        label_selector: str | None = None,
        events: EventRecorder | None = None,
    ) -> None:
        super().__init__(informers=informers, workers=workers, base_delay=base_delay, max_delay=max_delay)
        self.api = api
        self.driver_name = driver_name
        self.extra_create_metadata = extra_create_metadata
        self.events = events
        self.contents = self.informer(
            api, self.kind.res, label_selector=label_selector, resync_period=resync_period
        )
        self.classes = self.informer(api, self.kind.class_res)
        self.content_writes = Writer(api, self.kind.res, self.contents)
        self.content_queue = self.queue("content", self.sync_content)
        self.contents.add_handler(self._on_content)

    def _on_content(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        if event != "DELETED" and p.spec(obj).get("driver") == self.driver_name:
            self.content_queue.add(k.name_of(obj))

    async def sync_content(self, name: str) -> None:
        raise NotImplementedError

    def ours(self, name: str) -> Obj | None:
        """The content of that name if it is this driver's."""
        content = self.contents.get(name)
        if content is None or p.spec(content).get("driver") != self.driver_name:
            return None
        return content

    def class_of(self, content: Obj) -> Obj | None:
        name = p.spec(content).get(self.kind.class_field)
        return self.classes.get(str(name)) if name else None

    def preprovisioned(self, content: Obj) -> bool:
        return bool((p.spec(content).get("source") or {}).get(self.kind.preprovisioned_field))

    def should_delete(self, content: Obj) -> bool:
        """Whether a deleted content's storage may go now (upstream's shouldDelete)."""
        if not k.is_deleting(content):
            return False
        if self.preprovisioned(content) and not (p.spec(content).get(self.kind.ref_field) or {}).get("uid"):
            return True  # a pre-provisioned content nobody ever bound
        ann = k.annotations_of(content)
        if self.kind.being_created in ann:
            return False  # the driver may be cutting it right now: finish first, then delete
        return self.kind.being_deleted in ann

    def deleted_before_any_call(self, content: Obj) -> bool:
        """A dynamic content deleted before any create call was sent: nothing on the backend to wait for."""
        return k.is_deleting(content) and self.kind.being_created not in k.annotations_of(content)

    async def create_input(self, content: Obj) -> tuple[dict[str, str], dict[str, str]]:
        """The create call's parameters (the class's, reserved keys stripped, plus the extra
        metadata when asked) and secrets (the class's templates resolved and read).

        ValueError for a missing class or a bad reserved key or template; ApiError
        when the secret cannot be read.
        """
        cls = self.class_of(content)
        if cls is None:
            cls_name = p.spec(content).get(self.kind.class_field)
            raise ValueError(self.kind.class_missing.format(content=k.name_of(content), cls=cls_name))
        params_in: dict[str, str] = dict(cls.get("parameters") or {})
        ref = p.spec(content).get(self.kind.ref_field) or {}
        name_key, namespace_key, template_kind, sidecar = self.kind.create_secret
        secret = p.secret_ref(
            params_in,
            k.name_of(content),
            ref.get("name"),
            ref.get("namespace"),
            name_key=name_key,
            namespace_key=namespace_key,
            kind=template_kind,
            sidecar=sidecar,
        )
        params = p.strip_prefixed(params_in, self.kind.sidecar_keys)
        if self.extra_create_metadata:
            meta_name, meta_namespace, meta_content = self.kind.metadata_keys
            params[meta_name] = str(ref.get("name"))
            params[meta_namespace] = str(ref.get("namespace"))
            params[meta_content] = k.name_of(content)
        return params, await self.secrets(secret)

    async def secrets(self, ref: tuple[str, str] | None) -> dict[str, str]:
        return await read_secret(self.api, ref)

    async def deletion_secrets(self, content: Obj) -> dict[str, str]:
        """The data of the secret the content's annotations name for deleting it, if any."""
        return await self.secrets(p.deletion_secret(content, *self.kind.deletion_secret))

    async def report(self, content: Obj, message: str, reason: str) -> None:
        """An error in status.error (once per message) and, with events on, a Warning Event."""
        if self.events is not None:
            self.events.event(content, WARNING, reason, message)
        await self.content_writes.report(content, message, dict(self.kind.error_extra))

    async def creating(
        self, content: Obj, call: Callable[[], Awaitable[T]], failure: str, reason: str
    ) -> tuple[Obj, T]:
        """Run the driver's create call under the being-created annotation (the leak guard).

        A final error lifts the annotation (the driver said it made nothing); any
        error is reported as `failure: <error>` and raised again.
        """
        content = await self.content_writes.set_annotation(content, self.kind.being_created, "yes")
        try:
            return content, await call()
        except CSICallError as e:
            if is_final_error(e):
                content = await self.content_writes.set_annotation(content, self.kind.being_created, None)
            await self.report(content, f"{failure}: {e}", reason)
            raise

    async def record(self, content: Obj, status: dict[str, object]) -> Obj:
        """The driver's answer in the content's status, then the leak guard lifted (it is recorded)."""
        content = await self.content_writes.patch(content, {"status": status}, status=True)
        return await self.content_writes.set_annotation(content, self.kind.being_created, None)

    async def release(self, content: Obj) -> None:
        """The storage is dealt with: drop the bound finalizer (a content already gone is fine)."""
        await self.content_writes.drop_finalizer(content, self.kind.bound_finalizer)
