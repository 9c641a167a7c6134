"""What the volume loops (provisioner, resizer, attacher, capacity) share.

The kinds they touch beyond part 1's, Kubernetes quantities, the PVC access
mode → CSI access mode mapping, Events, and `VolumeClient`: the CSI calls the
loops make on volumes, added to part 1's `CSIClient` so that one gRPC channel
serves every loop of a process.  The loops take the narrow `*Driver`
protocols declared next to them, so tests can hand them any CSI peer.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

import attrs

from csi_kit._pb import csi_pb2 as pb
from csi_kit.k8s.objects.resources import EVENT
from csi_kit.k8s.objects.times import rfc3339
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.csi import CSIClient

log = logging.getLogger(__name__)


# --------------------------------------------------------------- access modes


@attrs.frozen
class Capability:
    """One CSI VolumeCapability, built from a PV/PVC."""

    access_mode: str  # csi.v1 VolumeCapability.AccessMode.Mode name
    block: bool = False
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()

    def to_pb(self) -> Any:
        mode = pb.VolumeCapability.AccessMode(mode=self.access_mode)
        if self.block:
            return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=mode)
        return pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(fs_type=self.fs_type, mount_flags=list(self.mount_flags)),
            access_mode=mode,
        )


def capabilities_for(
    access_modes: list[str],
    *,
    block: bool,
    fs_type: str,
    mount_flags: list[str],
    single_node_multi_writer: bool,
) -> list[Capability]:
    """PVC access modes → CSI capabilities, as external-provisioner maps them.

    With the driver's SINGLE_NODE_MULTI_WRITER capability, ReadWriteOnce means
    SINGLE_NODE_MULTI_WRITER and ReadWriteOncePod SINGLE_NODE_SINGLE_WRITER;
    without it both mean SINGLE_NODE_WRITER.
    """
    if not access_modes:
        raise ValueError("the claim has no access modes")
    modes: list[str] = []
    for am in access_modes:
        if am == "ReadWriteOnce":
            m = "SINGLE_NODE_MULTI_WRITER" if single_node_multi_writer else "SINGLE_NODE_WRITER"
        elif am == "ReadWriteOncePod":
            m = "SINGLE_NODE_SINGLE_WRITER" if single_node_multi_writer else "SINGLE_NODE_WRITER"
        elif am == "ReadOnlyMany":
            m = "MULTI_NODE_READER_ONLY"
        elif am == "ReadWriteMany":
            m = "MULTI_NODE_MULTI_WRITER"
        else:
            raise ValueError(f"unknown access mode {am!r}")
        if m not in modes:
            modes.append(m)
    return [
        Capability(
            m, block=block, fs_type="" if block else fs_type, mount_flags=() if block else tuple(mount_flags)
        )
        for m in modes
    ]


# ------------------------------------------------------------- CSI calls


@attrs.frozen
class CreatedVolume:
    volume_id: str
    capacity_bytes: int
    volume_context: dict[str, str]
    accessible_topology: tuple[dict[str, str], ...]
    content_source: tuple[str, str] | None = None


@attrs.frozen
class TopologyRequirement:
    requisite: tuple[dict[str, str], ...]
    preferred: tuple[dict[str, str], ...]


class VolumeClient(CSIClient):
    """`CSIClient` plus the volume calls; the one CSI client a whole process needs."""

    def __init__(self, endpoint: str, *, timeout: float = 60.0) -> None:
        super().__init__(endpoint, timeout=timeout)
        from csi_kit._pb import csi_pb2_grpc as pbg

        self._node = pbg.NodeStub(self._channel)

    async def create_volume(
        self,
        name: str,
        *,
        required_bytes: int,
        limit_bytes: int,
        capabilities: list[Capability],
        parameters: dict[str, str],
        secrets: dict[str, str],
        source: tuple[str, str] | None = None,
        topology: TopologyRequirement | None = None,
    ) -> CreatedVolume:
        req = pb.CreateVolumeRequest(
            name=name,
            capacity_range=pb.CapacityRange(required_bytes=required_bytes, limit_bytes=limit_bytes),
            volume_capabilities=[c.to_pb() for c in capabilities],
            parameters=parameters,
            secrets=secrets,
        )
        if source is not None:
            kind, ident = source
            if kind == "snapshot":
                req.volume_content_source.snapshot.snapshot_id = ident
            else:
                req.volume_content_source.volume.volume_id = ident
        if topology is not None:
            req.accessibility_requirements.requisite.extend(
                pb.Topology(segments=t) for t in topology.requisite
            )
            req.accessibility_requirements.preferred.extend(
                pb.Topology(segments=t) for t in topology.preferred
            )
        r = await self._call("CreateVolume", self._controller.CreateVolume, req)
        v = r.volume
        src: tuple[str, str] | None = None
        if v.HasField("content_source"):
            if v.content_source.HasField("snapshot"):
                src = ("snapshot", v.content_source.snapshot.snapshot_id)
            elif v.content_source.HasField("volume"):
                src = ("volume", v.content_source.volume.volume_id)
        return CreatedVolume(
            volume_id=v.volume_id,
            capacity_bytes=int(v.capacity_bytes),
            volume_context=dict(v.volume_context),
            accessible_topology=tuple(dict(t.segments) for t in v.accessible_topology),
            content_source=src,
        )

    async def delete_volume(self, volume_id: str, secrets: dict[str, str]) -> None:
        await self._call(
            "DeleteVolume",
            self._controller.DeleteVolume,
            pb.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets),
        )

    async def expand_volume(
        self, volume_id: str, required_bytes: int, capability: Capability | None, secrets: dict[str, str]
    ) -> tuple[int, bool]:
        """ControllerExpandVolume → (capacity_bytes, node_expansion_required)."""
        req = pb.ControllerExpandVolumeRequest(
            volume_id=volume_id,
            capacity_range=pb.CapacityRange(required_bytes=required_bytes),
            secrets=secrets,
        )
        if capability is not None:
            req.volume_capability.CopyFrom(capability.to_pb())
        r = await self._call("ControllerExpandVolume", self._controller.ControllerExpandVolume, req)
        return int(r.capacity_bytes), bool(r.node_expansion_required)

    async def modify_volume(self, volume_id: str, mutable_parameters: dict[str, str]) -> None:
        """ControllerModifyVolume (no secrets: upstream's resizer sends none either)."""
        await self._call(
            "ControllerModifyVolume",
            self._controller.ControllerModifyVolume,
            pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=mutable_parameters),
        )

    async def publish_volume(
        self,
        volume_id: str,
        node_id: str,
        capability: Capability,
        *,
        readonly: bool,
        secrets: dict[str, str],
        volume_context: dict[str, str],
    ) -> dict[str, str]:
        r = await self._call(
            "ControllerPublishVolume",
            self._controller.ControllerPublishVolume,
            pb.ControllerPublishVolumeRequest(
                volume_id=volume_id,
                node_id=node_id,
                volume_capability=capability.to_pb(),
                readonly=readonly,
                secrets=secrets,
                volume_context=volume_context,
            ),
        )
        return dict(r.publish_context)

    async def unpublish_volume(self, volume_id: str, node_id: str, secrets: dict[str, str]) -> None:
        await self._call(
            "ControllerUnpublishVolume",
            self._controller.ControllerUnpublishVolume,
            pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id, secrets=secrets),
        )

    async def get_capacity(
        self, parameters: dict[str, str], topology: dict[str, str] | None, capabilities: list[Capability]
    ) -> tuple[int, int | None]:
        """GetCapacity → (available_capacity, maximum_volume_size or None when not reported)."""
        req = pb.GetCapacityRequest(
            parameters=parameters, volume_capabilities=[c.to_pb() for c in capabilities]
        )
        if topology is not None:
            req.accessible_topology.CopyFrom(pb.Topology(segments=topology))
        r = await self._call("GetCapacity", self._controller.GetCapacity, req)
        maximum = int(r.maximum_volume_size.value) if r.HasField("maximum_volume_size") else None
        return int(r.available_capacity), maximum

    async def probe(self) -> bool:
        """Probe → ready (an unset `ready` means ready, per the spec)."""
        r = await self._call("Probe", self._identity.Probe, pb.ProbeRequest())
        return (not r.HasField("ready")) or bool(r.ready.value)

    async def node_info(self) -> tuple[str, dict[str, str]]:
        """NodeGetInfo → (node_id, accessible topology segments)."""
        r = await self._call("NodeGetInfo", self._node.NodeGetInfo, pb.NodeGetInfoRequest())
        topo = dict(r.accessible_topology.segments) if r.HasField("accessible_topology") else {}
        return r.node_id, topo


