"""The group snapshot controller: VolumeGroupSnapshot ↔ VolumeGroupSnapshotContent, and the members.

What upstream's snapshot-controller does for volume group snapshots
(groupsnapshot.storage.k8s.io/v1), beside the single-snapshot controller
(`controller.py`): for a VolumeGroupSnapshot whose `spec.source.selector`
picks PVCs in its namespace, it resolves the class (or the one default class
of the volumes' driver), creates the content `groupsnapcontent-<group UID>`
listing the volume handles, and -- once the group snapshotter
(`group_snapshotter.py`) has cut the group -- creates one
VolumeSnapshotContent / VolumeSnapshot pair per member (names
`snapcontent-<sha256(group UID + volume handle)>` / `snapshot-<same hash>`, as
upstream), then mirrors readiness into the group's status.  A pre-provisioned
group (`source.volumeGroupSnapshotContentName`) is bound to its content the
same way.  On deletion it deletes the members, then (Delete policy) the
member contents and the content, then lets the group go.

All state lives in the API objects: every name is derived from the group's
UID (and the member's volume handle), so a restarted process finds what it
made.

Member objects are handed to the single-snapshot loops as *pre-provisioned*
snapshots (the VolumeSnapshot's source is its content, the content's source
is the member's snapshot handle), with deletionPolicy Retain: the storage
belongs to the group and only DeleteVolumeGroupSnapshot removes it (CSI
drivers, ours included, refuse DeleteSnapshot of a group member).
docs/k8s-groups.md lists this and every other difference from upstream.
"""

from __future__ import annotations

import logging
from typing import Any

from csi_kit.k8s.objects.resources import (
    PV,
    PVC,
    VOLUME_GROUP_SNAPSHOT,
    VOLUME_GROUP_SNAPSHOT_CLASS,
    VOLUME_GROUP_SNAPSHOT_CONTENT,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CONTENT,
)
from csi_kit.k8s.objects.selectors import format_label_selector, label_selector_matches
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.context import LoopContext, Planned
from csi_kit.k8s.runtime.controller import Loop, Retry
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.snapshot import protocol as p
from csi_kit.k8s.snapshot.writes import Writer

log = logging.getLogger(__name__)


class GroupSnapshotError(Exception):
    """A problem worth reporting in the group's status.error (then retried with backoff)."""


