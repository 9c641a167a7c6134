"""The snapshotter: VolumeSnapshotContent ↔ the driver's snapshots (CSI calls).

What the upstream csi-snapshotter sidecar does, for one driver: a dynamic
content (source.volumeHandle) gets CreateSnapshot named
`snapshot-<VolumeSnapshot UID>` and its status (handle, creationTime in ns,
size in bytes, readyToUse); a pre-provisioned content (source.snapshotHandle)
is checked with ListSnapshots; a content that is deleted after the controller
marked it `volumesnapshot-being-deleted` gets DeleteSnapshot under its
Delete policy (Retain keeps the storage) and loses its finalizer.

The `volumesnapshot-being-created` annotation is the leak guard
(`content_loop.ContentLoop`, shared with the group snapshotter): a snapshot
deleted while CreateSnapshot is in flight (or across a restart of this
process) is created, recorded, and only then deleted, never leaked.

Request economy: a dynamic content costs two writes here, the status and
the annotation's removal.  The controller creates the content already
carrying the annotation (upstream's snapshotter adds it with a write of its
own); its removal cannot share the status write (the status subresource
ignores metadata), and it must go: upstream's snapshotter never deletes a
content that still carries it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from csi_kit.k8s.objects.names import sanitize_lease_name
from csi_kit.k8s.objects.resources import VOLUME_SNAPSHOT_CLASS, VOLUME_SNAPSHOT_CONTENT
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.context import LoopContext, Planned
from csi_kit.k8s.runtime.controller import Retry
from csi_kit.k8s.runtime.csi import CSICallError, SnapshotInfo
from csi_kit.k8s.runtime.events import EventRecorder
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.snapshot import protocol as p
from csi_kit.k8s.snapshot.content_loop import ContentKind, ContentLoop

log = logging.getLogger(__name__)

CHECK_FAILED = "Failed to check and update snapshot content"


class SnapshotDriver(Protocol):
    """The CSI calls the snapshotter makes (`CSIClient` implements it)."""

    async def create_snapshot(
        self, source_volume_id: str, name: str, parameters: dict[str, str], secrets: dict[str, str]
    ) -> SnapshotInfo: ...

    async def delete_snapshot(self, snapshot_id: str, secrets: dict[str, str]) -> None: ...

    async def list_snapshots(
        self, *, snapshot_id: str = "", secrets: dict[str, str] | None = None
    ) -> list[SnapshotInfo]: ...


class Snapshotter(ContentLoop):
    name = "snapshotter"
    kind = ContentKind(
        res=VOLUME_SNAPSHOT_CONTENT,
        class_res=VOLUME_SNAPSHOT_CLASS,
        class_field="volumeSnapshotClassName",
        ref_field="volumeSnapshotRef",
        preprovisioned_field="snapshotHandle",
        being_created=p.ANN_BEING_CREATED,
        being_deleted=p.ANN_BEING_DELETED,
        bound_finalizer=p.CONTENT_BOUND_FINALIZER,
        deletion_secret=(p.ANN_DELETION_SECRET_NAME, p.ANN_DELETION_SECRET_NAMESPACE),
        create_secret=(p.SECRET_NAME_KEY, p.SECRET_NAMESPACE_KEY, "volumesnapshot", "Snapshotter"),
        sidecar_keys=p.SNAPSHOTTER_KEYS,
        metadata_keys=(p.META_SNAPSHOT_NAME, p.META_SNAPSHOT_NAMESPACE, p.META_CONTENT_NAME),
        class_missing=(
            "failed to get input parameters to create snapshot for content {content}: "
            'volumesnapshotclass "{cls}" not found'
        ),
    )

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
        super().__init__(
            api,
            driver_name,
            informers=informers,
            workers=workers,
            resync_period=resync_period,
            base_delay=base_delay,
            max_delay=max_delay,
            extra_create_metadata=extra_create_metadata,
            # Distributed (per-node) mode: only the contents of this node's volumes.
            label_selector=f"{p.LABEL_MANAGED_BY}={node_name}" if node_name else None,
            events=events,
        )
        self.driver = driver
        self.snapshot_name_prefix = snapshot_name_prefix
        self.snapshot_name_uuid_length = snapshot_name_uuid_length
        self.list_snapshots = list_snapshots

    # -------------------------------------------------------------------- sync

    async def sync_content(self, name: str) -> None:
        content = self.ours(name)
        if content is None:
            return
        if self.should_delete(content):
            await self._delete(content)
            return
        spec, st = p.spec(content), p.status(content)
        if spec.get("source", {}).get("volumeHandle") and not st.get("snapshotHandle"):
            if not self.deleted_before_any_call(content):
                await self._create(content)
            return
        if st.get("readyToUse") is True:
            await self.content_writes.set_annotation(content, p.ANN_BEING_CREATED, None)
            return
        await self._refresh(content)

    @staticmethod
    def _status(info: SnapshotInfo) -> dict[str, Any]:
        return {
            "snapshotHandle": info.snapshot_id,
            "creationTime": info.creation_time_ns or None,
            "readyToUse": info.ready_to_use,
            "restoreSize": info.size_bytes or None,  # 0 means "unknown" in CSI
            "error": None,
        }

    async def _create(self, content: Obj) -> None:
        try:
            params, secrets = await self.create_input(content)
        except (ValueError, ApiError) as e:
            await self.report(content, f"{CHECK_FAILED}: {e}", "SnapshotCreationFailed")
            raise
        volume = str(p.spec(content)["source"]["volumeHandle"])
        name = p.csi_snapshot_name(content, self.snapshot_name_prefix, self.snapshot_name_uuid_length)
        content, info = await self.creating(
            content,
            lambda: self.driver.create_snapshot(volume, name, params, secrets),
            f"Failed to create snapshot: failed to take snapshot of the volume {volume}",
            "SnapshotCreationFailed",
        )
        st = self._status(info)
        if not st["creationTime"]:
            st["creationTime"] = time.time_ns()
        await self.record(content, st)
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
            await self.content_writes.patch(
                content,
                {"status": {"snapshotHandle": handle, "readyToUse": True, "error": None}},
                status=True,
            )
            return
        info = await self._listed(content, handle)
        await self.content_writes.patch(content, {"status": self._status(info)}, status=True)
        if not info.ready_to_use:
            raise Retry(f"snapshot {handle} is not ready yet")

    async def _listed(self, content: Obj, handle: str) -> SnapshotInfo:
        """ListSnapshots of a pre-provisioned handle, with the class's list secret."""
        try:
            cls = self.class_of(content)
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
            found = await self.driver.list_snapshots(snapshot_id=handle, secrets=await self.secrets(list_ref))
        except (CSICallError, ValueError, ApiError) as e:
            await self.report(content, f"{CHECK_FAILED}: {e}", "SnapshotCreationFailed")
            raise
        if not found:
            msg = (
                f"{CHECK_FAILED}: failed to list snapshot for content "
                f"{k.name_of(content)}: snapshot {handle} not found"
            )
            await self.report(content, msg, "SnapshotCreationFailed")
            raise Retry(msg)
        return found[0]

    async def _delete(self, content: Obj) -> None:
        handle = p.status(content).get("snapshotHandle") or p.spec(content).get("source", {}).get(
            "snapshotHandle"
        )
        if p.spec(content).get("deletionPolicy") == p.DELETE and handle:
            try:
                await self.driver.delete_snapshot(str(handle), await self.deletion_secrets(content))
            except (CSICallError, ApiError) as e:
                await self.report(content, f"Failed to delete snapshot: {e}", "SnapshotDeleteError")
                raise
        await self.release(content)


