"""The group snapshotter: VolumeGroupSnapshotContent ↔ the driver's GroupController (CSI calls).

What upstream's csi-snapshotter does for volume group snapshots, beside the
single-snapshot snapshotter (`snapshotter.py`, whose rules it shares through
`content_loop.ContentLoop`): for a group content of its driver it calls
CreateVolumeGroupSnapshot (name `groupsnapshot-<group UID>`, so a retry after
any crash is idempotent), records the handles in the content's status, polls
GetVolumeGroupSnapshot while the group is not ready (and to learn the handles
of a pre-provisioned group), and calls DeleteVolumeGroupSnapshot when the
content is deleted under a Delete policy.  The member objects are the group
controller's (`group_controller.py`).

`supported=False` (the driver does not offer the GroupController's
CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT) makes every content of this driver
report that in status.error instead of calling it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from csi_kit.k8s.objects.names import sanitize_lease_name
from csi_kit.k8s.objects.resources import VOLUME_GROUP_SNAPSHOT_CLASS, VOLUME_GROUP_SNAPSHOT_CONTENT
from csi_kit.k8s.objects.times import rfc3339_from_ns
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.context import LoopContext, Planned
from csi_kit.k8s.runtime.controller import Retry
from csi_kit.k8s.runtime.csi import CSICallError, GroupSnapshotInfo
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.snapshot import protocol as p
from csi_kit.k8s.snapshot.content_loop import ContentKind, ContentLoop

log = logging.getLogger(__name__)

#: The GroupController capability this loop needs of the driver (else `supported=False`).
GROUP_CAPABILITY = p.GROUP_CAPABILITY

CHECK_FAILED = "Failed to check and update group snapshot content"
FAILED = "SnapshotCreationFailed"  # the Event reason (the group loops send none today)


class GroupSnapshotDriver(Protocol):
    """The GroupController calls the group snapshotter makes (`runtime.csi.CSIClient` implements it)."""

    async def create_group_snapshot(
        self, name: str, volume_ids: list[str], parameters: dict[str, str], secrets: dict[str, str]
    ) -> GroupSnapshotInfo: ...

    async def delete_group_snapshot(
        self, group_id: str, snapshot_ids: list[str], secrets: dict[str, str]
    ) -> None: ...

    async def get_group_snapshot(
        self, group_id: str, snapshot_ids: list[str], secrets: dict[str, str]
    ) -> GroupSnapshotInfo: ...


def snapshot_ids(content: Obj) -> list[str]:
    """The members' snapshot handles: from the status, else (pre-provisioned) from the spec."""
    ids = [str(i.get("snapshotHandle")) for i in p.status(content).get("volumeSnapshotInfoList") or []]
    pre = (p.spec(content).get("source") or {}).get("groupSnapshotHandles") or {}
    return ids or [str(i) for i in pre.get("volumeSnapshotHandles") or []]


def group_handle(content: Obj) -> str:
    """The group's handle: from the status, else (pre-provisioned) from the spec."""
    pre = (p.spec(content).get("source") or {}).get("groupSnapshotHandles") or {}
    return str(
        p.status(content).get("volumeGroupSnapshotHandle") or pre.get("volumeGroupSnapshotHandle") or ""
    )


def content_status(info: GroupSnapshotInfo) -> dict[str, Any]:
    """The content's status from the driver's answer (a member without a time takes the group's)."""
    created = info.creation_time_ns or time.time_ns()
    return {
        "volumeGroupSnapshotHandle": info.group_snapshot_id,
        "creationTime": rfc3339_from_ns(created),
        "readyToUse": info.ready_to_use,
        "volumeSnapshotInfoList": [
            {
                "volumeHandle": s.source_volume_id,
                "snapshotHandle": s.snapshot_id,
                "creationTime": s.creation_time_ns or created,
                "readyToUse": s.ready_to_use,
                **({"restoreSize": s.size_bytes} if s.size_bytes else {}),
            }
            for s in info.snapshots
        ],
        "error": None,
    }


