"""The provisioner's data sources: restore from a VolumeSnapshot, clone from a claim.

What external-provisioner does with a claim's `dataSourceRef` (or
`dataSource`), on the same objects and finalizers:

* A VolumeSnapshot source must be ready, bound to a content of this driver
  that points back at it, with a snapshot handle, and no larger than the
  claim; a claim source must be Bound in the same class and volume mode,
  on a PV of this driver, and no larger than the claim.  Anything else is a
  `ProvisioningError` that names what is missing.
* Before CreateVolume the source gets its protection finalizer
  (`provisioner.storage.kubernetes.io/volumesnapshot-as-source-protection`
  on a snapshot, `.../cloning-protection` on a claim), so it cannot go
  while a volume is being made from it.  The finalizer goes when no claim
  is still being provisioned from the source: after the new PV exists,
  after CreateVolume has a final answer for a claim that went away, or when
  such a claim is deleted -- the "source" queue (`kind|namespace|name`)
  collects those moments.
* A source in another namespace needs `cross_namespace=True` (upstream's
  CrossNamespaceVolumeDataSource feature gate) and a ReferenceGrant in the
  source's namespace that lets claims of the claim's namespace use it.

Snapshots are not watched: they are read when a claim needs them, and a
snapshot known to carry no finalizer of ours is not read again to release it.
"""

from __future__ import annotations

from typing import Any, Protocol

from csi_kit.k8s.objects.meta import set_finalizers_patch, spec_of, status_of
from csi_kit.k8s.objects.quantity import parse_quantity, storage_of
from csi_kit.k8s.objects.resources import (
    PVC,
    REFERENCE_GRANT,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CONTENT,
    Resource,
)
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.informer import Informer
from csi_kit.k8s.runtime.workqueue import WorkQueue
from csi_kit.k8s.volume.protocol import (
    CLONE_SOURCE_FINALIZER,
    SNAPSHOT_SOURCE_FINALIZER,
    ProvisioningError,
    claims_driver,
    csi_of,
    pvc_data_source,
    source_kind,
    source_ref,
    volume_name_of,
)

SourceRef = tuple[str, str, str]  # (kind, namespace, name)


class SourceLoop(Protocol):
    """What the data sources borrow from the provisioner they serve."""

    api: KubeAPI
    pvcs: Informer
    pvs: Informer
    driver_name: str
    cross_namespace: bool

    def queue(self, name: str, sync: Any) -> WorkQueue: ...

    def pv_name(self, pvc: Obj) -> str: ...

    def creating(self, key: str) -> bool: ...

    def creating_from(self, ref: SourceRef, *, besides: str | None = None) -> bool: ...

    async def patch(self, res: Resource, obj: Obj, patch: Obj) -> Obj: ...


def _from_matches(entry: Obj, pvc: Obj) -> bool:
    """A ReferenceGrant `from` entry naming claims of the claim's namespace."""
    core = (entry.get("group") or "") == ""
    return (
        core
        and entry.get("kind") == "PersistentVolumeClaim"
        and entry.get("namespace") == k.namespace_of(pvc)
    )


def _to_matches(entry: Obj, ds: dict[str, Any]) -> bool:
    """A ReferenceGrant `to` entry naming the source's group and kind (and its name, or any)."""
    named = not entry.get("name") or entry.get("name") == ds.get("name")
    return (
        named
        and (entry.get("group") or "") == (ds.get("apiGroup") or "")
        and entry.get("kind") == ds.get("kind")
    )


def _grant_allows(grant: Obj, pvc: Obj, ds: dict[str, Any]) -> bool:
    """Whether one ReferenceGrant lets claims in the claim's namespace use this source (kind, name)."""
    gspec = spec_of(grant)
    return any(_from_matches(f, pvc) for f in gspec.get("from") or []) and any(
        _to_matches(t, ds) for t in gspec.get("to") or []
    )


def _claim_size(src: Obj) -> int:
    """A source claim's size (its capacity, else its request); unreadable counts as 0, as upstream."""
    try:
        return storage_of(src, "status", "capacity") or storage_of(src, "spec", "resources", "requests") or 0
    except ValueError:
        return 0


def _content_problem(content: Obj, snap: Obj, ns: str, name: str, driver: str) -> str | None:
    """What keeps a snapshot's content from being restored by `driver`, or None."""
    ref = spec_of(content).get("volumeSnapshotRef") or {}
    uid = ref.get("uid")
    if ref.get("name") != name or ref.get("namespace") != ns or (uid and uid != k.uid_of(snap)):
        return f"content {k.name_of(content)} is not bound to snapshot {ns}/{name}"
    if spec_of(content).get("driver") != driver:
        return f"snapshot {ns}/{name} belongs to driver {spec_of(content).get('driver')!r}"
    return None


