"""The snapshotter: VolumeSnapshotContent ↔ the driver's snapshots (CSI calls).

What the upstream csi-snapshotter sidecar does, for one driver: a dynamic
content (source.volumeHandle) gets CreateSnapshot named
`snapshot-<VolumeSnapshot UID>` and its status (handle, creationTime in ns,
size in bytes, readyToUse); a pre-provisioned content (source.snapshotHandle)
is checked with ListSnapshots; a content that is deleted after the controller
marked it `volumesnapshot-being-deleted` gets DeleteSnapshot under its
Delete policy (Retain keeps the storage) and loses its finalizer.

The `volumesnapshot-being-created` annotation is the leak guard: it is on the
content from before the first CreateSnapshot until the driver has answered
with success or a final error, and while it is there a deletion waits -- so a
snapshot deleted while CreateSnapshot is in flight (or across a restart of
this process) is created, recorded, and only then deleted, never leaked.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any, Protocol

from csi_kit.k8s.objects.resources import SECRET, VOLUME_SNAPSHOT_CLASS, VOLUME_SNAPSHOT_CONTENT
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.controller import Loop, Retry
from csi_kit.k8s.runtime.csi import CSICallError, SnapshotInfo, is_final_error
from csi_kit.k8s.runtime.events import WARNING, EventRecorder
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.snapshot import protocol as p

log = logging.getLogger(__name__)


class SnapshotDriver(Protocol):
    """The CSI calls the snapshotter makes (`CSIClient` implements it)."""

    async def create_snapshot(
        self, source_volume_id: str, name: str, parameters: dict[str, str], secrets: dict[str, str]
    ) -> SnapshotInfo: ...

    async def delete_snapshot(self, snapshot_id: str, secrets: dict[str, str]) -> None: ...

    async def list_snapshots(
        self, *, snapshot_id: str = "", secrets: dict[str, str] | None = None
    ) -> list[SnapshotInfo]: ...


class Snapshotter(Loop):
    name = "snapshotter"

    def __init__(
        self,
        api: KubeAPI,
        driver: SnapshotDriver,
        driver_name: str,
        *,
        informers: InformerFactory | None = None,
        workers: int = 10,
        resync_period: float = 900.0,
        extra_create_metadata: bool = False,
        node_name: str | None = None,
        snapshot_name_prefix: str = "snapshot",
        snapshot_name_uuid_length: int = -1,
        list_snapshots: bool = True,
        events: EventRecorder | None = None,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
    ) -> None:
        super().__init__(informers=informers, workers=workers, base_delay=base_delay, max_delay=max_delay)
        self.api = api
        self.driver = driver
        self.driver_name = driver_name
        self.extra_create_metadata = extra_create_metadata
        self.snapshot_name_prefix = snapshot_name_prefix
        self.snapshot_name_uuid_length = snapshot_name_uuid_length
        self.list_snapshots = list_snapshots
        self.events = events
        selector = f"{p.LABEL_MANAGED_BY}={node_name}" if node_name else None
        self.contents = self.informer(
            api, VOLUME_SNAPSHOT_CONTENT, label_selector=selector, resync_period=resync_period
        )
        self.classes = self.informer(api, VOLUME_SNAPSHOT_CLASS)
        self.content_queue = self.queue("content", self.sync_content)
        self.contents.add_handler(self._on_content)

    def _on_content(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        if event != "DELETED" and p.spec(obj).get("driver") == self.driver_name:
            self.content_queue.add(k.name_of(obj))

    # ----------------------------------------------------------------- helpers

    async def _patch(self, content: Obj, patch: Obj, *, status: bool = False) -> Obj:
        updated = await self.api.patch(VOLUME_SNAPSHOT_CONTENT, k.name_of(content), patch, status=status)
        self.contents.store_update(updated)
        return updated

    async def _set_annotation(self, content: Obj, key: str, value: str | None) -> Obj:
        present = key in k.annotations_of(content)
        if (value is None and not present) or (
            value is not None and k.annotations_of(content).get(key) == value
        ):
            return content
        return await self._patch(content, {"metadata": {"annotations": {key: value}}})

    async def _report(self, content: Obj, message: str, reason: str = "SnapshotCreationFailed") -> None:
        if self.events is not None:
            self.events.event(content, WARNING, reason, message)
        if (p.status(content).get("error") or {}).get("message") == message:
            return
        try:
            await self._patch(content, {"status": {"error": p.error_status(message)}}, status=True)
        except ApiError as e:
            log.info("cannot report error on content %s: %s", k.name_of(content), e)

    async def _secrets(self, ref: tuple[str, str] | None) -> dict[str, str]:
        if ref is None:
            return {}
        secret = await self.api.get(SECRET, ref[0], ref[1])
        return {key: base64.b64decode(v).decode() for key, v in (secret.get("data") or {}).items()}

    def _class(self, content: Obj) -> Obj | None:
        name = p.spec(content).get("volumeSnapshotClassName")
        return self.classes.get(str(name)) if name else None

    @staticmethod
    def _should_delete(content: Obj) -> bool:
        if not k.is_deleting(content):
            return False
        spec = p.spec(content)
        if spec.get("source", {}).get("snapshotHandle") and not spec.get("volumeSnapshotRef", {}).get("uid"):
            return True  # a pre-provisioned content nobody ever bound
        ann = k.annotations_of(content)
        if p.ANN_BEING_CREATED in ann:
            return False  # the driver may be cutting it right now: finish first, then delete
        return p.ANN_BEING_DELETED in ann

    # -------------------------------------------------------------------- sync

    async def sync_content(self, name: str) -> None:
        content = self.contents.get(name)
        if content is None or p.spec(content).get("driver") != self.driver_name:
            return
        if self._should_delete(content):
            await self._delete(content)
            return
        spec, st = p.spec(content), p.status(content)
        if spec.get("source", {}).get("volumeHandle") and not st.get("snapshotHandle"):
            if k.is_deleting(content) and p.ANN_BEING_CREATED not in k.annotations_of(content):
                return  # deleted before any CreateSnapshot was sent: nothing on the backend to wait for
            await self._create(content)
            return
        if st.get("readyToUse") is True:
            await self._set_annotation(content, p.ANN_BEING_CREATED, None)
            return
        await self._refresh(content)

    async def _create_input(self, content: Obj) -> tuple[dict[str, str], dict[str, str]]:
        cls = self._class(content)
        if cls is None:
            raise ValueError(
                f"failed to get input parameters to create snapshot for content {k.name_of(content)}: "
                f'volumesnapshotclass "{p.spec(content).get("volumeSnapshotClassName")}" not found'
            )
        params_in: dict[str, str] = dict(cls.get("parameters") or {})
        ref = p.spec(content).get("volumeSnapshotRef") or {}
        secret = p.secret_ref(params_in, k.name_of(content), ref.get("name"), ref.get("namespace"))
        params = p.strip_prefixed(params_in)
        if self.extra_create_metadata:
            params[p.META_SNAPSHOT_NAME] = str(ref.get("name"))
            params[p.META_SNAPSHOT_NAMESPACE] = str(ref.get("namespace"))
            params[p.META_CONTENT_NAME] = k.name_of(content)
        return params, await self._secrets(secret)

    def _status(self, info: SnapshotInfo) -> dict[str, Any]:
        return {
            "snapshotHandle": info.snapshot_id,
            "creationTime": info.creation_time_ns or None,
            "readyToUse": info.ready_to_use,
            "restoreSize": info.size_bytes or None,  # 0 means "unknown" in CSI
            "error": None,
        }

    async def _create(self, content: Obj) -> None:
        try:
            params, secrets = await self._create_input(content)
        except (ValueError, ApiError) as e:
            await self._report(content, f"Failed to check and update snapshot content: {e}")
            raise
        content = await self._set_annotation(content, p.ANN_BEING_CREATED, "yes")
        volume = str(p.spec(content)["source"]["volumeHandle"])
        name = p.csi_snapshot_name(content, self.snapshot_name_prefix, self.snapshot_name_uuid_length)
        try:
            info = await self.driver.create_snapshot(volume, name, params, secrets)
        except CSICallError as e:
            if is_final_error(e):
                content = await self._set_annotation(content, p.ANN_BEING_CREATED, None)
            await self._report(
                content, f"Failed to create snapshot: failed to take snapshot of the volume {volume}: {e}"
            )
            raise
        st = self._status(info)
        if not st["creationTime"]:
            st["creationTime"] = time.time_ns()
        content = await self._patch(content, {"status": st}, status=True)
        await self._set_annotation(content, p.ANN_BEING_CREATED, None)
        if not info.ready_to_use:
            raise Retry(f"snapshot {info.snapshot_id} is not ready yet")

    async def _refresh(self, content: Obj) -> None:
        """Ask the driver again about a snapshot that is not ready (or pre-provisioned and unchecked)."""
        spec = p.spec(content)
        if spec.get("source", {}).get("volumeHandle"):
            # Upstream polls a cutting snapshot by repeating the idempotent CreateSnapshot.
            await self._create(content)
            return
        handle = str(spec.get("source", {}).get("snapshotHandle") or "")
        if not self.list_snapshots:
            # A driver without LIST_SNAPSHOTS cannot be asked: take the handle on
            # trust, as upstream does (size unknown).
            await self._patch(
                content,
                {"status": {"snapshotHandle": handle, "readyToUse": True, "error": None}},
                status=True,
            )
            return
        try:
            cls = self._class(content)
            params = dict(cls.get("parameters") or {}) if cls else {}
            ref = p.spec(content).get("volumeSnapshotRef") or {}
            list_ref = p.secret_ref(
                params,
                k.name_of(content),
                ref.get("name"),
                ref.get("namespace"),
                name_key=p.LIST_SECRET_NAME_KEY,
                namespace_key=p.LIST_SECRET_NAMESPACE_KEY,
            )
            found = await self.driver.list_snapshots(
                snapshot_id=handle, secrets=await self._secrets(list_ref)
            )
        except (CSICallError, ValueError, ApiError) as e:
            await self._report(content, f"Failed to check and update snapshot content: {e}")
            raise
        if not found:
            msg = (
                "Failed to check and update snapshot content: failed to list snapshot for content "
                f"{k.name_of(content)}: snapshot {handle} not found"
            )
            await self._report(content, msg)
            raise Retry(msg)
        info = found[0]
        await self._patch(content, {"status": self._status(info)}, status=True)
        if not info.ready_to_use:
            raise Retry(f"snapshot {handle} is not ready yet")

    async def _delete(self, content: Obj) -> None:
        if p.spec(content).get("deletionPolicy") == p.DELETE:
            handle = p.status(content).get("snapshotHandle") or p.spec(content).get("source", {}).get(
                "snapshotHandle"
            )
            if handle:
                ann = k.annotations_of(content)
                ref = None
                if ann.get(p.ANN_DELETION_SECRET_NAME) and ann.get(p.ANN_DELETION_SECRET_NAMESPACE):
                    ref = (ann[p.ANN_DELETION_SECRET_NAME], ann[p.ANN_DELETION_SECRET_NAMESPACE])
                try:
                    await self.driver.delete_snapshot(str(handle), await self._secrets(ref))
                except (CSICallError, ApiError) as e:
                    await self._report(content, f"Failed to delete snapshot: {e}", "SnapshotDeleteError")
                    raise
        if p.CONTENT_BOUND_FINALIZER in k.finalizers_of(content):
            wanted = [f for f in k.finalizers_of(content) if f != p.CONTENT_BOUND_FINALIZER]
            try:
                await self._patch(
                    content, {"metadata": {"finalizers": wanted or None, "resourceVersion": k.rv_of(content)}}
                )
            except ApiError as e:
                if not k.is_not_found(e):
                    raise