class GroupSnapshotter(ContentLoop):
    """VolumeGroupSnapshotContent ↔ the driver's GroupController (csi-snapshotter's part for groups)."""

    name = "group-snapshotter"
    kind = ContentKind(
        res=VOLUME_GROUP_SNAPSHOT_CONTENT,
        class_res=VOLUME_GROUP_SNAPSHOT_CLASS,
        class_field="volumeGroupSnapshotClassName",
        ref_field="volumeGroupSnapshotRef",
        preprovisioned_field="groupSnapshotHandles",
        being_created=p.ANN_GROUP_BEING_CREATED,
        being_deleted=p.ANN_GROUP_BEING_DELETED,
        bound_finalizer=p.GROUP_CONTENT_BOUND_FINALIZER,
        deletion_secret=(p.ANN_GROUP_DELETION_SECRET_NAME, p.ANN_GROUP_DELETION_SECRET_NAMESPACE),
        create_secret=(
            p.GROUP_SECRET_NAME_KEY,
            p.GROUP_SECRET_NAMESPACE_KEY,
            "volumegroupsnapshot",
            "GroupSnapshotter",
        ),
        sidecar_keys=p.GROUP_SNAPSHOTTER_KEYS,
        metadata_keys=(p.META_GROUP_NAME, p.META_GROUP_NAMESPACE, p.META_GROUP_CONTENT_NAME),
        class_missing='volumegroupsnapshotclass "{cls}" not found',
        error_extra=(("readyToUse", False),),
    )

    def __init__(
        self,
        api: KubeAPI,
        driver: GroupSnapshotDriver,
        driver_name: str,
        *,
        informers: InformerFactory | None = None,
        supported: bool = True,
        workers: int = 10,
        resync_period: float = 900.0,
        extra_create_metadata: bool = False,
        group_name_prefix: str = "groupsnapshot",
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
        )
        self.driver = driver
        self.supported = supported
        self.group_name_prefix = group_name_prefix

    async def sync_content(self, name: str) -> None:
        content = self.ours(name)
        if content is None:
            return
        if self.should_delete(content):
            await self._delete(content)
            return
        st = p.status(content)
        if not st.get("volumeGroupSnapshotHandle"):
            if self.preprovisioned(content):
                await self._refresh(content)  # pre-provisioned: ask the driver what the handles are
            elif not self.deleted_before_any_call(content):
                await self._create(content)
            return
        if st.get("readyToUse") is True:
            await self.content_writes.set_annotation(content, p.ANN_GROUP_BEING_CREATED, None)
            return
        await self._refresh(content)

    async def _create(self, content: Obj) -> None:
        if not self.supported:
            content = await self.content_writes.set_annotation(content, p.ANN_GROUP_BEING_CREATED, None)
            msg = (
                f"Failed to create group snapshot: CSI driver {self.driver_name} does not support "
                f"volume group snapshots (no GroupController {GROUP_CAPABILITY} capability)"
            )
            await self.report(content, msg, FAILED)
            raise Retry(msg)
        try:
            params, secrets = await self.create_input(content)
        except (ValueError, ApiError) as e:
            await self.report(content, f"{CHECK_FAILED}: {e}", FAILED)
            raise
        volumes = [str(v) for v in p.spec(content)["source"]["volumeHandles"]]
        name = p.csi_group_name(content, self.group_name_prefix)
        content, info = await self.creating(
            content,
            lambda: self.driver.create_group_snapshot(name, volumes, params, secrets),
            "Failed to create group snapshot: failed to take group snapshot",
            FAILED,
        )
        await self.record(content, content_status(info))
        if not info.ready_to_use:
            raise Retry(f"group snapshot {info.group_snapshot_id} is not ready yet")

    async def _refresh(self, content: Obj) -> None:
        handle = group_handle(content)
        if not self.supported:
            msg = f"{CHECK_FAILED}: CSI driver {self.driver_name} does not support volume group snapshots"
            await self.report(content, msg, FAILED)
            raise Retry(msg)
        try:
            secrets = await self.deletion_secrets(content)
            info = await self.driver.get_group_snapshot(handle, snapshot_ids(content), secrets)
        except (CSICallError, ApiError) as e:
            await self.report(content, f"{CHECK_FAILED}: {e}", FAILED)
            raise
        await self.content_writes.patch(content, {"status": content_status(info)}, status=True)
        if not info.ready_to_use:
            raise Retry(f"group snapshot {handle} is not ready yet")

    async def _delete(self, content: Obj) -> None:
        handle = group_handle(content)
        if p.spec(content).get("deletionPolicy") == p.DELETE and handle and self.supported:
            try:
                secrets = await self.deletion_secrets(content)
                await self.driver.delete_group_snapshot(handle, snapshot_ids(content), secrets)
            except (CSICallError, ApiError) as e:
                await self.report(content, f"Failed to delete group snapshot: {e}", "SnapshotDeleteError")
                raise
        await self.release(content)


# ---------------------------------------------------------------------- wiring
# The loop's factory, listed in k8s/registry.py; kept by the wiring (the module's owner works above).


async def build(ctx: LoopContext) -> list[Planned]:
    """The group snapshotter, elected per driver; it runs even without the driver's group capability
    (its contents then say why nothing happens)."""
    a, info = ctx.args, ctx.info
    loop = GroupSnapshotter(
        ctx.clients.api_for("group-snapshotter"),
        ctx.csi,
        info.name,
        informers=ctx.clients.informers,
        supported=GROUP_CAPABILITY in info.group_capabilities,
        workers=a.k8s_workers,
        resync_period=a.resync_period,
        extra_create_metadata=a.extra_create_metadata,
        **ctx.timing,
    )
    return [Planned(loop, "external-snapshotter-group-leader-" + sanitize_lease_name(info.name))]
