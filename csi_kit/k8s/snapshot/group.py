"""Volume group snapshots (groupsnapshot.storage.k8s.io/v1): the controller and the snapshotter loops.

What upstream's snapshot-controller and csi-snapshotter do for groups, as two
loops beside the single-snapshot ones (`controller.py`, `sidecar.py`):

* `GroupSnapshotController` -- for a VolumeGroupSnapshot whose
  `spec.source.selector` picks PVCs in its namespace, it resolves the class (or
  the one default class of the volumes' driver), creates the content
  `groupsnapcontent-<group UID>` listing the volume handles, and -- once the
  snapshotter has cut the group -- creates one VolumeSnapshotContent /
  VolumeSnapshot pair per member (names `snapcontent-<sha256(group UID +
  volume handle)>` / `snapshot-<same hash>`, as upstream), then mirrors
  readiness into the group's status.  On deletion it deletes the members, then
  the content, then lets the group go.
* `GroupSnapshotter` -- for a group content of its driver it calls
  CreateVolumeGroupSnapshot (name `groupsnapshot-<group UID>`, so a retry after
  any crash is idempotent), records the handles in the content's status, polls
  GetVolumeGroupSnapshot while the group is not ready, and calls
  DeleteVolumeGroupSnapshot when the content is deleted under a Delete policy.

All state lives in the API objects: every name is derived from the group's UID
(and the member's volume handle), so a restarted process finds what it made.

Member objects are handed to the single-snapshot loops as *pre-provisioned*
snapshots (the VolumeSnapshot's source is its content, the content's source is
the member's snapshot handle), with deletionPolicy Retain: the storage belongs
to the group and only DeleteVolumeGroupSnapshot removes it (CSI drivers,
ours included, refuse DeleteSnapshot of a group member).  docs/k8s-groups.md
lists this and every other difference from upstream.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from typing import Any, Protocol

from csi_kit.k8s.objects.resources import (
    PV,
    PVC,
    SECRET,
    VOLUME_GROUP_SNAPSHOT,
    VOLUME_GROUP_SNAPSHOT_CLASS,
    VOLUME_GROUP_SNAPSHOT_CONTENT,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CONTENT,
)
from csi_kit.k8s.objects.selectors import format_label_selector, label_selector_matches
from csi_kit.k8s.objects.times import rfc3339_from_ns
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj, Resource
from csi_kit.k8s.runtime.controller import Loop, Retry
from csi_kit.k8s.runtime.csi import CSICallError, GroupSnapshotInfo, is_final_error
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.snapshot import protocol as p

log = logging.getLogger(__name__)

GROUP = p.GROUP_GROUP
VERSION = "v1"


# The protocol names live with the snapshot ones (upstream's, byte for byte).
GROUP_CONTENT_BOUND_FINALIZER = p.GROUP_CONTENT_BOUND_FINALIZER
GROUP_BOUND_FINALIZER = p.GROUP_BOUND_FINALIZER
SNAPSHOT_IN_GROUP_FINALIZER = p.SNAPSHOT_IN_GROUP_FINALIZER
ANN_GROUP_BEING_CREATED = p.ANN_GROUP_BEING_CREATED
ANN_GROUP_BEING_DELETED = p.ANN_GROUP_BEING_DELETED
ANN_GROUP_DELETION_SECRET_NAME = p.ANN_GROUP_DELETION_SECRET_NAME
ANN_GROUP_DELETION_SECRET_NAMESPACE = p.ANN_GROUP_DELETION_SECRET_NAMESPACE
ANN_GROUP_IS_DEFAULT_CLASS = p.ANN_GROUP_IS_DEFAULT_CLASS
GROUP_SECRET_NAME_KEY = p.GROUP_SECRET_NAME_KEY
GROUP_SECRET_NAMESPACE_KEY = p.GROUP_SECRET_NAMESPACE_KEY
META_GROUP_NAME = p.META_GROUP_NAME
META_GROUP_NAMESPACE = p.META_GROUP_NAMESPACE
META_GROUP_CONTENT_NAME = p.META_GROUP_CONTENT_NAME

GROUP_CAPABILITY = "CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT"


# --------------------------------------------------------------------- names


def group_content_name_for(group: Obj) -> str:
    return "groupsnapcontent-" + k.uid_of(group)


def csi_group_name(content: Obj, prefix: str = "groupsnapshot") -> str:
    """The CreateVolumeGroupSnapshot name, `groupsnapshot-<VolumeGroupSnapshot UID>` as upstream."""
    return f"{prefix}-{(p.spec(content).get('volumeGroupSnapshotRef') or {}).get('uid', '')}"


def _member_hash(group_uid: str, volume_handle: str) -> str:
    return hashlib.sha256((group_uid + volume_handle).encode()).hexdigest()


def member_snapshot_name(group_uid: str, volume_handle: str) -> str:
    return "snapshot-" + _member_hash(group_uid, volume_handle)


def member_content_name(group_uid: str, volume_handle: str) -> str:
    return "snapcontent-" + _member_hash(group_uid, volume_handle)


# ------------------------------------------------------------- label selector


# ------------------------------------------------------------------- secrets


def group_secret_ref(
    params: dict[str, str], content_name: str, group_name: str | None, group_namespace: str | None
) -> tuple[str, str] | None:
    """The class's `group-snapshotter-secret-*` templates resolved to (name, namespace), or None."""
    return p.secret_ref(
        params,
        content_name,
        group_name,
        group_namespace,
        name_key=GROUP_SECRET_NAME_KEY,
        namespace_key=GROUP_SECRET_NAMESPACE_KEY,
        kind="volumegroupsnapshot",
        sidecar="GroupSnapshotter",
    )


