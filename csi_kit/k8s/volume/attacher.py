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

import base64
import logging
import re
from typing import Any, Protocol

from csi_kit.k8s.objects.meta import set_finalizers_patch
from csi_kit.k8s.objects.resources import CSI_NODE, PV, SECRET, VOLUME_ATTACHMENT
from csi_kit.k8s.objects.times import rfc3339
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.controller import Loop, Retry
from csi_kit.k8s.runtime.csi import Capability, CSICallError, DriverInfo
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.volume.protocol import capabilities_for

log = logging.getLogger(__name__)

ANN_NODE_ID = "csi.alpha.kubernetes.io/node-id"


def sanitize_driver_name(name: str) -> str:
    """What external-attacher does to a driver name before using it in a finalizer."""
    out = re.sub(r"[^a-zA-Z0-9-]", "-", name)
    if out.endswith("-"):
        out += "X"
    return out


def finalizer_for(driver: str) -> str:
    return "external-attacher/" + sanitize_driver_name(driver)


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


class Attacher(Loop):
    name = "attacher"

    def __init__(
        self,
        api: KubeAPI,
        driver: AttachDriver,
        info: DriverInfo,
        *,
        informers: InformerFactory | None = None,
        workers: int = 10,
        resync_period: float = 600.0,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
    ) -> None:
        super().__init__(informers=informers, workers=workers, base_delay=base_delay, max_delay=max_delay)
        self.api = api
        self.driver = driver
        self.driver_name = info.name
        self.finalizer = finalizer_for(info.name)
        self.trivial = "PUBLISH_UNPUBLISH_VOLUME" not in info.controller_capabilities
        self.multi_writer = "SINGLE_NODE_MULTI_WRITER" in info.controller_capabilities
        self.attachments = self.informer(api, VOLUME_ATTACHMENT, resync_period=resync_period)
        self.pvs = self.informer(api, PV)
        self.csinodes = self.informer(api, CSI_NODE)
        self.va_queue = self.queue("va", self.sync_attachment)
        self.pv_queue = self.queue("pv", self.sync_pv)
        self.attachments.add_handler(self._on_attachment)
        self.pvs.add_handler(self._on_pv)

    def _on_attachment(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        assert obj is not None
        if (obj.get("spec") or {}).get("attacher") != self.driver_name:
            return
        if event == "DELETED":
            pv = ((obj.get("spec") or {}).get("source") or {}).get("persistentVolumeName")
            if pv:
                self.pv_queue.add(str(pv))
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
        recorded = k.annotations_of(va).get(ANN_NODE_ID)
        if recorded:
            return recorded
        node = str((va.get("spec") or {}).get("nodeName") or "")
        csinode = self.csinodes.get(node)
        for d in ((csinode or {}).get("spec") or {}).get("drivers") or []:
            if d.get("name") == self.driver_name and d.get("nodeID"):
                return str(d["nodeID"])
        return None

    def _csi_source(self, va: Obj) -> tuple[Obj | None, dict[str, Any]]:
        """(PV or None for inline, the PV-spec-shaped source) of an attachment."""
        source = (va.get("spec") or {}).get("source") or {}
        if source.get("persistentVolumeName"):
            pv = self.pvs.get(str(source["persistentVolumeName"]))
            if pv is None:
                raise Retry(f"persistentvolume {source['persistentVolumeName']} not found")
            return pv, dict(pv.get("spec") or {})
        inline = source.get("inlineVolumeSpec")
        if inline:
            return None, dict(inline)
        raise ValueError("the attachment names no volume")

    async def _secrets(self, spec: dict[str, Any]) -> dict[str, str]:
        ref = (spec.get("csi") or {}).get("controllerPublishSecretRef")
        if not ref:
            return {}
        secret = await self.api.get(SECRET, str(ref.get("name")), str(ref.get("namespace")))
        return {key: base64.b64decode(v).decode() for key, v in (secret.get("data") or {}).items()}

    def _capability(self, spec: dict[str, Any]) -> Capability:
        return capabilities_for(
            list(spec.get("accessModes") or ["ReadWriteOnce"]),
            block=spec.get("volumeMode") == "Block",
            fs_type=str((spec.get("csi") or {}).get("fsType") or ""),
            mount_flags=list(spec.get("mountOptions") or []),
            single_node_multi_writer=self.multi_writer,
        )[0]

    async def _error(self, va: Obj, field: str, message: str) -> None:
        if ((va.get("status") or {}).get(field) or {}).get("message") == message:
            return
        try:
            await self._patch(va, {"status": {field: {"time": rfc3339(), "message": message}}}, status=True)
        except ApiError as e:
            log.info("cannot record %s on %s: %s", field, k.name_of(va), e)

    # ------------------------------------------------------------------- sync

    async def sync_attachment(self, name: str) -> None:
        va = self.attachments.get(name)
        if va is None or (va.get("spec") or {}).get("attacher") != self.driver_name:
            return
        if k.is_deleting(va):
            await self._detach(va)
        else:
            await self._attach(va)

    async def _attach(self, va: Obj) -> None:
        st = va.get("status") or {}
        if self.trivial:
            if st.get("attached") is not True:
                await self._patch(va, {"status": {"attached": True}}, status=True)
            return
        if st.get("attached") is True and self.finalizer in k.finalizers_of(va):
            return
        try:
            pv, spec = self._csi_source(va)
        except ValueError as e:
            await self._error(va, "attachError", str(e))
            return
        node_id = self._node_id(va)
        if node_id is None:
            msg = f"CSINode {(va.get('spec') or {}).get('nodeName')} does not list driver {self.driver_name}"
            await self._error(va, "attachError", msg)
            raise Retry(msg)
        ann = k.annotations_of(va)
        if self.finalizer not in k.finalizers_of(va) or ann.get(ANN_NODE_ID) != node_id:
            patch = set_finalizers_patch(va, add={self.finalizer}) or {"metadata": {}}
            patch["metadata"]["annotations"] = {ANN_NODE_ID: node_id}
            va = await self._patch(va, patch)
        if pv is not None and self.finalizer not in k.finalizers_of(pv):
            fp = set_finalizers_patch(pv, add={self.finalizer})
            if fp is not None:
                self.pvs.store_update(await self.api.patch(PV, k.name_of(pv), fp))
        csi = spec.get("csi") or {}
        try:
            context = await self.driver.publish_volume(
                str(csi.get("volumeHandle") or ""),
                node_id,
                self._capability(spec),
                readonly=bool(csi.get("readOnly")),
                secrets=await self._secrets(spec),
                volume_context={str(a): str(b) for a, b in (csi.get("volumeAttributes") or {}).items()},
            )
        except (CSICallError, ApiError) as e:
            await self._error(va, "attachError", f"rpc error: {e}")
            raise
        await self._patch(
            va,
            {"status": {"attached": True, "attachmentMetadata": context or None, "attachError": None}},
            status=True,
        )

    async def _detach(self, va: Obj) -> None:
        if self.finalizer not in k.finalizers_of(va):
            return
        node_id = self._node_id(va)
        if node_id is not None and not self.trivial:
            try:
                _, spec = self._csi_source(va)
            except ValueError:
                spec = {}
            csi = spec.get("csi") or {}
            try:
                await self.driver.unpublish_volume(
                    str(csi.get("volumeHandle") or ""), node_id, await self._secrets(spec)
                )
            except (CSICallError, ApiError) as e:
                await self._error(va, "detachError", f"rpc error: {e}")
                raise
        patch = set_finalizers_patch(va, remove={self.finalizer})
        if patch is not None:
            try:
                await self._patch(va, patch)
            except ApiError as e:
                if not k.is_not_found(e):
                    raise
        pv_name = (((va.get("spec") or {}).get("source") or {}).get("persistentVolumeName")) or ""
        if pv_name:
            self.pv_queue.add(str(pv_name))

    async def sync_pv(self, name: str) -> None:
        """Drop our PV finalizer once no attachment of ours uses the PV and it is being deleted."""
        pv = self.pvs.get(name)
        if pv is None or self.finalizer not in k.finalizers_of(pv) or not k.is_deleting(pv):
            return
        for va in self.attachments.items():
            src = ((va.get("spec") or {}).get("source") or {}).get("persistentVolumeName")
            if src == name and (va.get("spec") or {}).get("attacher") == self.driver_name:
                return
        patch = set_finalizers_patch(pv, remove={self.finalizer})
        if patch is not None:
            try:
                self.pvs.store_update(await self.api.patch(PV, name, patch))
            except ApiError as e:
                if not k.is_not_found(e):
                    raise
