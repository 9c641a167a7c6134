"""The attacher: VolumeAttachment → ControllerPublishVolume / ControllerUnpublishVolume.

What the upstream external-attacher does for one driver, on the same fields:

* A VolumeAttachment whose `spec.attacher` names the driver first gets the
  `external-attacher/<sanitized driver>` finalizer and the node's CSI node ID
  (from its CSINode) in the `csi.alpha.kubernetes.io/node-id` annotation --
  one write -- and the PV gets the same finalizer, so neither can vanish while
  the volume may be attached.  Then ControllerPublishVolume, and
  `status.attached=true` with the publish context as `attachmentMetadata`.
* A deleted VolumeAttachment gets ControllerUnpublishVolume (with the node ID
  recorded at attach time: the node may be gone by now) and loses its
  finalizer.  The PV's finalizer goes when no attachment uses the PV.
* Failures land in `status.attachError` / `status.detachError` and are retried
  with backoff.  Whatever the error, the finalizer was set before the call, so
  a deletion always unpublishes what might have been published.
* Drivers without PUBLISH_UNPUBLISH_VOLUME are marked attached without a call
  and without finalizers, as upstream's trivial handler does (better: set
  `attachRequired: false` in the CSIDriver and have no VolumeAttachments).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, Unpack

from csi_kit.k8s.objects.meta import set_finalizers_patch, spec_of, status_of
from csi_kit.k8s.objects.names import sanitize_lease_name
from csi_kit.k8s.objects.resources import CSI_NODE, PV, VOLUME_ATTACHMENT
from csi_kit.k8s.objects.times import rfc3339
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.context import LoopContext, Planned
from csi_kit.k8s.runtime.controller import Retry
from csi_kit.k8s.runtime.csi import Capability, CSICallError, DriverInfo
from csi_kit.k8s.volume.base import LoopArgs, VolumeLoop
from csi_kit.k8s.volume.protocol import (
    ANN_NODE_ID,
    attacher_finalizer,
    attachment_pv_name,
    csi_node_id,
    pv_capability,
    volume_handle,
)

log = logging.getLogger(__name__)


class AttachDriver(Protocol):
    async def publish_volume(
        self,
        volume_id: str,
        node_id: str,
        capability: Capability,
        *,
        readonly: bool,
        secrets: dict[str, str],
        volume_context: dict[str, str],
    ) -> dict[str, str]: ...

    async def unpublish_volume(self, volume_id: str, node_id: str, secrets: dict[str, str]) -> None: ...


def _publish_secret_ref(spec: dict[str, Any]) -> tuple[str, str] | None:
    ref = (spec.get("csi") or {}).get("controllerPublishSecretRef")
    return (str(ref.get("name")), str(ref.get("namespace"))) if ref else None


class Attacher(VolumeLoop[AttachDriver]):
    name = "attacher"

    def __init__(
        self,
        api: KubeAPI,
        driver: AttachDriver,
        info: DriverInfo,
        *,
        resync_period: float = 600.0,
        **loop: Unpack[LoopArgs],
    ) -> None:
        super().__init__(api, driver, info, **loop)
        self.finalizer = attacher_finalizer(info.name)
        self.trivial = not self.controller_can("PUBLISH_UNPUBLISH_VOLUME")
        self.multi_writer = self.controller_can("SINGLE_NODE_MULTI_WRITER")
        self.attachments = self.informer(api, VOLUME_ATTACHMENT, resync_period=resync_period)
        self.pvs = self.informer(api, PV)
        self.csinodes = self.informer(api, CSI_NODE)
        self.va_queue = self.queue("va", self.sync_attachment)
        self.pv_queue = self.queue("pv", self.sync_pv)
        self.attachments.add_handler(self._on_attachment)
        self.pvs.add_handler(self._on_pv)

    def _ours(self, va: Obj) -> bool:
        return spec_of(va).get("attacher") == self.driver_name

    def _on_attachment(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        if not self._ours(obj):
            return
        if event == "DELETED":
            if attachment_pv_name(obj):
                self.pv_queue.add(attachment_pv_name(obj))
            return
        self.va_queue.add(k.name_of(obj))

    def _on_pv(self, event: str, old: Obj | None, new: Obj | None) -> None:
        if event != "DELETED" and new is not None and self.finalizer in k.finalizers_of(new):
            self.pv_queue.add(k.name_of(new))

    # ---------------------------------------------------------------- helpers

    async def _patch(self, va: Obj, patch: Obj, *, status: bool = False) -> Obj:
        updated = await self.api.patch(VOLUME_ATTACHMENT, k.name_of(va), patch, status=status)
        self.attachments.store_update(updated)
        return updated

    def _node_id(self, va: Obj) -> str | None:
        """The CSI node ID: recorded at attach time, else the node's CSINode's."""
        recorded = k.annotations_of(va).get(ANN_NODE_ID)
        if recorded:
            return recorded
        return csi_node_id(self.csinodes.get(str(spec_of(va).get("nodeName") or "")), self.driver_name)

    def _csi_source(self, va: Obj) -> tuple[Obj | None, dict[str, Any]]:
        """(PV or None for inline, the PV-spec-shaped source) of an attachment."""
        pv_name = attachment_pv_name(va)
        if pv_name:
            pv = self.pvs.get(pv_name)
            if pv is None:
                raise Retry(f"persistentvolume {pv_name} not found")
            return pv, dict(spec_of(pv))
        inline = (spec_of(va).get("source") or {}).get("inlineVolumeSpec")
        if inline:
            return None, dict(inline)
        raise ValueError("the attachment names no volume")

    async def _error(self, va: Obj, field: str, message: str) -> None:
        if (status_of(va).get(field) or {}).get("message") == message:
            return
        try:
            await self._patch(va, {"status": {field: {"time": rfc3339(), "message": message}}}, status=True)
        except ApiError as e:
            log.info("cannot record %s on %s: %s", field, k.name_of(va), e)

    # ------------------------------------------------------------------- sync

    async def sync_attachment(self, name: str) -> None:
        va = self.attachments.get(name)
        if va is None or not self._ours(va):
            return
        if k.is_deleting(va):
            await self._detach(va)
        else:
            await self._attach(va)

    async def _attach(self, va: Obj) -> None:
        attached = status_of(va).get("attached") is True
        if self.trivial:
            if not attached:
                await self._patch(va, {"status": {"attached": True}}, status=True)
            return
        if attached and self.finalizer in k.finalizers_of(va):
            return
        try:
            pv, spec = self._csi_source(va)
        except ValueError as e:
            await self._error(va, "attachError", str(e))
            return
        node_id = self._node_id(va)
        if node_id is None:
            msg = f"CSINode {spec_of(va).get('nodeName')} does not list driver {self.driver_name}"
            await self._error(va, "attachError", msg)
            raise Retry(msg)
        va = await self._protect(va, pv, node_id)
        context = await self._publish(va, spec, node_id)
        await self._patch(
            va,
            {"status": {"attached": True, "attachmentMetadata": context or None, "attachError": None}},
            status=True,
        )

    async def _protect(self, va: Obj, pv: Obj | None, node_id: str) -> Obj:
        """Our finalizer and the node ID on the attachment (one write), our finalizer on its PV."""
        if self.finalizer not in k.finalizers_of(va) or k.annotations_of(va).get(ANN_NODE_ID) != node_id:
            patch = set_finalizers_patch(va, add={self.finalizer}) or {"metadata": {}}
            patch["metadata"]["annotations"] = {ANN_NODE_ID: node_id}
            va = await self._patch(va, patch)
        fp = None if pv is None else set_finalizers_patch(pv, add={self.finalizer})
        if pv is not None and fp is not None:
            self.pvs.store_update(await self.api.patch(PV, k.name_of(pv), fp))
        return va

    async def _publish(self, va: Obj, spec: dict[str, Any], node_id: str) -> dict[str, str]:
        csi = spec.get("csi") or {}
        try:
            return await self.driver.publish_volume(
                str(csi.get("volumeHandle") or ""),
                node_id,
                pv_capability(spec, multi_writer=self.multi_writer, default_modes=["ReadWriteOnce"]),
                readonly=bool(csi.get("readOnly")),
                secrets=await self.read_secret(_publish_secret_ref(spec)),
                volume_context={str(a): str(b) for a, b in (csi.get("volumeAttributes") or {}).items()},
            )
        except (CSICallError, ApiError) as e:
            await self._error(va, "attachError", f"rpc error: {e}")
            raise
        except ValueError as e:  # an unusable access mode or secret
            await self._error(va, "attachError", str(e))
            raise

    async def _detach(self, va: Obj) -> None:
        if self.finalizer not in k.finalizers_of(va):
            return
        node_id = self._node_id(va)
        if node_id is not None and not self.trivial:
            await self._unpublish(va, node_id)
        patch = set_finalizers_patch(va, remove={self.finalizer})
        if patch is not None:
            try:
                await self._patch(va, patch)
            except ApiError as e:
                if not k.is_not_found(e):
                    raise
        if attachment_pv_name(va):
            self.pv_queue.add(attachment_pv_name(va))

    async def _unpublish(self, va: Obj, node_id: str) -> None:
        try:
            _, spec = self._csi_source(va)
        except ValueError:
            spec = {}
        try:
            await self.driver.unpublish_volume(
                volume_handle({"spec": spec}), node_id, await self.read_secret(_publish_secret_ref(spec))
            )
        except (CSICallError, ApiError) as e:
            await self._error(va, "detachError", f"rpc error: {e}")
            raise

    def _in_use(self, pv_name: str) -> bool:
        """Whether an attachment of ours still names the PV."""
        return any(self._ours(va) and attachment_pv_name(va) == pv_name for va in self.attachments.items())

    async def sync_pv(self, name: str) -> None:
        """Drop our PV finalizer once no attachment of ours uses the PV and it is being deleted."""
        pv = self.pvs.get(name)
        if (
            pv is None
            or self.finalizer not in k.finalizers_of(pv)
            or not k.is_deleting(pv)
            or self._in_use(name)
        ):
            return
        patch = set_finalizers_patch(pv, remove={self.finalizer})
        if patch is not None:
            try:
                self.pvs.store_update(await self.api.patch(PV, name, patch))
            except ApiError as e:
                if not k.is_not_found(e):
                    raise


# ---------------------------------------------------------------------- wiring
# The loop's factory, listed in k8s/registry.py; kept by the wiring (the module's owner works above).


async def build(ctx: LoopContext) -> list[Planned]:
    """The attacher, always one elected per cluster (attachments are cluster-wide, even for node-local
    drivers).

    `all` means the loops this driver needs: a driver without controller publish runs with
    attachRequired: false, so no attachments exist.  Asked for by name, the attacher runs anyway
    (upstream's trivial handler marks attachments attached).
    """
    info = ctx.info
    publishes = "PUBLISH_UNPUBLISH_VOLUME" in info.controller_capabilities
    if "CONTROLLER_SERVICE" not in info.plugin_capabilities or not (publishes or "attacher" in ctx.named):
        return []
    loop = Attacher(
        ctx.clients.api_for("attacher"),
        ctx.csi,
        info,
        informers=ctx.clients.informers,
        workers=ctx.args.k8s_workers,
        **ctx.timing,
    )
    return [Planned(loop, "external-attacher-leader-" + sanitize_lease_name(info.name))]
