"""Test kit for the volume loops: a scriptable CSI driver, the cluster's own controllers, and helpers.

`VolumeCSI` serves real gRPC (the loops reach it through `CSIClient`
exactly as they reach a real driver) and lets a test script errors, hold a
call in flight, or change capabilities.  `ClusterSim` plays the parts of a
cluster that are not ours but that the story needs: the PV controller of
kube-controller-manager (storage-provisioner annotation, PV↔PVC binding, the
Released phase).  `KubeletSim` plays the kubelet's node expansion as kubelet
1.36 does it (its NodeExpander), conflicts included.  The simulators'
requests are counted apart (`requests`) so figures only count what our loops
cost.  Waiting and running loops as tasks are the same for both families of
loops: they are written once in k8s_helpers and re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, Self, TypeVar

import grpc
import grpc.aio
from google.protobuf import wrappers_pb2
from k8s_helpers import eventually as eventually
from k8s_helpers import run_tasks as run_tasks
from k8s_helpers import stop_tasks as stop_tasks

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit.k8s.objects.quantity import format_quantity, parse_quantity
from csi_kit.k8s.objects.resources import (
    CSI_NODE,
    NODE,
    PV,
    PVC,
    STORAGE_CLASS,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CONTENT,
)
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj, is_conflict
from csi_kit.k8s.runtime.controller import Loop, Retry
from csi_kit.k8s.runtime.csi import CSIClient, DriverInfo
from csi_kit.k8s.runtime.informer import Informer
from csi_kit.k8s.volume.resizer import Resizer
from csi_kit.testing.fake_k8s import FakeKubeAPI

DRIVER = "vol.csi-kit.io"
TOPO_KEY = "topology.vol.csi-kit.io/node"
GiB = 1 << 30

CCap = pb.ControllerServiceCapability.RPC


class VolumeCSI(pbg.IdentityServicer, pbg.ControllerServicer, pbg.NodeServicer):
    def __init__(self, name: str = DRIVER, *, node_id: str = "node-1") -> None:
        self.name = name
        self.node_id = node_id
        self.topology_aware = True
        self.controller_caps = {
            "CREATE_DELETE_VOLUME",
            "CLONE_VOLUME",
            "EXPAND_VOLUME",
            "PUBLISH_UNPUBLISH_VOLUME",
            "GET_CAPACITY",
            "CREATE_DELETE_SNAPSHOT",
        }
        self.node_expansion_required = False
        self.ready = True
        self.volumes: dict[str, pb.Volume] = {}  # by CreateVolume name
        self.calls: Counter[str] = Counter()
        self.errors: dict[str, list[tuple[grpc.StatusCode, str]]] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.requests: dict[str, list[Any]] = {}
        self.deleted: list[str] = []
        self.published: set[tuple[str, str]] = set()
        self.capacity: dict[str, int] = {}  # node → available bytes
        self.node_caps = {"STAGE_UNSTAGE_VOLUME", "EXPAND_VOLUME", "GET_VOLUME_STATS"}
        #: Awaited inside each NodeExpandVolume: how long the node's resize2fs/xfs_growfs "takes".
        self.node_expand_work: Callable[[], Awaitable[None]] | None = None

    def fail(self, method: str, code: grpc.StatusCode, message: str = "injected", times: int = 1) -> None:
        self.errors.setdefault(method, []).extend([(code, message)] * times)

    def hold(self, method: str) -> asyncio.Event:
        """Hold the next calls of `method` until the returned event is set."""
        gate = asyncio.Event()
        self.gates[method] = gate
        return gate

    async def _enter(self, method: str, request: Any, context: Any) -> None:
        self.calls[method] += 1
        self.requests.setdefault(method, []).append(request)
        self.started.setdefault(method, asyncio.Event()).set()
        gate = self.gates.get(method)
        if gate is not None:
            await gate.wait()
        errs = self.errors.get(method)
        if errs:
            code, msg = errs.pop(0)
            await context.abort(code, msg)

    # Identity
    async def GetPluginInfo(self, request: Any, context: Any) -> Any:
        return pb.GetPluginInfoResponse(name=self.name, vendor_version="0.1")

    async def GetPluginCapabilities(self, request: Any, context: Any) -> Any:
        S = pb.PluginCapability.Service
        caps = [pb.PluginCapability(service=S(type=S.CONTROLLER_SERVICE))]
        if self.topology_aware:
            caps.append(pb.PluginCapability(service=S(type=S.VOLUME_ACCESSIBILITY_CONSTRAINTS)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    async def Probe(self, request: Any, context: Any) -> Any:
        await self._enter("Probe", request, context)
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self.ready))

    # Controller
    async def ControllerGetCapabilities(self, request: Any, context: Any) -> Any:
        caps = [
            pb.ControllerServiceCapability(rpc=CCap(type=CCap.Type.Value(c)))
            for c in sorted(self.controller_caps)
        ]
        return pb.ControllerGetCapabilitiesResponse(capabilities=caps)

    async def CreateVolume(self, request: Any, context: Any) -> Any:
        await self._enter("CreateVolume", request, context)
        vol = self.volumes.get(request.name)
        if vol is None:
            vol = pb.Volume(
                volume_id="vol-" + uuid.uuid4().hex[:8],
                capacity_bytes=max(request.capacity_range.required_bytes, 1),
                volume_context={"made-by": "scripted"},
            )
            if request.HasField("volume_content_source"):
                vol.content_source.CopyFrom(request.volume_content_source)
            if self.topology_aware:
                req = request.accessibility_requirements
                chosen = (
                    list(req.preferred)
                    or list(req.requisite)
                    or [pb.Topology(segments={TOPO_KEY: self.node_id})]
                )[0]
                vol.accessible_topology.append(pb.Topology(segments=dict(chosen.segments)))
            self.volumes[request.name] = vol
        return pb.CreateVolumeResponse(volume=vol)

    async def DeleteVolume(self, request: Any, context: Any) -> Any:
        await self._enter("DeleteVolume", request, context)
        for name, v in list(self.volumes.items()):
            if v.volume_id == request.volume_id:
                del self.volumes[name]
        self.deleted.append(request.volume_id)
        return pb.DeleteVolumeResponse()

    async def ControllerExpandVolume(self, request: Any, context: Any) -> Any:
        await self._enter("ControllerExpandVolume", request, context)
        for v in self.volumes.values():
            if v.volume_id == request.volume_id:
                v.capacity_bytes = max(v.capacity_bytes, request.capacity_range.required_bytes)
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=request.capacity_range.required_bytes,
            node_expansion_required=self.node_expansion_required,
        )

    async def ControllerModifyVolume(self, request: Any, context: Any) -> Any:
        await self._enter("ControllerModifyVolume", request, context)
        return pb.ControllerModifyVolumeResponse()

    async def ControllerPublishVolume(self, request: Any, context: Any) -> Any:
        await self._enter("ControllerPublishVolume", request, context)
        self.published.add((request.volume_id, request.node_id))
        return pb.ControllerPublishVolumeResponse(
            publish_context={"devicePath": f"/dev/fake/{request.volume_id}"}
        )

    async def ControllerUnpublishVolume(self, request: Any, context: Any) -> Any:
        await self._enter("ControllerUnpublishVolume", request, context)
        self.published.discard((request.volume_id, request.node_id))
        return pb.ControllerUnpublishVolumeResponse()

    async def GetCapacity(self, request: Any, context: Any) -> Any:
        await self._enter("GetCapacity", request, context)
        node = dict(request.accessible_topology.segments).get(TOPO_KEY, "")
        avail = self.capacity.get(node, 0)
        return pb.GetCapacityResponse(
            available_capacity=avail, maximum_volume_size=wrappers_pb2.Int64Value(value=avail // 2)
        )

    # Node
    async def NodeGetInfo(self, request: Any, context: Any) -> Any:
        return pb.NodeGetInfoResponse(
            node_id=self.node_id, accessible_topology=pb.Topology(segments={TOPO_KEY: self.node_id})
        )

    async def NodeGetCapabilities(self, request: Any, context: Any) -> Any:
        T = pb.NodeServiceCapability.RPC
        caps = [pb.NodeServiceCapability(rpc=T(type=T.Type.Value(c))) for c in sorted(self.node_caps)]
        return pb.NodeGetCapabilitiesResponse(capabilities=caps)

    async def NodeExpandVolume(self, request: Any, context: Any) -> Any:
        await self._enter("NodeExpandVolume", request, context)
        if self.node_expand_work is not None:
            await self.node_expand_work()
        return pb.NodeExpandVolumeResponse(capacity_bytes=request.capacity_range.required_bytes)


async def serve(peer: VolumeCSI, socket_path: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    pbg.add_IdentityServicer_to_server(peer, server)
    pbg.add_ControllerServicer_to_server(peer, server)
    pbg.add_NodeServicer_to_server(peer, server)
    server.add_insecure_port("unix://" + socket_path)
    await server.start()
    return server


@contextlib.asynccontextmanager
async def served(peer: VolumeCSI, socket_path: str) -> AsyncIterator[str]:
    server = await serve(peer, socket_path)
    try:
        yield "unix://" + socket_path
    finally:
        await server.stop(None)


# ------------------------------------------------------------- counting proxy


class CountingAPI:
    """Delegates to an API and counts the requests made through it."""

    def __init__(self, inner: KubeAPI) -> None:
        self.inner = inner
        self.count = 0

    async def get(self, *a: Any, **kw: Any) -> Any:
        self.count += 1
        return await self.inner.get(*a, **kw)

    async def list(self, *a: Any, **kw: Any) -> Any:
        self.count += 1
        return await self.inner.list(*a, **kw)

    def watch(self, *a: Any, **kw: Any) -> Any:
        self.count += 1
        return self.inner.watch(*a, **kw)

    async def create(self, *a: Any, **kw: Any) -> Any:
        self.count += 1
        return await self.inner.create(*a, **kw)

    async def update(self, *a: Any, **kw: Any) -> Any:
        self.count += 1
        return await self.inner.update(*a, **kw)

    async def update_status(self, *a: Any, **kw: Any) -> Any:
        self.count += 1
        return await self.inner.update_status(*a, **kw)

    async def patch(self, *a: Any, **kw: Any) -> Any:
        self.count += 1
        return await self.inner.patch(*a, **kw)

    async def delete(self, *a: Any, **kw: Any) -> Any:
        self.count += 1
        return await self.inner.delete(*a, **kw)


# -------------------------------------------------------------- cluster sim


class ClusterSim(Loop):
    """The PV controller's part of the story (kube-controller-manager), minimal but real on the fake API."""

    name = "pv-controller-sim"

    def __init__(self, api: FakeKubeAPI) -> None:
        super().__init__(workers=4, base_delay=0.01, max_delay=0.05)
        self.capi = CountingAPI(api)
        a: Any = self.capi
        self.api = a
        self.pvcs = Informer(a, PVC)
        self.pvs = Informer(a, PV)
        self.classes = Informer(a, STORAGE_CLASS)
        self.informers = [self.pvcs, self.pvs, self.classes]
        self.claim_q = self.queue("claim", self.sync_claim)
        self.pv_q = self.queue("pv", self.sync_pv)
        self.pvcs.add_handler(lambda e, o, n: self.claim_q.add(k.key_of(n or o)) if (n or o) else None)
        self.pvs.add_handler(self._on_pv)

    @property
    def requests(self) -> int:
        return self.capi.count

    def _on_pv(self, event: str, old: Obj | None, new: Obj | None) -> None:
        obj = new or old
        if obj is None:
            return
        self.pv_q.add(k.name_of(obj))
        ref = (obj.get("spec") or {}).get("claimRef") or {}
        if ref.get("name"):
            self.claim_q.add(f"{ref.get('namespace')}/{ref['name']}")

    async def sync_claim(self, key: str) -> None:
        pvc = self.pvcs.get(key)
        if pvc is None:
            for pv in self.pvs.items():
                ref = (pv.get("spec") or {}).get("claimRef") or {}
                if f"{ref.get('namespace')}/{ref.get('name')}" == key:
                    self.pv_q.add(k.name_of(pv))
            return
        spec = pvc.get("spec") or {}
        if spec.get("volumeName"):
            return
        ann = k.annotations_of(pvc)
        cls = self.classes.get(str(spec.get("storageClassName") or ""))
        if cls is not None and "volume.kubernetes.io/storage-provisioner" not in ann:
            upd = await self.api.patch(
                PVC,
                k.name_of(pvc),
                {
                    "metadata": {
                        "annotations": {"volume.kubernetes.io/storage-provisioner": cls["provisioner"]}
                    }
                },
                k.namespace_of(pvc),
            )
            self.pvcs.store_update(upd)
            return
        for pv in self.pvs.items():
            ref = (pv.get("spec") or {}).get("claimRef") or {}
            if ref.get("uid") == k.uid_of(pvc):
                await self._bind(pvc, pv)
                return

    async def _bind(self, pvc: Obj, pv: Obj) -> None:
        upd = await self.api.patch(
            PVC,
            k.name_of(pvc),
            {
                "metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
                "spec": {"volumeName": k.name_of(pv)},
            },
            k.namespace_of(pvc),
        )
        cap = (pv.get("spec") or {}).get("capacity") or {}
        upd = await self.api.patch(
            PVC,
            k.name_of(pvc),
            {
                "status": {
                    "phase": "Bound",
                    "capacity": dict(cap),
                    "accessModes": list((pv.get("spec") or {}).get("accessModes") or []),
                }
            },
            k.namespace_of(pvc),
            status=True,
        )
        self.pvcs.store_update(upd)
        if (pv.get("status") or {}).get("phase") != "Bound":
            pv2 = await self.api.patch(PV, k.name_of(pv), {"status": {"phase": "Bound"}}, status=True)
            self.pvs.store_update(pv2)

    async def sync_pv(self, name: str) -> None:
        pv = self.pvs.get(name)
        if pv is None:
            return
        ref = (pv.get("spec") or {}).get("claimRef") or {}
        phase = (pv.get("status") or {}).get("phase")
        if phase == "Bound":
            claim = self.pvcs.get(f"{ref.get('namespace')}/{ref.get('name')}")
            if claim is None or k.uid_of(claim) != ref.get("uid"):
                upd = await self.api.patch(PV, name, {"status": {"phase": "Released"}}, status=True)
                self.pvs.store_update(upd)
        elif phase is None:
            claim = self.pvcs.get(f"{ref.get('namespace')}/{ref.get('name')}")
            if claim is not None and k.uid_of(claim) == ref.get("uid"):
                self.claim_q.add(k.key_of(claim))