# ------------------------------------------------------- claim conditions


def claim_condition(type_: str, message: str = "") -> dict[str, Any]:
    """A PVC condition of `type_` with status True, as the resizer's loops write them."""
    c: dict[str, Any] = {"type": type_, "status": "True", "lastTransitionTime": rfc3339()}
    if message:
        c["message"] = message
    return c


def has_claim_condition(pvc: Obj, type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True"
        for c in (pvc.get("status") or {}).get("conditions") or []
    )


def merge_claim_conditions(
    pvc: Obj, new: Iterable[dict[str, Any]], kinds: Iterable[str], *, keep_old: bool = False
) -> list[dict[str, Any]]:
    """The claim's conditions with `new` merged in by type (upstream's Merge*ConditionsOfPVC).

    Conditions whose type is not one of `kinds` (another loop's) stay; old
    conditions of `kinds` stay only with `keep_old`; a new condition
    replaces an old one of its type.
    """
    mine = set(kinds)
    by_type = {c["type"]: c for c in new}
    out: list[dict[str, Any]] = []
    for c in (pvc.get("status") or {}).get("conditions") or []:
        t = c.get("type")
        if t not in mine:
            out.append(c)
        elif t in by_type:
            out.append(by_type.pop(t))
        elif keep_old:
            out.append(c)
    return out + list(by_type.values())