def strip_group_params(params: dict[str, str]) -> dict[str, str]:
    """Class parameters for the driver: reserved `csi.storage.k8s.io/` keys go, unknown ones are refused."""
    out: dict[str, str] = {}
    for key, v in params.items():
        if key.startswith(p.PARAM_PREFIX):
            if key not in (GROUP_SECRET_NAME_KEY, GROUP_SECRET_NAMESPACE_KEY):
                raise ValueError(
                    f"found unknown parameter key {key!r} with reserved namespace {p.PARAM_PREFIX}"
                )
            continue
        out[key] = v
    return out


def is_default_group_class(cls: Obj) -> bool:
    return k.annotations_of(cls).get(ANN_GROUP_IS_DEFAULT_CLASS) == "true"


def group_owner(obj: Obj) -> str | None:
    """`namespace/name` of the VolumeGroupSnapshot that owns a member VolumeSnapshot, if any."""
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == VOLUME_GROUP_SNAPSHOT.kind and str(ref.get("apiVersion", "")).startswith(GROUP):
            return f"{k.namespace_of(obj)}/{ref.get('name')}"
    return None


# ---------------------------------------------------------------- CSI calls


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


# --------------------------------------------------------------- controller


class GroupSnapshotError(Exception):
    """A problem worth reporting in the group's status.error (then retried with backoff)."""