# ------------------------------------------------------------------ kubelet

KUBELET_DIR = "/var/lib/kubelet"
NODE_RESIZE_IN_PROGRESS = "NodeResizeInProgress"
NODE_RESIZE_PENDING = "NodeResizePending"
NODE_RESIZE_INFEASIBLE = "NodeResizeInfeasible"
#: Final CSI errors that make a node expansion infeasible (kubelet's csi expander).
_NODE_INFEASIBLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND}
_NON_FINAL = {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
_RESIZE_CONDITIONS = {"Resizing", "FileSystemResizePending", "ControllerResizeError", "NodeResizeError"}


def kubelet_paths(
    driver: str, pv_name: str, handle: str, pod_uid: str, *, block: bool = False
) -> dict[str, str]:
    """The paths kubelet 1.36 hands a CSI driver for one volume of one pod.

    `staging` (NodeStage), `target` (NodePublish) and `stats`: what the
    kubelet passes to NodeGetVolumeStats and NodeExpandVolume as volume_path.
    For a filesystem that is the publish target; for raw block it is the
    kubelet's own bind of the published device file under
    ``volumeDevices/<pv>/dev/<podUID>``, not the publish target.
    """
    csi = f"{KUBELET_DIR}/plugins/kubernetes.io/csi"
    if block:
        return {
            "staging": f"{csi}/volumeDevices/staging/{pv_name}",
            "target": f"{csi}/volumeDevices/publish/{pv_name}/{pod_uid}",
            "stats": f"{csi}/volumeDevices/{pv_name}/dev/{pod_uid}",
        }
    target = f"{KUBELET_DIR}/pods/{pod_uid}/volumes/kubernetes.io~csi/{pv_name}/mount"
    digest = hashlib.sha256(handle.encode()).hexdigest()
    return {"staging": f"{csi}/{driver}/{digest}/globalmount", "target": target, "stats": target}


class KubeletSim(Loop):
    """The kubelet's node expansion of the claims its pods use, as kubelet 1.36 does it.

    For a claim in `mounted` (a running pod on this node uses it) whose PV is
    larger than the claim's `status.capacity`, the NodeExpander: read the
    claim from the API; go on only when `allocatedResourceStatuses.storage`
    is NodeResizePending or NodeResizeInProgress; patch the status to
    NodeResizeInProgress with the resourceVersion just read as precondition;
    call NodeExpandVolume; then patch `status.capacity` (storage status and
    resize conditions cleared) with the resourceVersion of its own previous
    write.  A 409 on either write is counted in `conflicts` and retried with
    backoff from a fresh read, as the kubelet's reconciler does.  A final
    NodeExpandVolume error is recorded without precondition: the
    NodeResizeError condition, and NodeResizeInfeasible for
    InvalidArgument/OutOfRange/NotFound.  `trail` keeps each storage status
    the kubelet read, to show the cycle a fighting controller causes.
    """

    name = "kubelet-sim"

    def __init__(self, api: FakeKubeAPI, endpoint: str, *, driver: str = DRIVER) -> None:
        super().__init__(workers=1, base_delay=0.01, max_delay=0.05)
        self.capi = CountingAPI(api)
        a: Any = self.capi
        self.api = a
        self.driver = driver
        self.endpoint = endpoint
        self.pvcs = Informer(a, PVC)
        self.pvs = Informer(a, PV)
        self.informers = [self.pvcs, self.pvs]
        self.mounted: dict[str, str] = {}  # claim key → pod uid
        self.conflicts = 0
        self.expanded = 0
        self.trail: list[str] = []
        self.volume_q = self.queue("volume", self.sync_volume)
        self.pvcs.add_handler(lambda e, o, n: self.volume_q.add(k.key_of(n or o)) if (n or o) else None)
        self.pvs.add_handler(self._on_pv)
        self._channel: grpc.aio.Channel | None = None

    @property
    def requests(self) -> int:
        return self.capi.count

    def mount(self, name: str = "data", ns: str = "default") -> str:
        """A pod on this node now uses the claim; returns the pod's uid."""
        uid = str(uuid.uuid4())
        self.mounted[f"{ns}/{name}"] = uid
        self.volume_q.add(f"{ns}/{name}")
        return uid

    def _on_pv(self, event: str, old: Obj | None, new: Obj | None) -> None:
        ref = ((new or old or {}).get("spec") or {}).get("claimRef") or {}
        if ref.get("name"):
            self.volume_q.add(f"{ref.get('namespace')}/{ref['name']}")

    async def run(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.endpoint)
        try:
            await super().run()
        finally:
            await self._channel.close()

    async def _patch_status(self, pvc: Obj, status: Obj, *, checked: bool) -> Obj:
        body: Obj = {"status": status}
        if checked:
            body["metadata"] = {"resourceVersion": k.rv_of(pvc)}
        try:
            return dict(await self.api.patch(PVC, k.name_of(pvc), body, k.namespace_of(pvc), status=True))
        except ApiError as e:
            if is_conflict(e):
                self.conflicts += 1
                raise Retry(f"kubelet: {e}") from e
            raise

    async def sync_volume(self, key: str) -> None:
        if key not in self.mounted:
            return
        cached = self.pvcs.get(key)
        if cached is None or not (cached.get("spec") or {}).get("volumeName"):
            return
        pv = self.pvs.get(str(cached["spec"]["volumeName"]))
        if pv is None or ((pv.get("spec") or {}).get("csi") or {}).get("driver") != self.driver:
            return
        new_size = parse_quantity(((pv.get("spec") or {}).get("capacity") or {}).get("storage", 0))
        ns, name = k.split_key(key)
        pvc = await self.api.get(PVC, name, ns)  # the NodeExpander reads the claim afresh
        st = pvc.get("status") or {}
        if parse_quantity((st.get("capacity") or {}).get("storage", 0)) >= new_size:
            return  # nothing to grow (the kubelet's fsResizeRequired is false)
        phase = str((st.get("allocatedResourceStatuses") or {}).get("storage") or "")
        self.trail.append(phase)
        if phase not in (NODE_RESIZE_PENDING, NODE_RESIZE_IN_PROGRESS):
            return  # runPreCheck: not the node's turn; a later change of the claim wakes us again
        pvc = await self._patch_status(
            pvc, {"allocatedResourceStatuses": {"storage": NODE_RESIZE_IN_PROGRESS}}, checked=True
        )
        await self._node_expand(pvc, pv, new_size)
        others = set((pvc.get("status") or {}).get("allocatedResourceStatuses") or {}) - {"storage"}
        await self._patch_status(
            pvc,
            {
                "capacity": {"storage": format_quantity(new_size)},
                "allocatedResourceStatuses": {"storage": None} if others else None,
                "conditions": [
                    c
                    for c in (pvc.get("status") or {}).get("conditions") or []
                    if c.get("type") not in _RESIZE_CONDITIONS
                ]
                or None,
            },
            checked=True,
        )
        self.expanded += 1

    async def _node_expand(self, pvc: Obj, pv: Obj, new_size: int) -> None:
        assert self._channel is not None
        spec = pv.get("spec") or {}
        csi = spec.get("csi") or {}
        handle = str(csi.get("volumeHandle") or "")
        block = spec.get("volumeMode") == "Block"
        paths = kubelet_paths(self.driver, k.name_of(pv), handle, self.mounted[k.key_of(pvc)], block=block)
        node = pbg.NodeStub(self._channel)
        caps = await node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest())
        if not any(c.rpc.type == pb.NodeServiceCapability.RPC.EXPAND_VOLUME for c in caps.capabilities):
            return  # the kubelet skips the call and records the new size
        req = pb.NodeExpandVolumeRequest(
            volume_id=handle,
            volume_path=paths["stats"],
            staging_target_path=paths["staging"],
            capacity_range=pb.CapacityRange(required_bytes=new_size),
        )
        try:
            await node.NodeExpandVolume(req)
        except grpc.aio.AioRpcError as e:
            if e.code() not in _NON_FINAL:
                cond = {
                    "type": "NodeResizeError",
                    "status": "True",
                    "message": f"failed to expand pvc with {e.details()}",
                }
                status: Obj = {"conditions": [*((pvc.get("status") or {}).get("conditions") or []), cond]}
                if e.code() in _NODE_INFEASIBLE:
                    status["allocatedResourceStatuses"] = {"storage": NODE_RESIZE_INFEASIBLE}
                await self._patch_status(pvc, status, checked=False)
            raise