def _clone_problem(pvc: Obj, src: Obj, ns: str, name: str) -> str | None:
    """What keeps claim `src` from being cloned into `pvc` (before its PV is looked at), or None."""
    sspec, spec = spec_of(src), spec_of(pvc)
    if k.is_deleting(src) and CLONE_SOURCE_FINALIZER not in k.finalizers_of(src):
        return f"the source claim {ns}/{name} is being deleted"
    if status_of(src).get("phase") != "Bound" or not sspec.get("volumeName"):
        return f"the source claim {ns}/{name} is not bound"
    if sspec.get("storageClassName") != spec.get("storageClassName"):
        return "the source and destination claims must be in the same storage class for cloning"
    if (sspec.get("volumeMode") or "Filesystem") != (spec.get("volumeMode") or "Filesystem"):
        return "the source and destination claims must have the same volume mode"
    return None


class DataSources:
    """The data-source half of the provisioner loop: validation, protection finalizers, the source queue."""

    def __init__(self, loop: SourceLoop) -> None:
        self.loop = loop
        self.queue = loop.queue("source", self.sync)
        # Snapshots known to carry no finalizer of ours (saves a GET on every later sync).
        self._released_snapshots: set[tuple[str, str]] = set()

    def requeue(self, ref: SourceRef | None) -> None:
        """Look again whether the source `ref` is still needed."""
        if ref is not None:
            self.queue.add("|".join(ref))

    # ------------------------------------------------------------ the content source

    async def content_source(self, pvc: Obj, required: int) -> tuple[str, str] | bool | None:
        """The CSI content source for the claim's data source (None: none; False: not ours to fill)."""
        ds = pvc_data_source(pvc)
        if not ds:
            return None
        kind = source_kind(ds)
        if kind is None:
            return False
        ns = str(ds.get("namespace") or k.namespace_of(pvc))
        if ns != k.namespace_of(pvc):
            await self._check_cross_namespace(pvc, ds, ns)
        name = str(ds.get("name") or "")
        if not name:
            raise ProvisioningError("the data source has no name")
        if kind == "snapshot":
            return ("snapshot", await self._snapshot_handle(ns, name, required))
        return ("volume", await self._clone_handle(pvc, ns, name, required))

    async def _check_cross_namespace(self, pvc: Obj, ds: dict[str, Any], ns: str) -> None:
        what = f"{ds.get('kind')} {ns}/{ds.get('name')}"
        if not self.loop.cross_namespace:
            raise ProvisioningError(
                f"data source {what} is in another namespace and cross-namespace data sources are not enabled"
            )
        if not await self._granted(pvc, ds, ns):
            raise ProvisioningError(
                f"accessing {what} from namespace {k.namespace_of(pvc)} is not allowed by any ReferenceGrant"
            )

    async def _granted(self, pvc: Obj, ds: dict[str, Any], ns: str) -> bool:
        """A ReferenceGrant in the source namespace lets claims in ours use this kind (and name)."""
        try:
            grants = await self.loop.api.list(REFERENCE_GRANT, ns)
        except ApiError as e:
            if k.is_not_found(e):
                return False  # the ReferenceGrant CRD is not installed
            raise
        return any(_grant_allows(g, pvc, ds) for g in grants.items)

    async def _get(self, res: Resource, name: str, ns: str | None, missing: str) -> Obj:
        try:
            return await self.loop.api.get(res, name, ns)
        except ApiError as e:
            if k.is_not_found(e):
                raise ProvisioningError(missing) from None
            raise

    async def _snapshot_handle(self, ns: str, name: str, required: int) -> str:
        """The snapshot's handle, once it is checked and protected by our finalizer."""
        snap = await self._get(
            VOLUME_SNAPSHOT, name, ns, f'volumesnapshot.snapshot.storage.k8s.io "{name}" not found'
        )
        if k.is_deleting(snap) and SNAPSHOT_SOURCE_FINALIZER not in k.finalizers_of(snap):
            raise ProvisioningError(f"snapshot {ns}/{name} is being deleted")
        st = status_of(snap)
        if st.get("readyToUse") is not True:
            raise ProvisioningError(f"snapshot {ns}/{name} is not Ready")
        handle = await self._content_handle(snap, ns, name)
        if st.get("restoreSize") is not None:
            try:
                size = parse_quantity(st["restoreSize"])
            except ValueError:
                size = 0
            if required < size:
                raise ProvisioningError(
                    f"requested volume size {required} is less than the size {size} of the source snapshot"
                )
        self._released_snapshots.discard((ns, name))
        patch = set_finalizers_patch(snap, add={SNAPSHOT_SOURCE_FINALIZER})
        if patch is not None:
            await self.loop.api.patch(VOLUME_SNAPSHOT, name, patch, ns)
        return handle

    async def _content_handle(self, snap: Obj, ns: str, name: str) -> str:
        """The snapshot handle of the content the snapshot is bound to."""
        content_name = status_of(snap).get("boundVolumeSnapshotContentName")
        if not content_name:
            raise ProvisioningError(f"snapshot {ns}/{name} is not bound to a content")
        content = await self._get(
            VOLUME_SNAPSHOT_CONTENT,
            str(content_name),
            None,
            f"content {content_name} of snapshot {ns}/{name} not found",
        )
        problem = _content_problem(content, snap, ns, name, self.loop.driver_name)
        if problem is not None:
            raise ProvisioningError(problem)
        handle = status_of(content).get("snapshotHandle") or (spec_of(content).get("source") or {}).get(
            "snapshotHandle"
        )
        if not handle:
            raise ProvisioningError(f"content {content_name} has no snapshot handle yet")
        return str(handle)

    async def _clone_handle(self, pvc: Obj, ns: str, name: str, required: int) -> str:
        """The source claim's volume handle, once it is checked and protected by our finalizer."""
        src = self.loop.pvcs.get(f"{ns}/{name}")
        if src is None:
            raise ProvisioningError(f'persistentvolumeclaim "{name}" not found')
        problem = _clone_problem(pvc, src, ns, name)
        if problem is not None:
            raise ProvisioningError(problem)
        pv = self.loop.pvs.get(volume_name_of(src))
        if pv is None:
            raise ProvisioningError(f"the volume {volume_name_of(src)} of claim {ns}/{name} not found")
        csi = csi_of(pv)
        if csi.get("driver") != self.loop.driver_name:
            raise ProvisioningError(f"the source claim {ns}/{name} belongs to driver {csi.get('driver')!r}")
        if required < _claim_size(src):
            raise ProvisioningError(
                f"error getting handle for DataSource Type PersistentVolumeClaim by Name {name}: "
                "new PVC request must be greater than or equal in size to the specified PVC data source"
            )
        patch = set_finalizers_patch(src, add={CLONE_SOURCE_FINALIZER})
        if patch is not None:
            await self.loop.patch(PVC, src, patch)
        return str(csi["volumeHandle"])

    # ------------------------------------------------------------------- release

    def _provisioned(self, pvc: Obj) -> bool:
        return bool(volume_name_of(pvc)) or self.loop.pvs.get(self.loop.pv_name(pvc)) is not None

    def still_needed(self, ref: SourceRef, *, besides: str | None = None) -> bool:
        """Whether some claim is still being provisioned from this source (cache only, no request)."""
        for pvc in self.loop.pvcs.items():
            key = k.key_of(pvc)
            if key != besides and source_ref(pvc) == ref and not self._provisioned(pvc):
                return True
        return self.loop.creating_from(ref, besides=besides)

    async def release(self, pvc: Obj) -> None:
        """Drop our finalizers from the claim's source, and from the claim as a source, once unneeded."""
        ref = source_ref(pvc)
        if (
            ref is not None
            and self._provisioned(pvc)
            and claims_driver(pvc, self.loop.driver_name)
            and not self.loop.creating(k.key_of(pvc))
        ):
            await self._release(ref)
        own = ("pvc", str(k.namespace_of(pvc)), k.name_of(pvc))
        if CLONE_SOURCE_FINALIZER in k.finalizers_of(pvc) and not self.still_needed(own):
            await self._unprotect_claim(pvc)

    async def sync(self, key: str) -> None:
        """Release a data source (`kind|namespace|name`) nobody is being provisioned from any more."""
        kind, ns, name = key.split("|", 2)
        await self._release((kind, ns, name))

    async def _release(self, ref: SourceRef) -> None:
        """Drop our finalizer from the source `ref` unless a claim is still being provisioned from it."""
        kind, ns, name = ref
        if self.still_needed(ref):
            return
        if kind == "snapshot":
            await self._release_snapshot(ns, name)
            return
        src = self.loop.pvcs.get(f"{ns}/{name}")
        if src is not None:
            await self._unprotect_claim(src)

    async def _unprotect_claim(self, src: Obj) -> None:
        patch = set_finalizers_patch(src, remove={CLONE_SOURCE_FINALIZER})
        if patch is None:
            return
        try:
            await self.loop.patch(PVC, src, patch)
        except ApiError as e:
            if not k.is_not_found(e):
                raise

    async def _release_snapshot(self, ns: str, name: str) -> None:
        """Drop our finalizer from a snapshot (a GET the first time only: snapshots are not watched)."""
        if (ns, name) in self._released_snapshots:
            return
        try:
            snap = await self.loop.api.get(VOLUME_SNAPSHOT, name, ns)
            patch = set_finalizers_patch(snap, remove={SNAPSHOT_SOURCE_FINALIZER})
            if patch is not None:
                await self.loop.api.patch(VOLUME_SNAPSHOT, name, patch, ns)
        except ApiError as e:
            if not k.is_not_found(e):
                raise
        self._released_snapshots.add((ns, name))