# ----------------------------------------------------------------- events


class EventRecorder:
    """Writes core/v1 Events about the objects a loop works on (best effort: never fails a sync).

    Repeats of the same (object, reason, message) within a process bump
    `count` on the event already written instead of creating another, the way
    client-go's recorder aggregates, so a retried failure costs one request per
    retry at most and no unbounded stream of objects.
    """

    def __init__(self, api: KubeAPI, component: str, *, enabled: bool = True) -> None:
        self.api = api
        self.component = component
        self.enabled = enabled
        self._seen: dict[tuple[str, str, str, str], Obj] = {}

    async def event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        if not self.enabled:
            return
        m = obj.get("metadata", {})
        ns = m.get("namespace") or "default"
        key = (k.uid_of(obj), type_, reason, message)
        now = rfc3339()
        try:
            prev = self._seen.get(key)
            if prev is not None:
                patched = await self.api.patch(
                    EVENT,
                    k.name_of(prev),
                    {"count": int(prev.get("count", 1)) + 1, "lastTimestamp": now},
                    ns,
                )
                self._seen[key] = patched
                return
            created = await self.api.create(
                EVENT,
                {
                    "metadata": {
                        "name": f"{m.get('name', 'object')}.{uuid.uuid4().hex[:16]}",
                        "namespace": ns,
                    },
                    "involvedObject": {
                        "kind": obj.get("kind", ""),
                        "apiVersion": obj.get("apiVersion", ""),
                        "name": m.get("name", ""),
                        "namespace": m.get("namespace", ""),
                        "uid": m.get("uid", ""),
                        "resourceVersion": m.get("resourceVersion", ""),
                    },
                    "type": type_,
                    "reason": reason,
                    "message": message,
                    "count": 1,
                    "firstTimestamp": now,
                    "lastTimestamp": now,
                    "source": {"component": self.component},
                    "reportingComponent": self.component,
                },
                ns,
            )
            if len(self._seen) > 4096:
                self._seen.clear()
            self._seen[key] = created
        except ApiError as e:
            log.info("cannot record event %s on %s: %s", reason, k.key_of(obj), e)