async def _set_finalizers(api: KubeAPI, res: Resource, obj: Obj, add: set[str], remove: set[str]) -> Obj:
    """One rv-guarded write for any finalizer change (the list is replaced whole)."""
    current = k.finalizers_of(obj)
    wanted = [f for f in current if f not in remove] + sorted(add - set(current))
    if wanted == current:
        return obj
    patch = {"metadata": {"finalizers": wanted or None, "resourceVersion": k.rv_of(obj)}}
    return await api.patch(res, k.name_of(obj), patch, k.namespace_of(obj))


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
        self.group_queue = self.queue("group", self.sync_group)
        self._deleted: set[str] = set()  # uids this process deleted, until the watch says so
        self.groups.add_handler(self._on_group)
        self.contents.add_handler(self._on_content)
        self.snapshots.add_handler(self._on_member)
        self.snapshot_contents.add_handler(self._forget)
        self.pvcs.add_handler(self._on_pvc)

    # ------------------------------------------------------------ routing

    def _on_group(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        self.group_queue.add(k.key_of(obj))

    def _on_content(self, event: str, old: Obj | None, new: Obj | None) -> None:
        self._forget(event, old, new)
        obj = new or old
        assert obj is not None
        ref = p.spec(obj).get("volumeGroupSnapshotRef") or {}
        if ref.get("name") and ref.get("namespace"):
            self.group_queue.add(f"{ref['namespace']}/{ref['name']}")

    def _forget(self, event: str, old: Obj | None, new: Obj | None) -> None:
        """The watch has seen a deletion this process asked for: stop remembering it."""
        obj = new or old
        if obj is not None and (event == "DELETED" or k.is_deleting(obj)):
            self._deleted.discard(k.uid_of(obj))

    def _on_member(self, event: str, old: Obj | None, new: Obj | None) -> None:
        self._forget(event, old, new)
        obj = new or old
        assert obj is not None
        owner = group_owner(obj)
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

    async def _patch_status(self, group: Obj, st: dict[str, Any]) -> Obj:
        current = p.status(group)
        if all(current.get(f) == v for f, v in st.items()):
            return group
        updated = await self.api.patch(
            VOLUME_GROUP_SNAPSHOT, k.name_of(group), {"status": st}, k.namespace_of(group), status=True
        )
        self.groups.store_update(updated)
        return updated

    async def _report(self, group: Obj, message: str) -> None:
        if (p.status(group).get("error") or {}).get("message") == message:
            return
        try:
            await self._patch_status(group, {"error": p.error_status(message), "readyToUse": False})
        except ApiError as e:
            log.info("cannot report error on group snapshot %s: %s", k.key_of(group), e)

    def _volumes(self, group: Obj) -> list[tuple[Obj, Obj]]:
        """(PVC, PV) of every claim the selector picks, sorted by PVC name (a stable volume order)."""
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
        out: list[tuple[Obj, Obj]] = []
        for pvc in sorted(pvcs, key=k.name_of):
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
            out.append((pvc, pv))
        drivers = {p.spec(pv)["csi"].get("driver") for _, pv in out}
        if len(drivers) > 1:
            raise GroupSnapshotError(f"the selected volumes belong to several CSI drivers: {sorted(drivers)}")
        return out

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
            c for c in self.classes.items() if c.get("driver") == driver and is_default_group_class(c)
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
            or group_content_name_for(group)
        )
        content = self.contents.get(str(name))
        if content is None:
            return None
        ref = p.spec(content).get("volumeGroupSnapshotRef") or {}
        if ref.get("name") != k.name_of(group) or ref.get("namespace") != k.namespace_of(group):
            return None
        if ref.get("uid") and ref["uid"] != k.uid_of(group):
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
            await self._report(
                group, "Exactly one of Selector and VolumeGroupSnapshotContentName should be specified"
            )
            return
        try:
            if source.get("volumeGroupSnapshotContentName"):
                await self._sync_preprovisioned(group, str(source["volumeGroupSnapshotContentName"]))
                return
            content = self._content_for(group)
            bound = p.status(group).get("boundVolumeGroupSnapshotContentName")
            if content is None and bound:
                # Never cut a second group because the first one's content went.
                raise GroupSnapshotError(f"VolumeGroupSnapshotContent {bound} is missing")
            if content is None:
                if self.contents.get(group_content_name_for(group)) is not None:
                    raise GroupSnapshotError(
                        f"VolumeGroupSnapshotContent {group_content_name_for(group)} "
                        "is bound to a different group"
                    )
                await self._create_content(group)
                return
            group = await self._ensure_finalizer(group)
            await self._sync_members(group, content)
        except GroupSnapshotError as e:
            await self._report(group, str(e))
            raise

    async def _sync_preprovisioned(self, group: Obj, name: str) -> None:
        """Bind a group to an existing content (source.groupSnapshotHandles), then make its members."""
        content = self.contents.get(name)
        if content is None:
            raise GroupSnapshotError(f"VolumeGroupSnapshotContent {name} is missing")
        ref = p.spec(content).get("volumeGroupSnapshotRef") or {}
        if (
            ref.get("name") != k.name_of(group)
            or ref.get("namespace") != k.namespace_of(group)
            or (ref.get("uid") and ref["uid"] != k.uid_of(group))
        ):
            raise GroupSnapshotError(
                f"VolumeGroupSnapshotContent [{name}] is bound to a different group snapshot"
            )
        if not (p.spec(content).get("source") or {}).get("groupSnapshotHandles"):
            raise GroupSnapshotError(
                "VolumeGroupSnapshotContent is dynamically provisioned while expecting a pre-provisioned one"
            )
        if not ref.get("uid") or (
            GROUP_CONTENT_BOUND_FINALIZER not in k.finalizers_of(content) and not k.is_deleting(content)
        ):
            # Bind and protect in one write: the uid completes the two-way binding.
            patch: Obj = {"spec": {"volumeGroupSnapshotRef": {"uid": k.uid_of(group)}}}
            if GROUP_CONTENT_BOUND_FINALIZER not in k.finalizers_of(content) and not k.is_deleting(content):
                patch["metadata"] = {
                    "finalizers": [*k.finalizers_of(content), GROUP_CONTENT_BOUND_FINALIZER],
                    "resourceVersion": k.rv_of(content),
                }
            content = await self.api.patch(VOLUME_GROUP_SNAPSHOT_CONTENT, name, patch)
            self.contents.store_update(content)
        group = await self._ensure_finalizer(group)
        await self._sync_members(group, content)

    async def _ensure_finalizer(self, group: Obj, default_class: str | None = None) -> Obj:
        if GROUP_BOUND_FINALIZER in k.finalizers_of(group) and default_class is None:
            return group
        patch: Obj = {
            "metadata": {
                "finalizers": [*k.finalizers_of(group), GROUP_BOUND_FINALIZER]
                if GROUP_BOUND_FINALIZER not in k.finalizers_of(group)
                else k.finalizers_of(group),
                "resourceVersion": k.rv_of(group),
            }
        }
        if default_class is not None:
            patch["spec"] = {"volumeGroupSnapshotClassName": default_class}
        updated = await self.api.patch(VOLUME_GROUP_SNAPSHOT, k.name_of(group), patch, k.namespace_of(group))
        self.groups.store_update(updated)
        return updated

    async def _create_content(self, group: Obj) -> None:
        volumes = self._volumes(group)
        driver = str(p.spec(volumes[0][1])["csi"].get("driver"))
        cls = self._class_for(group, driver)
        name = group_content_name_for(group)
        try:
            ref = group_secret_ref(cls.get("parameters") or {}, name, k.name_of(group), k.namespace_of(group))
        except ValueError as e:
            raise GroupSnapshotError(f"failed to get group snapshot secret reference: {e}") from None
        default_class = None if p.spec(group).get("volumeGroupSnapshotClassName") else k.name_of(cls)
        group = await self._ensure_finalizer(group, default_class)
        annotations = {ANN_GROUP_BEING_CREATED: "yes"}
        if ref is not None:
            annotations[ANN_GROUP_DELETION_SECRET_NAME] = ref[0]
            annotations[ANN_GROUP_DELETION_SECRET_NAMESPACE] = ref[1]
        content: Obj = {
            "apiVersion": VOLUME_GROUP_SNAPSHOT_CONTENT.api_version,
            "kind": VOLUME_GROUP_SNAPSHOT_CONTENT.kind,
            "metadata": {
                "name": name,
                "finalizers": [GROUP_CONTENT_BOUND_FINALIZER],
                # At birth, so a deletion racing the first CreateVolumeGroupSnapshot waits for it.
                "annotations": annotations,
            },
            "spec": {
                "volumeGroupSnapshotRef": {
                    "apiVersion": VOLUME_GROUP_SNAPSHOT.api_version,
                    "kind": VOLUME_GROUP_SNAPSHOT.kind,
                    "name": k.name_of(group),
                    "namespace": k.namespace_of(group),
                    "uid": k.uid_of(group),
                    "resourceVersion": k.rv_of(group),
                },
                "deletionPolicy": cls.get("deletionPolicy") or p.DELETE,
                "driver": driver,
                "volumeGroupSnapshotClassName": k.name_of(cls),
                "source": {"volumeHandles": [str(p.spec(pv)["csi"]["volumeHandle"]) for _, pv in volumes]},
            },
        }
        try:
            created = await self.api.create(VOLUME_GROUP_SNAPSHOT_CONTENT, content)
        except ApiError as e:
            if not k.is_already_exists(e):
                raise GroupSnapshotError(f"failed to create group snapshot content with error {e}") from None
            created = await self.api.get(VOLUME_GROUP_SNAPSHOT_CONTENT, name)
        self.contents.store_update(created)
        await self._patch_status(group, {"boundVolumeGroupSnapshotContentName": name, "readyToUse": False})

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
            await self._patch_status(group, st)
            return  # the snapshotter has not cut the group yet; its status write wakes us
        all_ready = True
        for info in infos:
            member = await self._ensure_member(group, content, str(handle), info)
            all_ready = all_ready and p.is_ready(member)
        if cs.get("creationTime"):
            st["creationTime"] = cs["creationTime"]
        st["readyToUse"] = bool(cs.get("readyToUse")) and all_ready
        await self._patch_status(group, st)

    async def _ensure_member(self, group: Obj, content: Obj, group_handle: str, info: dict[str, Any]) -> Obj:
        """The member's VolumeSnapshotContent and VolumeSnapshot, created if missing; returns the snapshot."""
        uid, ns = k.uid_of(group), str(k.namespace_of(group))
        volume = str(info.get("volumeHandle", ""))
        vsc_name, vs_name = member_content_name(uid, volume), member_snapshot_name(uid, volume)
        vsc = self.snapshot_contents.get(vsc_name)
        if vsc is None:
            ann: dict[str, str] = {}
            cann = k.annotations_of(content)
            if cann.get(ANN_GROUP_DELETION_SECRET_NAME):
                ann[p.ANN_DELETION_SECRET_NAME] = cann[ANN_GROUP_DELETION_SECRET_NAME]
                ann[p.ANN_DELETION_SECRET_NAMESPACE] = cann.get(ANN_GROUP_DELETION_SECRET_NAMESPACE, "")
            body: Obj = {
                "metadata": {"name": vsc_name},
                "spec": {
                    "volumeSnapshotRef": {
                        "apiVersion": VOLUME_SNAPSHOT.api_version,
                        "kind": VOLUME_SNAPSHOT.kind,
                        "name": vs_name,
                        "namespace": ns,
                    },
                    # The storage is the group's: only DeleteVolumeGroupSnapshot removes it.
                    "deletionPolicy": p.RETAIN,
                    "driver": p.spec(content).get("driver"),
                    "source": {"snapshotHandle": str(info.get("snapshotHandle", ""))},
                },
            }
            if ann:
                body["metadata"]["annotations"] = ann
            pv = next(
                (
                    v
                    for v in self.pvs.items()
                    if (p.spec(v).get("csi") or {}).get("volumeHandle") == volume
                    and (p.spec(v).get("csi") or {}).get("driver") == p.spec(content).get("driver")
                ),
                None,
            )
            if pv is not None and p.spec(pv).get("volumeMode"):
                body["spec"]["sourceVolumeMode"] = p.spec(pv)["volumeMode"]
            node = p.managed_by_node(pv) if self.distributed and pv is not None else None
            if node:
                body["metadata"]["labels"] = {p.LABEL_MANAGED_BY: node}
            try:
                vsc = await self.api.create(VOLUME_SNAPSHOT_CONTENT, body)
            except ApiError as e:
                if not k.is_already_exists(e):
                    raise
                vsc = await self.api.get(VOLUME_SNAPSHOT_CONTENT, vsc_name)
            self.snapshot_contents.store_update(vsc)
        if not p.status(vsc).get("volumeGroupSnapshotHandle"):
            # What the snapshotter would learn from ListSnapshots, plus the group handle (one write).
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
            vsc = await self.api.patch(VOLUME_SNAPSHOT_CONTENT, vsc_name, {"status": mst}, status=True)
            self.snapshot_contents.store_update(vsc)
        vs = self.snapshots.get(f"{ns}/{vs_name}")
        if vs is None:
            body = {
                "metadata": {
                    "name": vs_name,
                    "namespace": ns,
                    "finalizers": [SNAPSHOT_IN_GROUP_FINALIZER],
                    "ownerReferences": [
                        {
                            "apiVersion": VOLUME_GROUP_SNAPSHOT.api_version,
                            "kind": VOLUME_GROUP_SNAPSHOT.kind,
                            "name": k.name_of(group),
                            "uid": uid,
                        }
                    ],
                },
                "spec": {"source": {"volumeSnapshotContentName": vsc_name}},
            }
            try:
                vs = await self.api.create(VOLUME_SNAPSHOT, body)
            except ApiError as e:
                if not k.is_already_exists(e):
                    raise
                vs = await self.api.get(VOLUME_SNAPSHOT, vs_name, ns)
            self.snapshots.store_update(vs)
        if p.status(vs).get("volumeGroupSnapshotName") != k.name_of(group):
            vs = await self.api.patch(
                VOLUME_SNAPSHOT,
                vs_name,
                {"status": {"volumeGroupSnapshotName": k.name_of(group)}},
                ns,
                status=True,
            )
            self.snapshots.store_update(vs)
        return vs

    # ------------------------------------------------------------ deletion

    async def _delete_group(self, group: Obj) -> None:
        if GROUP_BOUND_FINALIZER not in k.finalizers_of(group):
            return
        # 1. The members go first (a restore from one of them holds it, and so the group).
        members = self._members(group)
        for vs in members:
            if not k.is_deleting(vs):
                if k.uid_of(vs) not in self._deleted:
                    try:
                        await self.api.delete(VOLUME_SNAPSHOT, k.name_of(vs), k.namespace_of(vs))
                    except ApiError as e:
                        if not k.is_not_found(e):
                            raise
                    self._deleted.add(k.uid_of(vs))
            elif SNAPSHOT_IN_GROUP_FINALIZER in k.finalizers_of(vs):
                updated = await _set_finalizers(
                    self.api, VOLUME_SNAPSHOT, vs, set(), {SNAPSHOT_IN_GROUP_FINALIZER}
                )
                self.snapshots.store_update(updated)
        if members:
            raise Retry(
                f"group snapshot {k.key_of(group)}: waiting for {len(members)} member snapshots to go"
            )
        content = self._content_for(group)
        if content is not None and p.spec(content).get("volumeGroupSnapshotRef", {}).get("uid") == k.uid_of(
            group
        ):
            delete = p.spec(content).get("deletionPolicy") == p.DELETE
            # 2. Member contents (policy Retain) go with a deleted group, and stay with a retained one.
            if delete:
                pending = False
                for info in p.status(content).get("volumeSnapshotInfoList") or []:
                    vsc = self.snapshot_contents.get(
                        member_content_name(k.uid_of(group), str(info.get("volumeHandle", "")))
                    )
                    if vsc is None:
                        continue
                    pending = True
                    if not k.is_deleting(vsc) and k.uid_of(vsc) not in self._deleted:
                        try:
                            await self.api.delete(VOLUME_SNAPSHOT_CONTENT, k.name_of(vsc))
                        except ApiError as e:
                            if not k.is_not_found(e):
                                raise
                        self._deleted.add(k.uid_of(vsc))
                if pending:
                    raise Retry(f"group snapshot {k.key_of(group)}: waiting for member contents to go")
            # 3. The group content: the go-ahead to the snapshotter, then (Delete) the content itself.
            if ANN_GROUP_BEING_DELETED not in k.annotations_of(content):
                content = await self.api.patch(
                    VOLUME_GROUP_SNAPSHOT_CONTENT,
                    k.name_of(content),
                    {"metadata": {"annotations": {ANN_GROUP_BEING_DELETED: "yes"}}},
                )
                self.contents.store_update(content)
            if delete:
                if not k.is_deleting(content) and k.uid_of(content) not in self._deleted:
                    try:
                        await self.api.delete(VOLUME_GROUP_SNAPSHOT_CONTENT, k.name_of(content))
                    except ApiError as e:
                        if not k.is_not_found(e):
                            raise
                    self._deleted.add(k.uid_of(content))
                return  # the snapshotter deletes the group on the driver; the content's removal wakes us
        updated = await _set_finalizers(
            self.api, VOLUME_GROUP_SNAPSHOT, group, set(), {GROUP_BOUND_FINALIZER}
        )
        self.groups.store_update(updated)


