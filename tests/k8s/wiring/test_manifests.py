"""The example manifests: valid YAML, and RBAC that grants exactly what the loops use.

The loops run a full flow (dynamic snapshot with secrets, pre-provisioned
binding, deletion, leader election) through a recording proxy; every request
each loop made must be allowed by its ClusterRole (or the lease Role), and
every granted verb must have been used -- least privilege, checked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib

import pytest
import yaml
from csi_peer import ScriptedCSI
from k8s_helpers import (
    DRIVER,
    SNAPSHOT_DEPLOY,
    Recording,
    contents,
    eventually,
    granted,
    is_ready,
    make_class,
    make_snapshot,
    make_volume,
    manifest_docs,
    snapshot,
)

from csi_kit.k8s.objects.resources import (
    EVENT,
    LEASE,
    PV,
    PVC,
    SECRET,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CONTENT,
)
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.csi import CSIClient, DriverInfo, VolumeCondition
from csi_kit.k8s.runtime.events import EventRecorder
from csi_kit.k8s.runtime.leader import LeaderElector
from csi_kit.k8s.snapshot import protocol as p
from csi_kit.k8s.snapshot.controller import SnapshotController
from csi_kit.k8s.snapshot.snapshotter import Snapshotter
from csi_kit.k8s.volume.health import HealthMonitor
from csi_kit.testing.fake_k8s import FakeKubeAPI

# Granted but only reached after a crash between creating a content and caching it.
RARE = {("snapshot-controller", "snapshot.storage.k8s.io", "volumesnapshotcontents", "get")}


def test_manifests_parse_and_agree_on_names() -> None:
    d = manifest_docs()
    assert d[("CSIDriver", "hostpath.csi-kit.io")]["spec"]["attachRequired"] is False
    cls = d[("VolumeSnapshotClass", "csi-kit-hostpath")]
    assert (
        cls["driver"] == "hostpath.csi-kit.io"
        and cls["metadata"]["annotations"][p.ANN_IS_DEFAULT_CLASS] == "true"
    )
    for kind, name in (("Deployment", "csi-kit-hostpath-controller"), ("DaemonSet", "csi-kit-hostpath-node")):
        spec = d[(kind, name)]["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == "csi-kit"
        env = {e["name"] for e in spec["containers"][0]["env"]}
        assert "CSI_KIT_CONTROLLERS" in env


async def test_rbac_is_exactly_what_the_loops_use(peer: tuple[ScriptedCSI, str]) -> None:
    csi, endpoint = peer
    d = manifest_docs()
    fake = FakeKubeAPI()
    ctrl_api, snap_api, lease_api = Recording(fake), Recording(fake), Recording(fake)
    client = CSIClient(endpoint)
    ctrl = SnapshotController(ctrl_api, base_delay=0.01, max_delay=0.05)  # type: ignore[arg-type]
    snapper = Snapshotter(snap_api, client, DRIVER, base_delay=0.01, max_delay=0.05)  # type: ignore[arg-type]
    stop = asyncio.Event()
    elector = LeaderElector(lease_api, lease_name="l", namespace="csi-kit", identity="me",  # type: ignore[arg-type]
                            lease_duration=0.6, renew_deadline=0.4, retry_period=0.05)  # fmt: skip
    tasks = [
        asyncio.create_task(ctrl.run()),
        asyncio.create_task(snapper.run()),
        asyncio.create_task(elector.run(lambda: asyncio.Event().wait(), stop)),  # type: ignore[arg-type,return-value]
    ]
    try:
        await fake.create(SECRET, {"metadata": {"name": "creds", "namespace": "default"},
                                   "data": {"k": base64.b64encode(b"v").decode()}})  # fmt: skip
        await make_volume(fake)
        await make_class(fake, **{p.SECRET_NAME_KEY: "creds", p.SECRET_NAMESPACE_KEY: "default"})
        await make_snapshot(fake)
        await eventually(lambda: is_ready(fake), "dynamic ready")
        csi.add_existing("pre-1")
        await fake.create(VOLUME_SNAPSHOT_CONTENT, {
            "metadata": {"name": "pre"},
            "spec": {"deletionPolicy": "Delete", "driver": DRIVER, "source": {"snapshotHandle": "pre-1"},
                     "volumeSnapshotRef": {"name": "pre", "namespace": "default"}}})  # fmt: skip
        pre_snap = {"name": "pre", "namespace": "default"}
        await fake.create(
            VOLUME_SNAPSHOT, {"metadata": pre_snap, "spec": {"source": {"volumeSnapshotContentName": "pre"}}}
        )
        await eventually(lambda: is_ready(fake, "pre"), "pre-provisioned ready")
        await fake.delete(VOLUME_SNAPSHOT, "snap", "default")
        await fake.delete(VOLUME_SNAPSHOT, "pre", "default")
        await eventually(lambda: snapshot(fake) is None and not contents(fake), "all deleted")
        await asyncio.sleep(0.2)  # a few lease renewals (update)
    finally:
        stop.set()
        await asyncio.wait_for(tasks[2], 5)
        for t in tasks[:2]:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await client.close()

    roles = {
        "snapshot-controller": (ctrl_api.used, granted(d[("ClusterRole", "csi-kit-snapshot-controller")])),
        "snapshotter": (snap_api.used, granted(d[("ClusterRole", "csi-kit-snapshotter")])),
        "leader-election": (lease_api.used, granted(d[("Role", "csi-kit-leader-election")])),
    }
    for who, (used, allowed) in roles.items():
        assert used - allowed == set(), f"{who} uses verbs its role does not grant"
        unused = {g for g in allowed - used if (who, *g) not in RARE}
        assert unused == set(), f"{who}'s role grants verbs it never uses"
    assert LEASE.group == "coordination.k8s.io"


class _SickDriver:
    """Every volume abnormal (the health monitor's driver, without gRPC)."""

    async def list_volume_conditions(self) -> dict[str, VolumeCondition]:
        return {"vol-data": VolumeCondition(True, "broken")}

    async def get_volume_condition(self, volume_id: str) -> VolumeCondition:
        return VolumeCondition(True, "broken")


@pytest.mark.parametrize("driver", ["hostpath", "loopfile", "lvm"])
async def test_health_monitor_rbac_is_exactly_what_it_uses(driver: str) -> None:
    path = SNAPSHOT_DEPLOY.parent / driver / "rbac-health-monitor.yaml"
    found = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(path.read_text()) if d}
    name = f"csi-kit-{driver}-health-monitor"
    binding = found[("ClusterRoleBinding", name)]
    assert binding["roleRef"]["name"] == name
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "csi-kit", "namespace": f"csi-kit-{driver}"}
    ]
    fake = FakeKubeAPI()
    claim = await fake.create(PVC, {"metadata": {"name": "data", "namespace": "default"}, "spec": {}})
    pv = await fake.create(PV, {"metadata": {"name": "pv-data"}, "spec": {
        "claimRef": {"namespace": "default", "name": "data", "uid": k.uid_of(claim)},
        "csi": {"driver": DRIVER, "volumeHandle": "vol-data"}}})  # fmt: skip
    pv["status"] = {"phase": "Bound"}
    await fake.update_status(PV, pv)
    rec = Recording(fake)
    info = DriverInfo(DRIVER, "1", frozenset({"CONTROLLER_SERVICE"}),
                      frozenset({"LIST_VOLUMES", "VOLUME_CONDITION"}), frozenset())  # fmt: skip
    events = EventRecorder(rec, "health")  # type: ignore[arg-type]
    monitor = HealthMonitor(rec, _SickDriver(), info, interval=0.01, events=events)  # type: ignore[arg-type]
    task = asyncio.create_task(monitor.run())
    try:
        await eventually(lambda: fake.objects(EVENT), "the Event")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await events.flush()
    assert rec.used == granted(found[("ClusterRole", name)])