# ----------------------------------------------------------------- objects


async def settle(api: FakeKubeAPI, rounds: int = 40) -> None:
    last = -1
    quiet = 0
    while quiet < rounds:
        await asyncio.sleep(0.005)
        now = api.total_requests
        quiet = quiet + 1 if now == last else 0
        last = now


async def make_class(
    api: KubeAPI,
    name: str = "fast",
    *,
    driver: str = DRIVER,
    binding: str = "Immediate",
    policy: str = "Delete",
    expansion: bool = True,
    params: dict[str, str] | None = None,
    mount_options: list[str] | None = None,
    allowed: list[dict[str, list[str]]] | None = None,
) -> Obj:
    obj: Obj = {
        "metadata": {"name": name},
        "provisioner": driver,
        "reclaimPolicy": policy,
        "volumeBindingMode": binding,
        "allowVolumeExpansion": expansion,
        "parameters": dict(params or {}),
    }
    if mount_options:
        obj["mountOptions"] = mount_options
    if allowed:
        obj["allowedTopologies"] = [
            {"matchLabelExpressions": [{"key": key, "values": vals} for key, vals in term.items()]}
            for term in allowed
        ]
    return await api.create(STORAGE_CLASS, obj)


async def make_node(api: KubeAPI, name: str, *, driver: str = DRIVER, node_id: str | None = None) -> None:
    await api.create(NODE, {"metadata": {"name": name, "labels": {TOPO_KEY: name}}})
    await api.create(
        CSI_NODE,
        {
            "metadata": {"name": name},
            "spec": {"drivers": [{"name": driver, "nodeID": node_id or name, "topologyKeys": [TOPO_KEY]}]},
        },
    )