# ---------------------------------------------------------------- snapshotter


class GroupSnapshotter(Loop):
    """VolumeGroupSnapshotContent ↔ the driver's GroupController (upstream's csi-snapshotter part for groups).

    `supported=False` (the driver does not offer CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT)
    makes every content of this driver report that in status.error instead of calling it.
    """

    name = "group-snapshotter"

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
        super().__init__(informers=informers, workers=workers, base_delay=base_delay, max_delay=max_delay)
        self.api = api
        self.driver = driver
        self.driver_name = driver_name
        self.supported = supported
        self.extra_create_metadata = extra_create_metadata
        self.group_name_prefix = group_name_prefix
        self.contents = self.informer(api, VOLUME_GROUP_SNAPSHOT_CONTENT, resync_period=resync_period)
        self.classes = self.informer(api, VOLUME_GROUP_SNAPSHOT_CLASS)
        self.content_queue = self.queue("content", self.sync_content)
        self.contents.add_handler(self._on_content)

    def _on_content(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        if event != "DELETED" and p.spec(obj).get("driver") == self.driver_name:
            self.content_queue.add(k.name_of(obj))

    async def _patch(self, content: Obj, patch: Obj, *, status: bool = False) -> Obj:
        updated = await self.api.patch(
            VOLUME_GROUP_SNAPSHOT_CONTENT, k.name_of(content), patch, status=status
        )
        self.contents.store_update(updated)
        return updated

    async def _set_annotation(self, content: Obj, key: str, value: str | None) -> Obj:
        have = k.annotations_of(content)
        if (value is None and key not in have) or (value is not None and have.get(key) == value):
            return content
        return await self._patch(content, {"metadata": {"annotations": {key: value}}})

    async def _report(self, content: Obj, message: str) -> None:
        if (p.status(content).get("error") or {}).get("message") == message:
            return
        try:
            await self._patch(
                content, {"status": {"error": p.error_status(message), "readyToUse": False}}, status=True
            )
        except ApiError as e:
            log.info("cannot report error on group content %s: %s", k.name_of(content), e)

    async def _secrets(self, ref: tuple[str, str] | None) -> dict[str, str]:
        if ref is None:
            return {}
        secret = await self.api.get(SECRET, ref[0], ref[1])
        return {key: base64.b64decode(v).decode() for key, v in (secret.get("data") or {}).items()}

    @staticmethod
    def _deletion_secret(content: Obj) -> tuple[str, str] | None:
        ann = k.annotations_of(content)
        if ann.get(ANN_GROUP_DELETION_SECRET_NAME) and ann.get(ANN_GROUP_DELETION_SECRET_NAMESPACE):
            return ann[ANN_GROUP_DELETION_SECRET_NAME], ann[ANN_GROUP_DELETION_SECRET_NAMESPACE]
        return None

    @staticmethod
    def _should_delete(content: Obj) -> bool:
        if not k.is_deleting(content):
            return False
        spec = p.spec(content)
        if (spec.get("source") or {}).get("groupSnapshotHandles") and not (
            spec.get("volumeGroupSnapshotRef") or {}
        ).get("uid"):
            return True  # a pre-provisioned content nobody ever bound
        ann = k.annotations_of(content)
        if ANN_GROUP_BEING_CREATED in ann:
            return False  # the driver may be cutting it right now: finish first, then delete
        return ANN_GROUP_BEING_DELETED in ann

    @staticmethod
    def _snapshot_ids(content: Obj) -> list[str]:
        ids = [str(i.get("snapshotHandle")) for i in p.status(content).get("volumeSnapshotInfoList") or []]
        pre = (p.spec(content).get("source") or {}).get("groupSnapshotHandles") or {}
        return ids or [str(i) for i in pre.get("volumeSnapshotHandles") or []]

    @staticmethod
    def _handle(content: Obj) -> str:
        pre = (p.spec(content).get("source") or {}).get("groupSnapshotHandles") or {}
        return str(
            p.status(content).get("volumeGroupSnapshotHandle") or pre.get("volumeGroupSnapshotHandle") or ""
        )

    def _status(self, info: GroupSnapshotInfo) -> dict[str, Any]:
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

    async def sync_content(self, name: str) -> None:
        content = self.contents.get(name)
        if content is None or p.spec(content).get("driver") != self.driver_name:
            return
        if self._should_delete(content):
            await self._delete(content)
            return
        st = p.status(content)
        if not st.get("volumeGroupSnapshotHandle"):
            if (p.spec(content).get("source") or {}).get("groupSnapshotHandles"):
                await self._refresh(content)  # pre-provisioned: ask the driver what the handles are
                return
            if k.is_deleting(content) and ANN_GROUP_BEING_CREATED not in k.annotations_of(content):
                return
            await self._create(content)
            return
        if st.get("readyToUse") is True:
            await self._set_annotation(content, ANN_GROUP_BEING_CREATED, None)
            return
        await self._refresh(content)

    async def _create_input(self, content: Obj) -> tuple[dict[str, str], dict[str, str]]:
        cname = p.spec(content).get("volumeGroupSnapshotClassName")
        cls = self.classes.get(str(cname)) if cname else None
        if cls is None:
            raise ValueError(f'volumegroupsnapshotclass "{cname}" not found')
        params_in: dict[str, str] = dict(cls.get("parameters") or {})
        ref = p.spec(content).get("volumeGroupSnapshotRef") or {}
        secret = group_secret_ref(params_in, k.name_of(content), ref.get("name"), ref.get("namespace"))
        params = strip_group_params(params_in)
        if self.extra_create_metadata:
            params[META_GROUP_NAME] = str(ref.get("name"))
            params[META_GROUP_NAMESPACE] = str(ref.get("namespace"))
            params[META_GROUP_CONTENT_NAME] = k.name_of(content)
        return params, await self._secrets(secret)

    async def _create(self, content: Obj) -> None:
        if not self.supported:
            content = await self._set_annotation(content, ANN_GROUP_BEING_CREATED, None)
            msg = (
                f"Failed to create group snapshot: CSI driver {self.driver_name} does not support "
                f"volume group snapshots (no GroupController {GROUP_CAPABILITY} capability)"
            )
            await self._report(content, msg)
            raise Retry(msg)
        try:
            params, secrets = await self._create_input(content)
        except (ValueError, ApiError) as e:
            await self._report(content, f"Failed to check and update group snapshot content: {e}")
            raise
        content = await self._set_annotation(content, ANN_GROUP_BEING_CREATED, "yes")
        volumes = [str(v) for v in p.spec(content)["source"]["volumeHandles"]]
        try:
            info = await self.driver.create_group_snapshot(
                csi_group_name(content, self.group_name_prefix), volumes, params, secrets
            )
        except CSICallError as e:
            if is_final_error(e):
                content = await self._set_annotation(content, ANN_GROUP_BEING_CREATED, None)
            await self._report(
                content, f"Failed to create group snapshot: failed to take group snapshot: {e}"
            )
            raise
        content = await self._patch(content, {"status": self._status(info)}, status=True)
        await self._set_annotation(content, ANN_GROUP_BEING_CREATED, None)
        if not info.ready_to_use:
            raise Retry(f"group snapshot {info.group_snapshot_id} is not ready yet")

    async def _refresh(self, content: Obj) -> None:
        handle = self._handle(content)
        if not self.supported:
            msg = (
                f"Failed to check and update group snapshot content: CSI driver {self.driver_name} "
                "does not support volume group snapshots"
            )
            await self._report(content, msg)
            raise Retry(msg)
        try:
            secrets = await self._secrets(self._deletion_secret(content))
            info = await self.driver.get_group_snapshot(handle, self._snapshot_ids(content), secrets)
        except (CSICallError, ApiError) as e:
            await self._report(content, f"Failed to check and update group snapshot content: {e}")
            raise
        await self._patch(content, {"status": self._status(info)}, status=True)
        if not info.ready_to_use:
            raise Retry(f"group snapshot {handle} is not ready yet")

    async def _delete(self, content: Obj) -> None:
        handle = self._handle(content)
        if p.spec(content).get("deletionPolicy") == p.DELETE and handle and self.supported:
            try:
                secrets = await self._secrets(self._deletion_secret(content))
                await self.driver.delete_group_snapshot(str(handle), self._snapshot_ids(content), secrets)
            except (CSICallError, ApiError) as e:
                await self._report(content, f"Failed to delete group snapshot: {e}")
                raise
        if GROUP_CONTENT_BOUND_FINALIZER in k.finalizers_of(content):
            try:
                updated = await _set_finalizers(
                    self.api, VOLUME_GROUP_SNAPSHOT_CONTENT, content, set(), {GROUP_CONTENT_BOUND_FINALIZER}
                )
                self.contents.store_update(updated)
            except ApiError as e:
                if not k.is_not_found(e):
                    raise
