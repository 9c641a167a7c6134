"""Capacity tracking: CSIStorageCapacity objects from GetCapacity, per class and topology segment.

What external-provisioner's capacity controller publishes, for the scheduler
to place WaitForFirstConsumer pods where a volume fits: one
storage.k8s.io/v1 CSIStorageCapacity per (StorageClass of the driver, topology
segment), in the driver's namespace, named `csisc-<random>` and found again
through its labels `csi.storage.k8s.io/drivername` and
`csi.storage.k8s.io/managed-by` (`external-provisioner`, or
`external-provisioner-<node>` in per-node mode -- the same values upstream
uses, so either can take over the other's objects).

Segments come from the nodes: each CSINode that lists the driver names the
topology keys, the Node's labels give the values.  In per-node mode the only
segment is this node's own.  GetCapacity is asked every `poll_interval`
(upstream's default: one minute) and on class changes; an object is written
only when its numbers change, and removed when its class or segment goes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from csi_kit.k8s.objects.quantity import format_quantity
from csi_kit.k8s.objects.resources import CSI_NODE, CSI_STORAGE_CAPACITY, NODE, STORAGE_CLASS
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
from csi_kit.k8s.runtime.controller import Loop
from csi_kit.k8s.runtime.csi import Capability, CSICallError, DriverInfo
from csi_kit.k8s.runtime.informer import InformerFactory
from csi_kit.k8s.volume.provisioner import ProvisioningError, driver_parameters

log = logging.getLogger(__name__)

LABEL_DRIVER = "csi.storage.k8s.io/drivername"
LABEL_MANAGED_BY = "csi.storage.k8s.io/managed-by"
MANAGED_BY = "external-provisioner"
KEY = "all"


class CapacityDriver(Protocol):
    async def get_capacity(
        self, parameters: dict[str, str], topology: dict[str, str] | None, capabilities: list[Capability]
    ) -> tuple[int, int | None]: ...


def _segment_key(seg: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(seg.items()))


class CapacityTracker(Loop):
    name = "capacity"

    def __init__(
        self,
        api: KubeAPI,
        driver: CapacityDriver,
        info: DriverInfo,
        namespace: str,
        *,
        informers: InformerFactory | None = None,
        node_name: str | None = None,
        node_topology: dict[str, str] | None = None,
        poll_interval: float = 60.0,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
    ) -> None:
        super().__init__(informers=informers, workers=1, base_delay=base_delay, max_delay=max_delay)
        if node_name is not None and node_topology is None:
            raise ValueError("per-node capacity tracking needs the node's topology")
        self.api = api
        self.driver = driver
        self.driver_name = info.name
        self.namespace = namespace
        self.node_name = node_name
        self.node_topology = node_topology
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
        async def tick() -> None:
            while True:
                self.work.add(KEY)
                await asyncio.sleep(self.poll_interval)

        ticker = asyncio.create_task(tick())
        try:
            await super().run()
        finally:
            ticker.cancel()

    def segments(self) -> list[dict[str, str] | None]:
        if not self.topology_aware:
            return [None]
        if self.node_topology is not None:
            return [dict(self.node_topology)]
        out: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        for csinode in self.csinodes.items():
            keys: list[str] = []
            for d in (csinode.get("spec") or {}).get("drivers") or []:
                if d.get("name") == self.driver_name:
                    keys = list(d.get("topologyKeys") or [])
            node = self.nodes.get(k.name_of(csinode))
            if not keys or node is None:
                continue
            labels = k.labels_of(node)
            if all(key in labels for key in keys):
                seg = {key: labels[key] for key in keys}
                out[_segment_key(seg)] = seg
        return list(out.values())

    async def sync(self, key: str) -> None:
        classes = [c for c in self.classes.items() if c.get("provisioner") == self.driver_name]
        wanted: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Obj, dict[str, str] | None]] = {}
        for cls in classes:
            for seg in self.segments():
                wanted[(k.name_of(cls), _segment_key(seg or {}))] = (cls, seg)
        existing: dict[tuple[str, tuple[tuple[str, str], ...]], Obj] = {}
        for obj in self.objects.items():
            seg = ((obj.get("nodeTopology") or {}).get("matchLabels")) or {}
            ident = (str(obj.get("storageClassName")), _segment_key(seg))
            if ident in existing or ident not in wanted:
                await self._delete(obj)  # a duplicate, or its class/segment is gone
                continue
            existing[ident] = obj
        failed = False
        for ident, (cls, seg) in wanted.items():
            try:
                params = driver_parameters({str(a): str(b) for a, b in (cls.get("parameters") or {}).items()})
                available, maximum = await self.driver.get_capacity(params, seg, [])
            except (CSICallError, ProvisioningError) as e:
                log.warning("GetCapacity for class %s segment %s: %s", ident[0], seg, e)
                failed = True
                continue
            await self._store(existing.get(ident), k.name_of(cls), seg, available, maximum)
        if failed:
            raise RuntimeError("some GetCapacity calls failed")

    async def _store(
        self, obj: Obj | None, cls: str, seg: dict[str, str] | None, available: int, maximum: int | None
    ) -> None:
        fields: dict[str, Any] = {"capacity": format_quantity(available)}
        if maximum is not None:
            fields["maximumVolumeSize"] = format_quantity(maximum)
        if obj is None:
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

    async def _delete(self, obj: Obj) -> None:
        try:
            await self.api.delete(CSI_STORAGE_CAPACITY, k.name_of(obj), self.namespace)
        except ApiError as e:
            if not k.is_not_found(e):
                raise
        self.objects.store_delete(obj)
