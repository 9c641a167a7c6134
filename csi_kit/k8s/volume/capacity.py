"""Capacity tracking: CSIStorageCapacity objects from GetCapacity, per class and topology segment.

What external-provisioner's capacity controller publishes, for the scheduler
to place WaitForFirstConsumer pods where a volume fits: one
storage.k8s.io/v1 CSIStorageCapacity per (StorageClass of the driver, topology
segment), in the driver's namespace, named `csisc-<random>` and found again
through its labels `csi.storage.k8s.io/drivername` and
`csi.storage.k8s.io/managed-by` (`external-provisioner`, or
`external-provisioner-<node>` in per-node mode -- the same values upstream
uses, so either can take over the other's objects).

Only classes with `volumeBindingMode: WaitForFirstConsumer` get objects, as
upstream by default: the scheduler reads capacity only for those (an
Immediate claim is provisioned before any pod is placed).
`capacity_for_immediate_binding=True` (upstream's
`--capacity-for-immediate-binding`) publishes them for Immediate classes too.
Objects of a class that is not (or no longer) eligible are removed, like
those of a class or segment that went.

Segments come from the nodes: each CSINode that lists the driver names the
topology keys, the Node's labels give the values.  In per-node mode the only
segment is this node's own.  GetCapacity is asked every `poll_interval`
(upstream's default: one minute) and on class changes; an object is written
only when its numbers change, and removed when its class or segment goes.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from csi_kit.k8s.objects.names import sanitize_lease_name
from csi_kit.k8s.objects.quantity import format_quantity
from csi_kit.k8s.objects.resources import CSI_NODE, CSI_STORAGE_CAPACITY, NODE, STORAGE_CLASS
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.context import LoopContext, Planned
from csi_kit.k8s.runtime.csi import Capability, CSICallError, DriverInfo
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.volume.base import VolumeLoop
from csi_kit.k8s.volume.protocol import (
    ProvisioningError,
    class_parameters,
    driver_parameters,
    is_late_binding,
    topology_keys,
)

log = logging.getLogger(__name__)

LABEL_DRIVER = "csi.storage.k8s.io/drivername"
LABEL_MANAGED_BY = "csi.storage.k8s.io/managed-by"
MANAGED_BY = "external-provisioner"
KEY = "all"

SegmentKey = tuple[tuple[str, str], ...]
Ident = tuple[str, SegmentKey]  # (class name, segment) of one object


class CapacityDriver(Protocol):
    async def get_capacity(
        self, parameters: dict[str, str], topology: dict[str, str] | None, capabilities: list[Capability]
    ) -> tuple[int, int | None]: ...


def _segment_key(seg: dict[str, str] | None) -> SegmentKey:
    return tuple(sorted((seg or {}).items()))


def _ident(obj: Obj) -> Ident:
    seg = (obj.get("nodeTopology") or {}).get("matchLabels") or {}
    return str(obj.get("storageClassName")), _segment_key(seg)


class CapacityTracker(VolumeLoop[CapacityDriver]):
    name = "capacity"

    def __init__(
        self,
        api: KubeAPI,
        driver: CapacityDriver,
        info: DriverInfo,
        namespace: str,
        *,
        node_name: str | None = None,
        node_topology: dict[str, str] | None = None,
        capacity_for_immediate_binding: bool = False,
        poll_interval: float = 60.0,
        informers: InformerFactory | None = None,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
    ) -> None:
        if node_name is not None and node_topology is None:
            raise ValueError("per-node capacity tracking needs the node's topology")
        # One worker: each sync is one full pass over the classes and segments.
        super().__init__(
            api, driver, info, informers=informers, workers=1, base_delay=base_delay, max_delay=max_delay
        )
        self.namespace = namespace
        self.node_name = node_name
        self.node_topology = node_topology
        self.immediate_binding = capacity_for_immediate_binding
        self.poll_interval = poll_interval
        self.topology_aware = "VOLUME_ACCESSIBILITY_CONSTRAINTS" in info.plugin_capabilities
        self.managed_by = MANAGED_BY if node_name is None else f"{MANAGED_BY}-{node_name}"
        selector = f"{LABEL_DRIVER}={self.driver_name},{LABEL_MANAGED_BY}={self.managed_by}"
        self.classes = self.informer(api, STORAGE_CLASS)
        self.objects = self.informer(api, CSI_STORAGE_CAPACITY, namespace=namespace, label_selector=selector)
        if node_name is None and self.topology_aware:
            self.csinodes = self.informer(api, CSI_NODE)
            self.nodes = self.informer(api, NODE)
            self.csinodes.add_handler(self._poke)
            self.nodes.add_handler(self._poke)
        self.work = self.queue("sync", self.sync)
        self.classes.add_handler(self._poke)
        self.objects.add_handler(self._on_object)

    def _on_object(self, event: str, old: Obj | None, new: Obj | None) -> None:
        # Our own writes are in the cache before their events (which then arrive as
        # MODIFIED): ADDED or DELETED means someone else touched our objects.
        if event in ("ADDED", "DELETED"):
            self.work.add(KEY)

    def _poke(self, event: str, old: Obj | None, new: Obj | None) -> None:
        self.work.add(KEY)

    async def run(self) -> None:
        await self.run_polling(self.work, KEY, self.poll_interval)

    def _node_segment(self, csinode: Obj) -> dict[str, str] | None:
        """A registered node's segment: its labels under the keys its CSINode lists, if it has them all."""
        keys = topology_keys(csinode, self.driver_name)
        node = self.nodes.get(k.name_of(csinode))
        if not keys or node is None:
            return None
        labels = k.labels_of(node)
        return {key: labels[key] for key in keys} if all(key in labels for key in keys) else None

    def segments(self) -> list[dict[str, str] | None]:
        if not self.topology_aware:
            return [None]
        if self.node_topology is not None:
            return [dict(self.node_topology)]
        out: dict[SegmentKey, dict[str, str]] = {}
        for csinode in self.csinodes.items():
            seg = self._node_segment(csinode)
            if seg is not None:
                out[_segment_key(seg)] = seg
        return list(out.values())

    def eligible(self, cls: Obj) -> bool:
        """Whether the class gets capacity objects: the driver's, and WaitForFirstConsumer unless asked."""
        return cls.get("provisioner") == self.driver_name and (self.immediate_binding or is_late_binding(cls))

    def wanted(self) -> dict[Ident, tuple[Obj, dict[str, str] | None]]:
        """(class, segment) of every object there should be."""
        segments = self.segments()
        return {
            (k.name_of(cls), _segment_key(seg)): (cls, seg)
            for cls in self.classes.items()
            if self.eligible(cls)
            for seg in segments
        }

    async def sync(self, key: str) -> None:
        wanted = self.wanted()
        existing: dict[Ident, Obj] = {}
        for obj in self.objects.items():
            ident = _ident(obj)
            if ident in existing or ident not in wanted:
                await self._delete(obj)  # a duplicate, or its class/segment is gone or not eligible
                continue
            existing[ident] = obj
        ok = [await self._refresh(existing.get(ident), cls, seg) for ident, (cls, seg) in wanted.items()]
        if not all(ok):
            raise RuntimeError("some GetCapacity calls failed")

    async def _refresh(self, obj: Obj | None, cls: Obj, seg: dict[str, str] | None) -> bool:
        """GetCapacity for one (class, segment), its object brought up to date; False if the call failed."""
        try:
            params = driver_parameters(class_parameters(cls))
            available, maximum = await self.driver.get_capacity(params, seg, [])
        except (CSICallError, ProvisioningError) as e:
            log.warning("GetCapacity for class %s segment %s: %s", k.name_of(cls), seg, e)
            return False
        await self._store(obj, k.name_of(cls), seg, available, maximum)
        return True

    async def _store(
        self, obj: Obj | None, cls: str, seg: dict[str, str] | None, available: int, maximum: int | None
    ) -> None:
        fields: dict[str, Any] = {"capacity": format_quantity(available)}
        if maximum is not None:
            fields["maximumVolumeSize"] = format_quantity(maximum)
        if obj is None:
            await self._create(cls, seg, fields)
            return
        if all(obj.get(f) == v for f, v in fields.items()) and (
            maximum is not None or "maximumVolumeSize" not in obj
        ):
            return
        patch: Obj = dict(fields)
        if maximum is None:
            patch["maximumVolumeSize"] = None
        self.objects.store_update(
            await self.api.patch(CSI_STORAGE_CAPACITY, k.name_of(obj), patch, self.namespace)
        )

    async def _create(self, cls: str, seg: dict[str, str] | None, fields: dict[str, Any]) -> None:
        body: Obj = {
            "metadata": {
                "generateName": "csisc-",
                "namespace": self.namespace,
                "labels": {LABEL_DRIVER: self.driver_name, LABEL_MANAGED_BY: self.managed_by},
            },
            "storageClassName": cls,
            **fields,
        }
        if seg is not None:
            body["nodeTopology"] = {"matchLabels": dict(seg)}
        self.objects.store_update(await self.api.create(CSI_STORAGE_CAPACITY, body, self.namespace))

    async def _delete(self, obj: Obj) -> None:
        try:
            await self.api.delete(CSI_STORAGE_CAPACITY, k.name_of(obj), self.namespace)
        except ApiError as e:
            if not k.is_not_found(e):
                raise
        self.objects.store_delete(obj)


# ---------------------------------------------------------------------- wiring
# The loop's factory, listed in k8s/registry.py; kept by the wiring (the module's owner works above).


async def build(ctx: LoopContext) -> list[Planned]:
    """The capacity tracker: upstream runs it inside the provisioner; ours is elected alone
    (`<driver>-capacity`), or runs per node with --node-deployment."""
    a, info = ctx.args, ctx.info
    node = await ctx.node()
    if "GET_CAPACITY" not in info.controller_capabilities:
        return []
    loop = CapacityTracker(
        ctx.clients.api_for("capacity"),
        ctx.csi,
        info,
        a.capacity_namespace or ctx.namespace,
        informers=ctx.clients.informers,
        node_name=None if node is None else node[0],
        node_topology=None if node is None else node[1],
        capacity_for_immediate_binding=a.capacity_for_immediate_binding,
        poll_interval=a.capacity_poll_interval,
        **ctx.timing,
    )
    return [Planned(loop, None if node else sanitize_lease_name(info.name) + "-capacity")]