# ---------------------------------------------------------------------- wiring
# The loop's factory, listed in k8s/registry.py; kept by the wiring (the module's owner works above).


async def build(ctx: LoopContext) -> list[Planned]:
    """The snapshotter: elected per driver, or one per node (no election) with --node-deployment."""
    a, info = ctx.args, ctx.info
    if "CREATE_DELETE_SNAPSHOT" not in info.controller_capabilities:
        log.warning("driver %s does not offer CREATE_DELETE_SNAPSHOT: not running the snapshotter", info.name)
        return []
    node = ctx.node_name()
    loop = Snapshotter(
        ctx.clients.api_for("snapshotter"),
        ctx.csi,
        info.name,
        informers=ctx.clients.informers,
        workers=a.k8s_workers,
        resync_period=a.resync_period,
        extra_create_metadata=a.extra_create_metadata,
        node_name=node,
        list_snapshots="LIST_SNAPSHOTS" in info.controller_capabilities,
        snapshot_name_prefix=a.snapshot_name_prefix,
        snapshot_name_uuid_length=a.snapshot_name_uuid_length,
        events=ctx.clients.recorder("csi-kit-snapshot"),
        **ctx.timing,
    )
    # Per-node snapshotters each own their node's contents: no election among them.
    return [Planned(loop, None if node else "external-snapshotter-leader-" + sanitize_lease_name(info.name))]
