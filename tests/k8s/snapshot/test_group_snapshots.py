"""Volume group snapshots end to end: the four snapshot loops on the fake API, the real hostPath driver.

A VolumeGroupSnapshot selects PVCs by label; the group loops cut one group
snapshot through the driver's GroupController and hand each member to the
single-snapshot loops as its own VolumeSnapshot, which must be ready and
restorable alone.  Deletion follows the policy; a driver without a
GroupController leaves a readable error; a crash at any write is recovered
from the API objects alone, with nothing cut twice.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from csi_peer import ScriptedCSI
from k8s_helpers import DRIVER as SCRIPTED_DRIVER
from k8s_helpers import (
    Crash,
    Recording,
    RestartOnCrash,
    as_user,
    cli_running,
    create_volume,
    eventually,
    granted,
    make_volume,
    manifest_docs,
    parse,
    running,
    settle,
    stop_tasks,
)

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit.k8s.cli import selected
from csi_kit.k8s.objects.resources import (
    LEASE,
    PV,
    PVC,
    SECRET,
    VOLUME_GROUP_SNAPSHOT,
    VOLUME_GROUP_SNAPSHOT_CLASS,
    VOLUME_GROUP_SNAPSHOT_CONTENT,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CONTENT,
)
from csi_kit.k8s.runtime.api import Obj, conflict
from csi_kit.k8s.runtime.controller import Loop
from csi_kit.k8s.runtime.csi import CSICallError, CSIClient, GroupSnapshotInfo, SnapshotInfo
from csi_kit.k8s.snapshot import group_controller as gc
from csi_kit.k8s.snapshot import group_snapshotter as gs
from csi_kit.k8s.snapshot import protocol as p
from csi_kit.k8s.snapshot.controller import SnapshotController
from csi_kit.k8s.snapshot.protocol import LABEL_MANAGED_BY
from csi_kit.k8s.snapshot.snapshotter import Snapshotter
from csi_kit.testing.driver import running_driver
from csi_kit.testing.fake_k8s import FakeKubeAPI

DRIVER = "hostpath.csi-kit.io"
NS = "default"
FAST = {"base_delay": 0.01, "max_delay": 0.1}


# ------------------------------------------------------------------ helpers


async def labelled_volume(
    api: FakeKubeAPI, name: str, handle: str, driver: str, app: str = "db", node: str | None = None
) -> None:
    await as_user(make_volume, api, name, NS, driver=driver, handle=handle, node=node, labels={"app": app})


async def group_class(api: FakeKubeAPI, driver: str, policy: str = "Delete", **params: str) -> None:
    await as_user(
        api.create,
        VOLUME_GROUP_SNAPSHOT_CLASS,
        {
            "metadata": {"name": "groups", "annotations": {p.ANN_GROUP_IS_DEFAULT_CLASS: "true"}},
            "driver": driver,
            "deletionPolicy": policy,
            "parameters": dict(params),
        },
    )


async def group_snapshot(api: FakeKubeAPI, name: str = "grp", app: str = "db") -> Obj:
    obj: Obj = await as_user(
        api.create,
        VOLUME_GROUP_SNAPSHOT,
        {
            "metadata": {"name": name, "namespace": NS},
            "spec": {"source": {"selector": {"matchLabels": {"app": app}}}},
        },
    )
    return obj


def peek_group(api: FakeKubeAPI, name: str = "grp") -> Obj | None:
    return api.peek(VOLUME_GROUP_SNAPSHOT, name, NS)


def group_ready(api: FakeKubeAPI, name: str = "grp") -> bool:
    o = peek_group(api, name)
    return bool(o and (o.get("status") or {}).get("readyToUse") is True)


def group_error(api: FakeKubeAPI, name: str = "grp") -> str:
    o = peek_group(api, name)
    return str(((o or {}).get("status") or {}).get("error", {}).get("message") or "")


def members(api: FakeKubeAPI) -> list[Obj]:
    return [s for s in api.objects(VOLUME_SNAPSHOT) if p.group_owner(s)]


def everything_gone(api: FakeKubeAPI) -> bool:
    return (
        peek_group(api) is None
        and not api.objects(VOLUME_GROUP_SNAPSHOT_CONTENT)
        and not api.objects(VOLUME_SNAPSHOT)
        and not api.objects(VOLUME_SNAPSHOT_CONTENT)
    )


class AllLoops:
    """The single-snapshot and group loops against one driver; restartable from nothing."""

    def __init__(self, api: FakeKubeAPI, endpoint: str, driver: str, node: str | None = None) -> None:
        self.api, self.endpoint, self.driver = api, endpoint, driver
        self.node = node  # distributed snapshotting: a per-node snapshotter for this node
        self.tasks: list[asyncio.Task[None]] = []
        self.clients: list[Any] = []

    async def start(self) -> None:
        client = CSIClient(self.endpoint, timeout=10)
        self.clients = [client]
        for loop in await self.loops(client):  # one after the other, each started before the next
            self.tasks.append(asyncio.create_task(loop.run()))
            await loop.started.wait()

    async def loops(self, client: CSIClient) -> list[Loop]:
        info = await client.driver_info()
        distributed = self.node is not None
        return [
            SnapshotController(self.api, distributed=distributed, **FAST),
            Snapshotter(self.api, client, self.driver, node_name=self.node, **FAST),
            gc.GroupSnapshotController(self.api, distributed=distributed, **FAST),
            gs.GroupSnapshotter(
                self.api,
                client,
                self.driver,
                supported=p.GROUP_CAPABILITY in info.group_capabilities,
                **FAST,
            ),
        ]

    async def stop(self) -> None:
        await stop_tasks(self.tasks)
        self.tasks.clear()
        for c in self.clients:
            await c.close()
        self.clients.clear()


@contextlib.asynccontextmanager
async def hostpath(
    tmp_path: os.PathLike[str], node: str | None = None
) -> AsyncIterator[tuple[FakeKubeAPI, str, AllLoops]]:
    """The real hostPath driver with two labelled PVCs (and an unlabelled one) and all four loops
    (with `node`: local PVs on that node and distributed snapshotting, as per-node DaemonSets run)."""
    api = FakeKubeAPI()
    with running_driver(str(tmp_path), driver_name=DRIVER) as endpoint:
        for name in ("data-0", "data-1"):
            await labelled_volume(api, name, await create_volume(endpoint, name), DRIVER, node=node)
        await labelled_volume(
            api, "other", await create_volume(endpoint, "other"), DRIVER, app="web", node=node
        )
        loops = AllLoops(api, endpoint, DRIVER, node)
        await loops.start()
        try:
            yield api, endpoint, loops
        finally:
            await loops.stop()


async def backend_group(endpoint: str, handle: str, snapshot_ids: list[str]) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(endpoint) as ch:
        try:
            await pbg.GroupControllerStub(ch).GetVolumeGroupSnapshot(
                pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=handle, snapshot_ids=snapshot_ids)
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK


async def backend_snapshot_count(endpoint: str) -> int:
    async with CSIClient(endpoint) as c:
        return len(await c.list_snapshots())


# --------------------------------------------------------------------- tests


def test_names_and_secrets() -> None:
    assert p.member_snapshot_name("u", "v").startswith("snapshot-")
    assert p.member_snapshot_name("u", "v")[len("snapshot-") :] == p.member_content_name("u", "v")[12:]
    assert p.member_snapshot_name("u", "v") != p.member_snapshot_name("u", "w")
    params = {p.GROUP_SECRET_NAME_KEY: "s-${volumegroupsnapshot.name}", p.GROUP_SECRET_NAMESPACE_KEY: "ns"}
    assert p.group_secret_ref(params, "c", "grp", NS) == ("s-grp", "ns")
    assert p.strip_group_params({**params, "k": "v"}) == {"k": "v"}
    with pytest.raises(ValueError, match="unknown parameter key"):
        p.strip_group_params({"csi.storage.k8s.io/snapshotter-secret-name": "x"})


async def test_group_snapshot_members_ready_and_restorable_alone(tmp_path: os.PathLike[str]) -> None:
    async with hostpath(tmp_path) as (api, endpoint, _):
        await group_class(api, DRIVER)
        grp = await group_snapshot(api)
        await eventually(lambda: group_ready(api), "group ready on the real driver", limit=60)

        uid = grp["metadata"]["uid"]
        final = peek_group(api)
        assert final is not None
        st = final["status"]
        assert st["boundVolumeGroupSnapshotContentName"] == f"groupsnapcontent-{uid}"
        assert st["creationTime"] and not st.get("error")
        assert final["spec"]["volumeGroupSnapshotClassName"] == "groups", "the default class is recorded"
        assert p.GROUP_BOUND_FINALIZER in final["metadata"]["finalizers"]

        content = api.peek(VOLUME_GROUP_SNAPSHOT_CONTENT, f"groupsnapcontent-{uid}")
        assert content is not None
        assert content["spec"]["volumeGroupSnapshotRef"]["uid"] == uid
        assert content["metadata"]["finalizers"] == [p.GROUP_CONTENT_BOUND_FINALIZER]
        assert p.ANN_GROUP_BEING_CREATED not in (content["metadata"].get("annotations") or {})
        handles = {pv["spec"]["csi"]["volumeHandle"]: pv["metadata"]["name"] for pv in api.objects(PV)}
        picked = sorted(h for h, pv in handles.items() if pv != "pv-other")
        assert sorted(content["spec"]["source"]["volumeHandles"]) == picked, (
            "the selector picks data-0/1 only"
        )
        infos = content["status"]["volumeSnapshotInfoList"]
        assert sorted(i["volumeHandle"] for i in infos) == picked
        group_handle = content["status"]["volumeGroupSnapshotHandle"]

        vss = members(api)
        assert len(vss) == 2
        for vs in vss:
            volume = next(
                i["volumeHandle"]
                for i in infos
                if p.member_snapshot_name(uid, i["volumeHandle"]) == vs["metadata"]["name"]
            )
            assert vs["status"]["readyToUse"] is True and vs["status"]["volumeGroupSnapshotName"] == "grp"
            assert vs["metadata"]["ownerReferences"][0]["uid"] == uid
            assert p.SNAPSHOT_IN_GROUP_FINALIZER in vs["metadata"]["finalizers"]
            vsc = api.peek(VOLUME_SNAPSHOT_CONTENT, vs["status"]["boundVolumeSnapshotContentName"])
            assert vsc is not None and vsc["metadata"]["name"] == p.member_content_name(uid, volume)
            assert vsc["spec"]["volumeSnapshotRef"]["uid"] == vs["metadata"]["uid"], "bound both ways"
            assert vsc["status"]["volumeGroupSnapshotHandle"] == group_handle
            # Restorable alone: its handle is a snapshot id the driver knows.
            restored = await create_volume(
                endpoint, f"restore-{volume[-6:]}", from_snapshot=vsc["status"]["snapshotHandle"]
            )
            assert restored

        assert (
            await backend_group(endpoint, group_handle, [i["snapshotHandle"] for i in infos])
            == grpc.StatusCode.OK
        )


async def _cut_then_delete(api: FakeKubeAPI, endpoint: str) -> tuple[str, list[str]]:
    await group_snapshot(api)
    await eventually(lambda: group_ready(api), "group ready", limit=60)
    [content] = api.objects(VOLUME_GROUP_SNAPSHOT_CONTENT)
    handle = content["status"]["volumeGroupSnapshotHandle"]
    ids = [i["snapshotHandle"] for i in content["status"]["volumeSnapshotInfoList"]]
    await as_user(api.delete, VOLUME_GROUP_SNAPSHOT, "grp", NS)
    await eventually(lambda: peek_group(api) is None, "group gone", limit=60)
    return handle, ids


async def test_delete_policy_removes_the_group_on_the_driver(tmp_path: os.PathLike[str]) -> None:
    async with hostpath(tmp_path) as (api, endpoint, _):
        await group_class(api, DRIVER, "Delete")
        handle, ids = await _cut_then_delete(api, endpoint)
        await eventually(lambda: everything_gone(api), "every object gone", limit=60)
        assert await backend_group(endpoint, handle, ids) == grpc.StatusCode.NOT_FOUND
        assert await backend_snapshot_count(endpoint) == 0


async def test_distributed_group_members_are_labelled_and_deleted_with_the_group(
    tmp_path: os.PathLike[str],
) -> None:
    """Per-node snapshotters only see contents labelled with their node: the group's member
    contents carry that label too, or their finalizers outlive the group (found on a real
    cluster with the per-node DaemonSet)."""
    async with hostpath(tmp_path, node="node-a") as (api, endpoint, _):
        await group_class(api, DRIVER, "Delete")
        await group_snapshot(api)
        await eventually(lambda: group_ready(api), "group ready", limit=60)
        member_contents = [vsc for vsc in api.objects(VOLUME_SNAPSHOT_CONTENT)]
        assert len(member_contents) == 2
        for vsc in member_contents:
            assert vsc["metadata"]["labels"] == {LABEL_MANAGED_BY: "node-a"}
        await as_user(api.delete, VOLUME_GROUP_SNAPSHOT, "grp", NS)
        await eventually(lambda: peek_group(api) is None, "group gone", limit=60)
        await eventually(lambda: not api.objects(VOLUME_SNAPSHOT_CONTENT), "member contents gone", limit=60)
        await eventually(lambda: not members(api), "member snapshots gone", limit=60)
        assert await backend_snapshot_count(endpoint) == 0


async def test_retain_policy_keeps_the_group(tmp_path: os.PathLike[str]) -> None:
    async with hostpath(tmp_path) as (api, endpoint, _):
        await group_class(api, DRIVER, "Retain")
        handle, ids = await _cut_then_delete(api, endpoint)
        await eventually(lambda: not members(api), "member snapshots gone", limit=60)
        [content] = api.objects(VOLUME_GROUP_SNAPSHOT_CONTENT)
        assert p.ANN_GROUP_BEING_DELETED in content["metadata"]["annotations"]
        assert not content["metadata"].get("deletionTimestamp")
        assert len(api.objects(VOLUME_SNAPSHOT_CONTENT)) == 2, "member contents kept with the group"
        assert await backend_group(endpoint, handle, ids) == grpc.StatusCode.OK
        assert await backend_snapshot_count(endpoint) == 2


async def test_driver_without_group_controller_reports_it(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    csi, endpoint = peer
    for name in ("a", "b"):
        await make_volume(api, name)
        pvc = api.peek(PVC, name, NS)
        assert pvc is not None
        await api.patch(PVC, name, {"metadata": {"labels": {"app": "db"}}}, NS)
    await group_class(api, SCRIPTED_DRIVER)
    loops = AllLoops(api, endpoint, SCRIPTED_DRIVER)
    await loops.start()
    try:
        await group_snapshot(api)
        await eventually(lambda: "does not support volume group snapshots" in group_error(api), "error")
        o = peek_group(api)
        assert o is not None and o["status"]["readyToUse"] is False
        assert not members(api)
        assert csi.calls["CreateSnapshot"] == 0, "no member is cut one by one instead"
        # Deleting it needs nothing from the driver.
        await api.delete(VOLUME_GROUP_SNAPSHOT, "grp", NS)
        await eventually(lambda: everything_gone(api), "gone")
    finally:
        await loops.stop()


async def test_missing_pvcs_and_class_are_reported(tmp_path: os.PathLike[str]) -> None:
    async with hostpath(tmp_path) as (api, _endpoint, _):
        await group_snapshot(api, "nobody", app="none")

        await eventually(lambda: "not applied to any PVC" in group_error(api, "nobody"), "no PVC error")
        await group_snapshot(api)
        await eventually(lambda: "cannot find default group snapshot class" in group_error(api), "no class")
        await group_class(api, DRIVER)
        await eventually(lambda: group_ready(api), "ready once the class exists", limit=60)
        o = peek_group(api)
        assert o is not None and not o["status"].get("error")


async def _import_group(api: FakeKubeAPI, endpoint: str) -> tuple[str, list[str], Obj]:
    """A group cut outside Kubernetes, then represented by a pre-provisioned content and its group.

    Returns the group's handle, its members' snapshot ids and the VolumeGroupSnapshot."""
    pvs = {pv["metadata"]["name"]: pv["spec"]["csi"]["volumeHandle"] for pv in api.objects(PV)}
    async with grpc.aio.insecure_channel(endpoint) as ch:
        r = await pbg.GroupControllerStub(ch).CreateVolumeGroupSnapshot(
            pb.CreateVolumeGroupSnapshotRequest(
                name="made-elsewhere", source_volume_ids=[pvs["pv-data-0"], pvs["pv-data-1"]]
            )
        )
    handle = r.group_snapshot.group_snapshot_id
    ids = [s.snapshot_id for s in r.group_snapshot.snapshots]
    await as_user(
        api.create,
        VOLUME_GROUP_SNAPSHOT_CONTENT,
        {
            "metadata": {"name": "imported"},
            "spec": {
                "deletionPolicy": "Delete",
                "driver": DRIVER,
                "source": {
                    "groupSnapshotHandles": {
                        "volumeGroupSnapshotHandle": handle,
                        "volumeSnapshotHandles": ids,
                    }
                },
                "volumeGroupSnapshotRef": {"name": "grp", "namespace": NS},
            },
        },
    )
    grp = await as_user(
        api.create,
        VOLUME_GROUP_SNAPSHOT,
        {
            "metadata": {"name": "grp", "namespace": NS},
            "spec": {"source": {"volumeGroupSnapshotContentName": "imported"}},
        },
    )
    return handle, ids, grp


async def _flow_with_crash(tmp_path: os.PathLike[str], crash: Crash, flow: str = "delete") -> None:
    """One group of two through its whole life; `flow` is delete, retain or pre-provisioned."""
    async with hostpath(tmp_path) as (api, endpoint, loops):
        await group_class(api, DRIVER, "Retain" if flow == "retain" else "Delete")
        api.reactors.append(crash)
        until = RestartOnCrash(loops, crash).until

        if flow == "pre-provisioned":
            await _import_group(api, endpoint)
        else:
            await group_snapshot(api)
        await until(lambda: group_ready(api), "ready")
        assert len(members(api)) == 2 and len(api.objects(VOLUME_SNAPSHOT_CONTENT)) == 2
        assert await backend_snapshot_count(endpoint) == 2, "one group of two was cut, never a second"
        [content] = api.objects(VOLUME_GROUP_SNAPSHOT_CONTENT)
        handle = content["status"]["volumeGroupSnapshotHandle"]
        ids = [i["snapshotHandle"] for i in content["status"]["volumeSnapshotInfoList"]]
        await as_user(api.delete, VOLUME_GROUP_SNAPSHOT, "grp", NS)
        if flow == "retain":
            await until(lambda: peek_group(api) is None and not members(api), "group and members gone")
            await settle(api)
            [kept] = api.objects(VOLUME_GROUP_SNAPSHOT_CONTENT)
            assert not kept["metadata"].get("deletionTimestamp")
            assert len(api.objects(VOLUME_SNAPSHOT_CONTENT)) == 2
            assert await backend_group(endpoint, handle, ids) == grpc.StatusCode.OK
            assert await backend_snapshot_count(endpoint) == 2, "Retain keeps the storage"
            return
        await until(lambda: everything_gone(api), "all gone")
        assert await backend_group(endpoint, handle, ids) == grpc.StatusCode.NOT_FOUND
        assert await backend_snapshot_count(endpoint) == 0, "nothing leaked on the backend"


WRITES_PER_FLOW = {"delete": 50, "retain": 40, "pre-provisioned": 50}


@pytest.mark.parametrize("flow", sorted(WRITES_PER_FLOW))
async def test_flow_counts_its_writes(tmp_path: os.PathLike[str], flow: str) -> None:
    counter = Crash(at=10**9)
    await _flow_with_crash(tmp_path, counter, flow)
    # The crash parametrisation below must reach every write of the flow.
    assert counter.writes <= WRITES_PER_FLOW[flow], counter.writes
    print(f"group of 2, {flow}: {counter.writes} loop writes")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flow", "at"), [(flow, at) for flow, n in sorted(WRITES_PER_FLOW.items()) for at in range(1, n + 1)]
)
async def test_restart_at_every_write(tmp_path: os.PathLike[str], flow: str, at: int) -> None:
    await _flow_with_crash(tmp_path, Crash(at), flow)


# ------------------------------------------------------------- CLI and RBAC


async def test_cli_runs_the_group_loops(tmp_path: os.PathLike[str]) -> None:
    args = parse(
        "--controllers", "snapshot,group-snapshot", "--kube-api-qps", "0",
        "--retry-interval-start", "0.01", "--retry-interval-max", "0.05",
    )  # fmt: skip
    assert selected(args) >= {"group-snapshot-controller", "group-snapshotter"}
    assert "group-snapshotter" not in selected(parse("--controllers", "all"))
    api = FakeKubeAPI()
    with running_driver(str(tmp_path), driver_name=DRIVER) as endpoint:
        for name in ("data-0", "data-1"):
            await labelled_volume(api, name, await create_volume(endpoint, name), DRIVER)
        await group_class(api, DRIVER)
        async with cli_running(args, endpoint, api):
            await group_snapshot(api)
            await eventually(lambda: group_ready(api), "group ready through the CLI", limit=60)
            assert len(members(api)) == 2


async def test_group_rbac_is_exactly_what_the_group_loops_use(tmp_path: os.PathLike[str]) -> None:
    d = manifest_docs()
    api = FakeKubeAPI()
    ctrl_api, snap_api = Recording(api), Recording(api)
    with running_driver(str(tmp_path), driver_name=DRIVER) as endpoint:
        for name in ("data-0", "data-1"):
            await labelled_volume(api, name, await create_volume(endpoint, name), DRIVER)
        await api.create(
            SECRET,
            {"metadata": {"name": "creds", "namespace": NS}, "data": {"k": base64.b64encode(b"v").decode()}},
        )
        await group_class(api, DRIVER, **{p.GROUP_SECRET_NAME_KEY: "creds", p.GROUP_SECRET_NAMESPACE_KEY: NS})
        client = CSIClient(endpoint)
        loops: list[Loop] = [
            SnapshotController(api, **FAST),
            Snapshotter(api, client, DRIVER, **FAST),
            gc.GroupSnapshotController(ctrl_api, **FAST),  # type: ignore[arg-type]
            gs.GroupSnapshotter(snap_api, client, DRIVER, **FAST),  # type: ignore[arg-type]
        ]
        try:
            async with running(*loops):
                await group_snapshot(api)
                await eventually(lambda: group_ready(api), "group ready", limit=60)
                [content] = api.objects(VOLUME_GROUP_SNAPSHOT_CONTENT)
                assert content["metadata"]["annotations"][p.ANN_GROUP_DELETION_SECRET_NAME] == "creds"
                await api.delete(VOLUME_GROUP_SNAPSHOT, "grp", NS)
                await eventually(lambda: everything_gone(api), "all gone", limit=60)
        finally:
            await client.close()
    # Granted but only reached after a crash between creating an object and caching it.
    rare = {
        ("group-snapshot-controller", p.GROUP_GROUP, "volumegroupsnapshotcontents", "get"),
        ("group-snapshot-controller", "snapshot.storage.k8s.io", "volumesnapshots", "get"),
        ("group-snapshot-controller", "snapshot.storage.k8s.io", "volumesnapshotcontents", "get"),
    }
    roles = {
        "group-snapshot-controller": (
            ctrl_api.used,
            granted(d[("ClusterRole", "csi-kit-group-snapshot-controller")]),
        ),
        "group-snapshotter": (
            snap_api.used,
            granted(d[("ClusterRole", "csi-kit-group-snapshotter")]),
        ),
    }
    for who, (used, allowed) in roles.items():
        assert used - allowed == set(), f"{who} uses verbs its role does not grant"
        unused = {x for x in allowed - used if (who, *x) not in rare}
        assert unused == set(), f"{who}'s role grants verbs it never uses"
    cls = d[("VolumeGroupSnapshotClass", "csi-kit-hostpath-group")]
    assert cls["apiVersion"] == VOLUME_GROUP_SNAPSHOT_CLASS.api_version and cls["driver"] == DRIVER
    assert cls["metadata"]["annotations"][p.ANN_GROUP_IS_DEFAULT_CLASS] == "true"


# ---------------------------------------------- scripted GroupController faults


class ScriptedGroups:
    """An in-process GroupController whose answers a test scripts (gates, errors).

    Members are also registered with the scripted single-snapshot driver, so
    its ListSnapshots knows them as a real driver would.
    """

    def __init__(self, csi: ScriptedCSI) -> None:
        self.csi = csi
        self.groups: dict[str, GroupSnapshotInfo] = {}  # by name
        self.names: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.create_errors: list[CSICallError] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def create_group_snapshot(
        self, name: str, volume_ids: list[str], parameters: dict[str, str], secrets: dict[str, str]
    ) -> GroupSnapshotInfo:
        self.calls["create"] += 1
        self.names.add(name)
        if self.create_errors:
            raise self.create_errors.pop(0)
        if name not in self.groups:  # the backend starts cutting at once, whatever happens to the caller
            now = time.time_ns()
            snaps = tuple(
                SnapshotInfo(f"{name}/{v}", v, 1 << 20, now, True, f"gid-{name}") for v in volume_ids
            )
            self.groups[name] = GroupSnapshotInfo(f"gid-{name}", snaps, now, True)
            for s in snaps:
                self.csi.add_existing(s.snapshot_id)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.groups[name]

    async def delete_group_snapshot(
        self, group_id: str, snapshot_ids: list[str], secrets: dict[str, str]
    ) -> None:
        self.calls["delete"] += 1
        for name, info in list(self.groups.items()):
            if info.group_snapshot_id == group_id:
                assert sorted(snapshot_ids) == sorted(s.snapshot_id for s in info.snapshots)
                del self.groups[name]

    async def get_group_snapshot(
        self, group_id: str, snapshot_ids: list[str], secrets: dict[str, str]
    ) -> GroupSnapshotInfo:
        self.calls["get"] += 1
        for info in self.groups.values():
            if info.group_snapshot_id == group_id:
                return info
        raise CSICallError("GetVolumeGroupSnapshot", grpc.StatusCode.NOT_FOUND, group_id)


class ScriptedLoops(AllLoops):
    def __init__(self, api: FakeKubeAPI, endpoint: str, groups: ScriptedGroups) -> None:
        super().__init__(api, endpoint, SCRIPTED_DRIVER)
        self.groups = groups

    async def loops(self, client: CSIClient) -> list[Loop]:
        return [
            SnapshotController(self.api, **FAST),
            Snapshotter(self.api, client, self.driver, **FAST),
            gc.GroupSnapshotController(self.api, **FAST),
            gs.GroupSnapshotter(self.api, self.groups, self.driver, **FAST),
        ]


@contextlib.asynccontextmanager
async def scripted(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> AsyncIterator[tuple[ScriptedGroups, ScriptedLoops]]:
    csi, endpoint = peer
    for name in ("a", "b"):
        await make_volume(api, name)
        await api.patch(PVC, name, {"metadata": {"labels": {"app": "db"}}}, NS)
    await group_class(api, SCRIPTED_DRIVER)
    groups = ScriptedGroups(csi)
    loops = ScriptedLoops(api, endpoint, groups)
    await loops.start()
    try:
        yield groups, loops
    finally:
        await loops.stop()


async def test_deletion_while_create_group_in_flight_leaks_nothing(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    async with scripted(api, peer) as (groups, _):
        groups.gate = asyncio.Event()
        await group_snapshot(api)
        await eventually(lambda: groups.started.is_set(), "CreateVolumeGroupSnapshot sent")
        await api.delete(VOLUME_GROUP_SNAPSHOT, "grp", NS)
        await settle(api)
        [content] = api.objects(VOLUME_GROUP_SNAPSHOT_CONTENT)
        assert p.ANN_GROUP_BEING_CREATED in content["metadata"]["annotations"], "the deletion waits"
        groups.gate.set()
        await eventually(lambda: everything_gone(api), "all gone")
        assert groups.groups == {} and groups.calls["delete"] == 1, "cut, recorded, then deleted"
        assert len(groups.names) == 1


async def test_restart_while_create_group_in_flight_reuses_the_name(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    async with scripted(api, peer) as (groups, loops):
        groups.gate = asyncio.Event()
        await group_snapshot(api)
        await eventually(lambda: groups.started.is_set(), "CreateVolumeGroupSnapshot sent")
        await loops.stop()  # the process dies with the call in flight; the backend finishes it anyway
        groups.gate.set()
        await loops.start()
        await eventually(lambda: group_ready(api), "ready after restart")
        assert len(groups.groups) == 1 and len(groups.names) == 1 and groups.calls["create"] >= 2
        assert len(members(api)) == 2


async def test_driver_errors_non_final_retried_final_reported(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    async with scripted(api, peer) as (groups, _):
        groups.create_errors = [
            CSICallError("CreateVolumeGroupSnapshot", grpc.StatusCode.UNAVAILABLE, "busy")
        ] * 2
        await group_snapshot(api)
        await eventually(lambda: group_ready(api), "ready after transient errors")
        assert groups.calls["create"] == 3 and len(groups.names) == 1
        assert not group_error(api)

        final = CSICallError(
            "CreateVolumeGroupSnapshot", grpc.StatusCode.INVALID_ARGUMENT, "volumes on two pools"
        )
        groups.create_errors = [final] * 1000
        await group_snapshot(api, "bad")
        await eventually(lambda: "volumes on two pools" in group_error(api, "bad"), "error mirrored")
        bad = peek_group(api, "bad")
        assert bad is not None and bad["status"]["readyToUse"] is False
        assert len(groups.names) == 2, "every retry of a group asks under the same name"
        groups.create_errors = []
        await eventually(lambda: group_ready(api, "bad"), "retried until the driver agrees")
        assert not group_error(api, "bad"), "the error is cleared on success"


async def test_member_deleted_alone_waits_for_its_group(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    async with scripted(api, peer) as (groups, _):
        await group_snapshot(api)
        await eventually(lambda: group_ready(api), "ready")
        one = members(api)[0]
        await api.delete(VOLUME_SNAPSHOT, one["metadata"]["name"], NS)
        await settle(api)
        kept = api.peek(VOLUME_SNAPSHOT, one["metadata"]["name"], NS)
        assert kept is not None and kept["metadata"]["finalizers"] == [p.SNAPSHOT_IN_GROUP_FINALIZER]
        assert len(groups.groups) == 1 and groups.calls["delete"] == 0, "a member's storage is the group's"
        await api.delete(VOLUME_GROUP_SNAPSHOT, "grp", NS)
        await eventually(lambda: everything_gone(api), "all gone")
        assert groups.groups == {}


async def test_pre_provisioned_group_binds_and_makes_members(tmp_path: os.PathLike[str]) -> None:
    async with hostpath(tmp_path) as (api, endpoint, _):
        handle, ids, grp = await _import_group(api, endpoint)
        await eventually(lambda: group_ready(api), "pre-provisioned group ready", limit=60)
        content = api.peek(VOLUME_GROUP_SNAPSHOT_CONTENT, "imported")
        assert (
            content is not None and content["spec"]["volumeGroupSnapshotRef"]["uid"] == grp["metadata"]["uid"]
        )
        assert content["metadata"]["finalizers"] == [p.GROUP_CONTENT_BOUND_FINALIZER]
        assert content["status"]["volumeGroupSnapshotHandle"] == handle
        assert sorted(i["snapshotHandle"] for i in content["status"]["volumeSnapshotInfoList"]) == sorted(ids)
        vss = members(api)
        assert len(vss) == 2 and all(v["status"]["readyToUse"] for v in vss)
        await as_user(api.delete, VOLUME_GROUP_SNAPSHOT, "grp", NS)
        await eventually(lambda: everything_gone(api), "all gone", limit=60)
        assert await backend_group(endpoint, handle, ids) == grpc.StatusCode.NOT_FOUND


async def test_pre_provisioned_content_mismatches_are_reported(tmp_path: os.PathLike[str]) -> None:
    async with hostpath(tmp_path) as (api, _endpoint, _):
        await group_class(api, DRIVER)
        await group_snapshot(api, "dyn")
        await eventually(lambda: group_ready(api, "dyn"), "dynamic group ready", limit=60)
        dyn = peek_group(api, "dyn")
        assert dyn is not None
        for name, content in (
            ("missing", "nope"),
            ("thief", dyn["status"]["boundVolumeGroupSnapshotContentName"]),
        ):
            await as_user(
                api.create,
                VOLUME_GROUP_SNAPSHOT,
                {
                    "metadata": {"name": name, "namespace": NS},
                    "spec": {"source": {"volumeGroupSnapshotContentName": content}},
                },
            )

        def err(name: str) -> str:
            o = peek_group(api, name)
            return str(((o or {}).get("status") or {}).get("error", {}).get("message") or "")

        await eventually(lambda: "is missing" in err("missing"), "missing content reported")
        await eventually(lambda: "bound to a different group snapshot" in err("thief"), "misbound reported")
        assert group_ready(api, "dyn"), "the other group's content is untouched"


async def test_watch_expiry_and_conflicts_converge(api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]) -> None:
    async with scripted(api, peer) as (groups, _):
        api.expire_watches()
        api.fail("patch", VOLUME_GROUP_SNAPSHOT, conflict("the object has been modified"), times=3)
        api.fail("patch", VOLUME_GROUP_SNAPSHOT_CONTENT, conflict("the object has been modified"), times=2)
        await group_snapshot(api)
        await eventually(lambda: group_ready(api), "ready despite 410 and 409s")
        assert len(groups.names) == 1 and len(members(api)) == 2
        grp = peek_group(api)
        assert grp is not None and grp["metadata"]["finalizers"] == [p.GROUP_BOUND_FINALIZER]


async def test_cli_group_loops_take_their_own_leases(api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]) -> None:
    _, endpoint = peer
    args = parse(
        "--controllers", "snapshot,group-snapshot", "--leader-election",
        "--leader-election-namespace", "kube-system", "--kube-api-qps", "0",
        "--leader-election-lease-duration", "0.6", "--leader-election-renew-deadline", "0.4",
        "--leader-election-retry-period", "0.05",
    )  # fmt: skip
    async with cli_running(args, endpoint, api):
        suffix = SCRIPTED_DRIVER.replace(".", "-")
        want = {
            "snapshot-controller-leader",
            f"external-snapshotter-leader-{suffix}",
            "snapshot-controller-group-leader",
            f"external-snapshotter-group-leader-{suffix}",
        }
        await eventually(lambda: {o["metadata"]["name"] for o in api.objects(LEASE)} == want, "four leases")


async def test_lost_content_is_reported_never_cut_again(
    api: FakeKubeAPI, peer: tuple[ScriptedCSI, str]
) -> None:
    async with scripted(api, peer) as (groups, _):
        await group_snapshot(api)
        await eventually(lambda: group_ready(api), "ready")
        [content] = api.objects(VOLUME_GROUP_SNAPSHOT_CONTENT)
        name = content["metadata"]["name"]
        await api.patch(VOLUME_GROUP_SNAPSHOT_CONTENT, name, {"metadata": {"finalizers": None}})
        await api.delete(VOLUME_GROUP_SNAPSHOT_CONTENT, name)
        await eventually(
            lambda: f"VolumeGroupSnapshotContent {name} is missing" in group_error(api), "reported"
        )
        await settle(api)
        assert groups.calls["create"] == 1 and not api.objects(VOLUME_GROUP_SNAPSHOT_CONTENT)