async def make_claim(
    api: KubeAPI,
    name: str = "data",
    ns: str = "default",
    *,
    cls: str = "fast",
    size: Any = "1Gi",
    modes: list[str] | None = None,
    node: str | None = None,
    source: dict[str, Any] | None = None,
    block: bool = False,
    annotate: str | None = None,
) -> Obj:
    ann: dict[str, str] = {}
    if node:
        ann["volume.kubernetes.io/selected-node"] = node
    if annotate:
        ann["volume.kubernetes.io/storage-provisioner"] = annotate
    spec: Obj = {
        "accessModes": modes or ["ReadWriteOnce"],
        "storageClassName": cls,
        "resources": {"requests": {"storage": size}},
        "volumeMode": "Block" if block else "Filesystem",
    }
    if source is not None:
        spec["dataSource"] = source
        spec["dataSourceRef"] = source
    return await api.create(
        PVC, {"metadata": {"name": name, "namespace": ns, "annotations": ann}, "spec": spec}
    )


async def make_ready_snapshot(
    api: FakeKubeAPI,
    name: str = "snap",
    ns: str = "default",
    *,
    handle: str = "snap-1",
    size: str = "1Gi",
    driver: str = DRIVER,
    ready: bool = True,
) -> Obj:
    snap = await api.create(
        VOLUME_SNAPSHOT,
        {"metadata": {"name": name, "namespace": ns}, "spec": {"source": {"persistentVolumeClaimName": "x"}}},
    )
    content_name = "snapcontent-" + k.uid_of(snap)
    content = await api.create(
        VOLUME_SNAPSHOT_CONTENT,
        {
            "metadata": {"name": content_name},
            "spec": {
                "driver": driver,
                "deletionPolicy": "Delete",
                "source": {"volumeHandle": "vol-src"},
                "volumeSnapshotRef": {"name": name, "namespace": ns, "uid": k.uid_of(snap)},
            },
        },
    )
    content["status"] = {"snapshotHandle": handle, "readyToUse": ready, "restoreSize": parse_quantity(size)}
    await api.update_status(VOLUME_SNAPSHOT_CONTENT, content)
    snap["status"] = {
        "boundVolumeSnapshotContentName": content_name,
        "readyToUse": ready,
        "restoreSize": size,
    }
    return await api.update_status(VOLUME_SNAPSHOT, snap)