class GroupSnapshotController(Loop):
    """VolumeGroupSnapshot ↔ VolumeGroupSnapshotContent binding and the member objects (upstream's
    snapshot-controller part for groups)."""

    name = "group-snapshot-controller"

    def __init__(
        self,
        api: KubeAPI,
        *,
        informers: InformerFactory | None = None,
        workers: int = 10,
        resync_period: float = 900.0,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        distributed: bool = False,
    ) -> None:
        super().__init__(informers=informers, workers=workers, base_delay=base_delay, max_delay=max_delay)
        self.api = api
        # Distributed (per-node) snapshotting: member contents carry their volume's node in
        # LABEL_MANAGED_BY, as single contents do, or no per-node snapshotter ever sees them
        # (their finalizers then outlive the group).
        self.distributed = distributed
        self.groups = self.informer(api, VOLUME_GROUP_SNAPSHOT, resync_period=resync_period)
        self.contents = self.informer(api, VOLUME_GROUP_SNAPSHOT_CONTENT, resync_period=resync_period)
        self.classes = self.informer(api, VOLUME_GROUP_SNAPSHOT_CLASS)
        self.snapshots = self.informer(api, VOLUME_SNAPSHOT)
        self.snapshot_contents = self.informer(api, VOLUME_SNAPSHOT_CONTENT)
        self.pvcs = self.informer(api, PVC)
        self.pvs = self.informer(api, PV)
        self.group_writes = Writer(api, VOLUME_GROUP_SNAPSHOT, self.groups)
        self.content_writes = Writer(api, VOLUME_GROUP_SNAPSHOT_CONTENT, self.contents)
        self.member_writes = Writer(api, VOLUME_SNAPSHOT, self.snapshots)
        self.member_content_writes = Writer(api, VOLUME_SNAPSHOT_CONTENT, self.snapshot_contents)
        self.group_queue = self.queue("group", self.sync_group)
        self.groups.add_handler(self._on_group)
        self.contents.add_handler(self._on_content)
        self.snapshots.add_handler(self._on_member)
        self.snapshot_contents.add_handler(self.member_content_writes.forget)
        self.pvcs.add_handler(self._on_pvc)

    # ------------------------------------------------------------ routing

    def _on_group(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        self.group_queue.add(k.key_of(obj))

    def _on_content(self, event: str, old: Obj | None, new: Obj | None) -> None:
        self.content_writes.forget(event, old, new)
        obj = new or old
        assert obj is not None
        ref = p.spec(obj).get("volumeGroupSnapshotRef") or {}
        if ref.get("name") and ref.get("namespace"):
            self.group_queue.add(f"{ref['namespace']}/{ref['name']}")

    def _on_member(self, event: str, old: Obj | None, new: Obj | None) -> None:
        self.member_writes.forget(event, old, new)
        obj = new or old
        assert obj is not None
        owner = p.group_owner(obj)
        if owner:
            self.group_queue.add(owner)

    def _on_pvc(self, event: str, old: Obj | None, new: Obj | None) -> None:
        """A PVC that appears, is labelled or becomes bound may complete an unbound group's selection."""
        obj = new or old
        assert obj is not None
        ns = k.namespace_of(obj)
        for g in self.groups.items():
            if k.namespace_of(g) == ns and not p.status(g).get("boundVolumeGroupSnapshotContentName"):
                self.group_queue.add(k.key_of(g))

    # ------------------------------------------------------------ helpers

    def _selected_pvcs(self, group: Obj) -> list[Obj]:
        """The claims in the group's namespace its selector picks, sorted by name (a stable volume order)."""
        ns = k.namespace_of(group)
        selector = (p.spec(group).get("source") or {}).get("selector") or {}
        try:
            pvcs = [
                c
                for c in self.pvcs.items()
                if k.namespace_of(c) == ns and label_selector_matches(selector, k.labels_of(c))
            ]
        except ValueError as e:
            raise GroupSnapshotError(str(e)) from None
        if not pvcs:
            raise GroupSnapshotError(
                f"label selector {format_label_selector(selector)} for group snapshot not applied to any PVC"
            )
        return sorted(pvcs, key=k.name_of)

    def _bound_csi_pv(self, group: Obj, pvc: Obj) -> Obj:
        pv_name = p.spec(pvc).get("volumeName")
        if not pv_name or p.status(pvc).get("phase") != "Bound":
            raise GroupSnapshotError(
                f"the PVC {k.name_of(pvc)} is not yet bound to a PV, "
                "will not attempt to take a group snapshot"
            )
        pv = self.pvs.get(str(pv_name))
        if pv is None:
            raise GroupSnapshotError(
                f'failed to retrieve PV {pv_name} from the API server: "{pv_name}" not found'
            )
        if not p.spec(pv).get("csi"):
            raise GroupSnapshotError(
                f"snapshotting non-CSI volumes is not supported, group snapshot:{k.key_of(group)}"
            )
        return pv

    def _volumes(self, group: Obj) -> list[Obj]:
        """The PV of every claim the selector picks, in PVC-name order, all of one CSI driver."""
        pvs = [self._bound_csi_pv(group, pvc) for pvc in self._selected_pvcs(group)]
        drivers = {p.spec(pv)["csi"].get("driver") for pv in pvs}
        if len(drivers) > 1:
            raise GroupSnapshotError(f"the selected volumes belong to several CSI drivers: {sorted(drivers)}")
        return pvs

    def _class_for(self, group: Obj, driver: str) -> Obj:
        name = p.spec(group).get("volumeGroupSnapshotClassName")
        if name:
            cls = self.classes.get(str(name))
            if cls is None:
                raise GroupSnapshotError(
                    "failed to get group snapshot class with error "
                    f'volumegroupsnapshotclass "{name}" not found'
                )
            if cls.get("driver") != driver:
                raise GroupSnapshotError(
                    f"group snapshot class {name} is for driver {cls.get('driver')}, "
                    f"the volumes belong to {driver}"
                )
            return cls
        defaults = [
            c
            for c in self.classes.items()
            if c.get("driver") == driver and p.is_default_class(c, p.ANN_GROUP_IS_DEFAULT_CLASS)
        ]
        if not defaults:
            raise GroupSnapshotError("cannot find default group snapshot class")
        if len(defaults) > 1:
            raise GroupSnapshotError(f"{len(defaults)} default snapshot classes were found")
        return defaults[0]

    def _content_for(self, group: Obj) -> Obj | None:
        name = (
            p.status(group).get("boundVolumeGroupSnapshotContentName")
            or (p.spec(group).get("source") or {}).get("volumeGroupSnapshotContentName")
            or p.group_content_name_for(group)
        )
        content = self.contents.get(str(name))
        if content is None or not p.refers_to(content, "volumeGroupSnapshotRef", group):
            return None
        return content

    def _members(self, group: Obj) -> list[Obj]:
        uid = k.uid_of(group)
        return [
            s
            for s in self.snapshots.items()
            if k.namespace_of(s) == k.namespace_of(group)
            and any(r.get("uid") == uid for r in s.get("metadata", {}).get("ownerReferences") or [])
        ]

    def _member_pv(self, content: Obj, volume: str) -> Obj | None:
        driver = p.spec(content).get("driver")
        for pv in self.pvs.items():
            csi = p.spec(pv).get("csi") or {}
            if csi.get("volumeHandle") == volume and csi.get("driver") == driver:
                return pv
        return None

    # ---------------------------------------------------------------- sync

    async def sync_group(self, key: str) -> None:
        group = self.groups.get(key)
        if group is None:
            return
        if k.is_deleting(group):
            await self._delete_group(group)
            return
        source = p.spec(group).get("source") or {}
        if ("selector" in source) == bool(source.get("volumeGroupSnapshotContentName")):
            await self.group_writes.report(
                group,
                "Exactly one of Selector and VolumeGroupSnapshotContentName should be specified",
                {"readyToUse": False},
            )
            return
        try:
            if source.get("volumeGroupSnapshotContentName"):
                await self._sync_preprovisioned(group, str(source["volumeGroupSnapshotContentName"]))
            else:
                await self._sync_dynamic(group)
        except GroupSnapshotError as e:
            await self.group_writes.report(group, str(e), {"readyToUse": False})
            raise

    async def _sync_dynamic(self, group: Obj) -> None:
        content = self._content_for(group)
        bound = p.status(group).get("boundVolumeGroupSnapshotContentName")
        if content is None and bound:
            # Never cut a second group because the first one's content went.
            raise GroupSnapshotError(f"VolumeGroupSnapshotContent {bound} is missing")
        if content is None:
            if self.contents.get(p.group_content_name_for(group)) is not None:
                raise GroupSnapshotError(
                    f"VolumeGroupSnapshotContent {p.group_content_name_for(group)} "
                    "is bound to a different group"
                )
            await self._create_content(group)
            return
        group = await self._ensure_finalizer(group)
        await self._sync_members(group, content)

    async def _sync_preprovisioned(self, group: Obj, name: str) -> None:
        """Bind a group to an existing content (source.groupSnapshotHandles), then make its members."""
        content = self.contents.get(name)
        if content is None:
            raise GroupSnapshotError(f"VolumeGroupSnapshotContent {name} is missing")
        if not p.refers_to(content, "volumeGroupSnapshotRef", group):
            raise GroupSnapshotError(
                f"VolumeGroupSnapshotContent [{name}] is bound to a different group snapshot"
            )
        if not (p.spec(content).get("source") or {}).get("groupSnapshotHandles"):
            raise GroupSnapshotError(
                "VolumeGroupSnapshotContent is dynamically provisioned while expecting a pre-provisioned one"
            )
        content = await self.content_writes.bind(
            content, "volumeGroupSnapshotRef", group, p.GROUP_CONTENT_BOUND_FINALIZER
        )
        group = await self._ensure_finalizer(group)
        await self._sync_members(group, content)

    async def _ensure_finalizer(self, group: Obj, default_class: str | None = None) -> Obj:
        """The group's bound finalizer and the default class it picked (kept in its spec): one write."""
        spec = {"volumeGroupSnapshotClassName": default_class} if default_class is not None else None
        return await self.group_writes.set_finalizers(group, {p.GROUP_BOUND_FINALIZER}, spec=spec)

    async def _create_content(self, group: Obj) -> None:
        volumes = self._volumes(group)
        driver = str(p.spec(volumes[0])["csi"].get("driver"))
        cls = self._class_for(group, driver)
        content = self._content_body(group, cls, driver, volumes)
        default_class = None if p.spec(group).get("volumeGroupSnapshotClassName") else k.name_of(cls)
        group = await self._ensure_finalizer(group, default_class)
        try:
            created = await self.content_writes.create(content)
        except ApiError as e:
            raise GroupSnapshotError(f"failed to create group snapshot content with error {e}") from None
        await self.group_writes.set_status(
            group, {"boundVolumeGroupSnapshotContentName": k.name_of(created), "readyToUse": False}
        )

    @staticmethod
    def _content_body(group: Obj, cls: Obj, driver: str, volumes: list[Obj]) -> Obj:
        name = p.group_content_name_for(group)
        try:
            ref = p.group_secret_ref(
                cls.get("parameters") or {}, name, k.name_of(group), k.namespace_of(group)
            )
        except ValueError as e:
            raise GroupSnapshotError(f"failed to get group snapshot secret reference: {e}") from None
        # Being-created at birth, so a deletion racing the first CreateVolumeGroupSnapshot waits for it.
        annotations = {p.ANN_GROUP_BEING_CREATED: "yes"}
        if ref is not None:
            annotations[p.ANN_GROUP_DELETION_SECRET_NAME] = ref[0]
            annotations[p.ANN_GROUP_DELETION_SECRET_NAMESPACE] = ref[1]
        return {
            "apiVersion": VOLUME_GROUP_SNAPSHOT_CONTENT.api_version,
            "kind": VOLUME_GROUP_SNAPSHOT_CONTENT.kind,
            "metadata": {
                "name": name,
                "finalizers": [p.GROUP_CONTENT_BOUND_FINALIZER],
                "annotations": annotations,
            },
            "spec": {
                "volumeGroupSnapshotRef": p.object_ref(VOLUME_GROUP_SNAPSHOT, group, with_version=True),
                "deletionPolicy": cls.get("deletionPolicy") or p.DELETE,
                "driver": driver,
                "volumeGroupSnapshotClassName": k.name_of(cls),
                "source": {"volumeHandles": [str(p.spec(pv)["csi"]["volumeHandle"]) for pv in volumes]},
            },
        }

    # ------------------------------------------------------------ members

    async def _sync_members(self, group: Obj, content: Obj) -> None:
        cs = p.status(content)
        handle = cs.get("volumeGroupSnapshotHandle")
        infos = cs.get("volumeSnapshotInfoList") or []
        st: dict[str, Any] = {
            "boundVolumeGroupSnapshotContentName": k.name_of(content),
            "readyToUse": False,
            "error": cs.get("error"),
        }
        if not handle or not infos:
            await self.group_writes.set_status(group, st)
            return  # the snapshotter has not cut the group yet; its status write wakes us
        all_ready = True
        for info in infos:
            member = await self._ensure_member(group, content, str(handle), info)
            all_ready = all_ready and p.is_ready(member)
        if cs.get("creationTime"):
            st["creationTime"] = cs["creationTime"]
        st["readyToUse"] = bool(cs.get("readyToUse")) and all_ready
        await self.group_writes.set_status(group, st)

    async def _ensure_member(self, group: Obj, content: Obj, group_handle: str, info: dict[str, Any]) -> Obj:
        """The member's VolumeSnapshotContent and VolumeSnapshot, created if missing; returns the snapshot."""
        volume = str(info.get("volumeHandle", ""))
        vsc_name = p.member_content_name(k.uid_of(group), volume)
        vsc = self.snapshot_contents.get(vsc_name)
        if vsc is None:
            vsc = await self.member_content_writes.create(self._member_content_body(group, content, info))
        if not p.status(vsc).get("volumeGroupSnapshotHandle"):
            vsc = await self.member_content_writes.patch(
                vsc, {"status": self._member_content_status(group_handle, info)}, status=True
            )
        vs_name = p.member_snapshot_name(k.uid_of(group), volume)
        vs = self.snapshots.get(f"{k.namespace_of(group)}/{vs_name}")
        if vs is None:
            vs = await self.member_writes.create(self._member_body(group, vs_name, vsc_name))
        return await self.member_writes.set_status(vs, {"volumeGroupSnapshotName": k.name_of(group)})

    def _member_content_body(self, group: Obj, content: Obj, info: dict[str, Any]) -> Obj:
        """A member's content: pre-provisioned (its snapshot handle), Retain (the storage is the group's)."""
        volume = str(info.get("volumeHandle", ""))
        uid = k.uid_of(group)
        body: Obj = {
            "metadata": {"name": p.member_content_name(uid, volume)},
            "spec": {
                "volumeSnapshotRef": {
                    "apiVersion": VOLUME_SNAPSHOT.api_version,
                    "kind": VOLUME_SNAPSHOT.kind,
                    "name": p.member_snapshot_name(uid, volume),
                    "namespace": str(k.namespace_of(group)),
                },
                # The storage is the group's: only DeleteVolumeGroupSnapshot removes it.
                "deletionPolicy": p.RETAIN,
                "driver": p.spec(content).get("driver"),
                "source": {"snapshotHandle": str(info.get("snapshotHandle", ""))},
            },
        }
        cann = k.annotations_of(content)
        if cann.get(p.ANN_GROUP_DELETION_SECRET_NAME):
            body["metadata"]["annotations"] = {
                p.ANN_DELETION_SECRET_NAME: cann[p.ANN_GROUP_DELETION_SECRET_NAME],
                p.ANN_DELETION_SECRET_NAMESPACE: cann.get(p.ANN_GROUP_DELETION_SECRET_NAMESPACE, ""),
            }
        pv = self._member_pv(content, volume)
        if pv is not None and p.spec(pv).get("volumeMode"):
            body["spec"]["sourceVolumeMode"] = p.spec(pv)["volumeMode"]
        node = p.managed_by_node(pv) if self.distributed and pv is not None else None
        if node:
            body["metadata"]["labels"] = {p.LABEL_MANAGED_BY: node}
        return body

    @staticmethod
    def _member_content_status(group_handle: str, info: dict[str, Any]) -> dict[str, Any]:
        """What the snapshotter would learn from ListSnapshots, plus the group handle (one write)."""
        mst: dict[str, Any] = {
            "snapshotHandle": str(info.get("snapshotHandle", "")),
            "volumeGroupSnapshotHandle": group_handle,
            "readyToUse": bool(info.get("readyToUse")),
            "error": None,
        }
        if info.get("creationTime") is not None:
            mst["creationTime"] = int(info["creationTime"])
        if info.get("restoreSize") is not None:
            mst["restoreSize"] = int(info["restoreSize"])
        return mst

    @staticmethod
    def _member_body(group: Obj, vs_name: str, vsc_name: str) -> Obj:
        return {
            "metadata": {
                "name": vs_name,
                "namespace": k.namespace_of(group),
                "finalizers": [p.SNAPSHOT_IN_GROUP_FINALIZER],
                "ownerReferences": [
                    {
                        "apiVersion": VOLUME_GROUP_SNAPSHOT.api_version,
                        "kind": VOLUME_GROUP_SNAPSHOT.kind,
                        "name": k.name_of(group),
                        "uid": k.uid_of(group),
                    }
                ],
            },
            "spec": {"source": {"volumeSnapshotContentName": vsc_name}},
        }

    # ------------------------------------------------------------ deletion

    async def _delete_group(self, group: Obj) -> None:
        """Members first, then member contents (Delete), then the content, then the group's finalizer."""
        if p.GROUP_BOUND_FINALIZER not in k.finalizers_of(group):
            return
        await self._delete_members(group)
        content = self._content_for(group)
        if content is not None and (p.spec(content).get("volumeGroupSnapshotRef") or {}).get(
            "uid"
        ) == k.uid_of(group):
            delete = p.spec(content).get("deletionPolicy") == p.DELETE
            if delete:
                await self._delete_member_contents(group, content)
            # The group content: the go-ahead to the snapshotter, then (Delete) the content itself.
            content = await self.content_writes.set_annotation(content, p.ANN_GROUP_BEING_DELETED, "yes")
            if delete:
                await self.content_writes.delete(content)
                return  # the snapshotter deletes the group on the driver; the content's removal wakes us
        await self.group_writes.set_finalizers(group, remove={p.GROUP_BOUND_FINALIZER})

    async def _delete_members(self, group: Obj) -> None:
        """Delete the member snapshots (a restore from one of them holds it, and so the group)."""
        members = self._members(group)
        for vs in members:
            if not k.is_deleting(vs):
                await self.member_writes.delete(vs)
            else:
                await self.member_writes.set_finalizers(vs, remove={p.SNAPSHOT_IN_GROUP_FINALIZER})
        if members:
            raise Retry(
                f"group snapshot {k.key_of(group)}: waiting for {len(members)} member snapshots to go"
            )

    async def _delete_member_contents(self, group: Obj, content: Obj) -> None:
        """Member contents (policy Retain) go with a deleted group, and stay with a retained one."""
        pending = False
        for info in p.status(content).get("volumeSnapshotInfoList") or []:
            name = p.member_content_name(k.uid_of(group), str(info.get("volumeHandle", "")))
            vsc = self.snapshot_contents.get(name)
            if vsc is not None:
                pending = True
                await self.member_content_writes.delete(vsc)
        if pending:
            raise Retry(f"group snapshot {k.key_of(group)}: waiting for member contents to go")


# ---------------------------------------------------------------------- wiring
# The loop's factory, listed in k8s/registry.py; kept by the wiring (the module's owner works above).


async def build(ctx: LoopContext) -> list[Planned]:
    """The group snapshot controller (`--controllers group-snapshot-controller`), under its Lease."""
    a = ctx.args
    loop = GroupSnapshotController(
        ctx.clients.api_for("group-snapshot-controller"),
        informers=ctx.clients.informers,
        workers=a.k8s_workers,
        resync_period=a.resync_period,
        distributed=a.distributed_snapshotting,
        **ctx.timing,
    )
    return [Planned(loop, "snapshot-controller-group-leader")]