def pv_for(api: FakeKubeAPI, pvc: Obj) -> Obj | None:
    return api.peek(PV, "pvc-" + k.uid_of(pvc))


def claim(api: FakeKubeAPI, name: str = "data", ns: str = "default") -> Obj | None:
    return api.peek(PVC, name, ns)


def bound(api: FakeKubeAPI, name: str = "data", ns: str = "default") -> bool:
    c = claim(api, name, ns)
    return bool(c and (c.get("status") or {}).get("phase") == "Bound")


async def make_bound(
    api: FakeKubeAPI,
    name: str = "data",
    ns: str = "default",
    *,
    size: str = "1Gi",
    driver: str = DRIVER,
    handle: str | None = None,
    csi_extra: dict[str, Any] | None = None,
) -> tuple[Obj, Obj]:
    """A claim bound to a PV of `driver`, as after provisioning and binding.

    Its StorageClass "fast" (made if missing) allows expansion, without which
    the API server's resize admission refuses a larger request.
    """
    if api.peek(STORAGE_CLASS, "fast") is None:
        await make_class(api, "fast", driver=driver)
    pvc = await api.create(
        PVC,
        {
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "fast",
                "resources": {"requests": {"storage": size}},
                "volumeName": f"pv-{name}",
            },
        },
    )
    pv = await api.create(
        PV,
        {
            "metadata": {"name": f"pv-{name}"},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Filesystem",
                "claimRef": {"namespace": ns, "name": name, "uid": k.uid_of(pvc)},
                "csi": {"driver": driver, "volumeHandle": handle or f"vol-{name}", **(csi_extra or {})},
            },
        },
    )
    pvc["status"] = {"phase": "Bound", "capacity": {"storage": size}}
    pvc = await api.update_status(PVC, pvc)
    return pvc, pv


# ----------------------------------------------------------------- one loop under test

L = TypeVar("L", bound=Loop)
FAST: dict[str, Any] = {"base_delay": 0.01, "max_delay": 0.05}


class LoopEnv(Generic[L]):
    """One of our loops in front of `client` (fast retries), run as a task from `start()` to `stop()`.

    A subclass says which loop `make` builds from the driver's info; a test may
    add tasks of its own to `tasks`, which `stop()` cancels too.
    """

    def __init__(self, api: FakeKubeAPI, client: CSIClient, peer: VolumeCSI | None = None) -> None:
        self.api = api
        self.client = client
        self.peer = peer  # the scripted driver behind `client`, if it is one
        self.tasks: list[asyncio.Task[None]] = []

    def make(self, info: DriverInfo) -> L:
        raise NotImplementedError

    async def start(self) -> L:
        loop = self.make(await self.client.driver_info())
        self.tasks += await run_tasks(loop)
        return loop

    async def stop(self) -> None:
        await stop_tasks(self.tasks)
        self.tasks = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class ResizerEnv(LoopEnv[Resizer]):
    def make(self, info: DriverInfo) -> Resizer:
        return Resizer(self.api, self.client, info, **FAST)
