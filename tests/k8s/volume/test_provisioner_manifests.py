"""The per-driver manifests: valid YAML, complete, and RBAC that grants exactly what the loops use.

Each volume loop runs the flows a cluster puts it through (secrets, restore,
clone, failures that repeat an Event, expansion, deletion, capacity updates)
behind a recording proxy; its ClusterRole (plus Role) must allow every
request it made and grant nothing it did not use -- least privilege, checked.
"""

from __future__ import annotations

import base64
import pathlib
from typing import Any

import grpc
import pytest
import yaml
from k8s_helpers import Recording
from volume_peer import (
    TOPO_KEY,
    ClusterSim,
    VolumeCSI,
    bound,
    claim,
    eventually,
    make_bound,
    make_claim,
    make_class,
    make_ready_snapshot,
    run_tasks,
    served,
    stop_tasks,
)

from csi_kit.k8s.objects.resources import PVC, SECRET, STORAGE_CLASS, VOLUME_ATTRIBUTES_CLASS
from csi_kit.k8s.runtime.csi import CSIClient
from csi_kit.k8s.volume.capacity import CapacityTracker
from csi_kit.k8s.volume.provisioner import Provisioner
from csi_kit.k8s.volume.resizer import Resizer
from csi_kit.testing.fake_k8s import FakeKubeAPI

DEPLOY = pathlib.Path(__file__).resolve().parents[3] / "examples" / "deploy"
DRIVERS = {"hostpath": "hostpath.csi-kit.io", "loopfile": "loopfile.csi-kit.io", "lvm": "lvm.csi-kit.io"}
Used = set[tuple[str, str, str]]


def docs(driver: str, name: str) -> list[dict[str, Any]]:
    with open(DEPLOY / driver / name) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def granted(driver: str, *roles: str) -> Used:
    out: Used = set()
    for d in docs(driver, "rbac.yaml"):
        if d["kind"] in ("ClusterRole", "Role") and d["metadata"]["name"] in roles:
            for rule in d["rules"]:
                for g in rule["apiGroups"]:
                    for r in rule["resources"]:
                        for v in rule["verbs"]:
                            out.add((g, r, v))
    return out


@pytest.fixture
async def recorded(api: FakeKubeAPI, tmp_path: Any) -> dict[str, Used]:
    """Run the provisioner, resizer and capacity loops (per-node, as deployed) through their flows."""
    peer = VolumeCSI(node_id="node-1")
    peer.capacity = {"node-1": 8 << 30}
    peer.controller_caps.add("MODIFY_VOLUME")  # every built-in backend modifies volumes
    topo = {TOPO_KEY: "node-1"}
    rec = {name: Recording(api) for name in ("provisioner", "resizer", "capacity")}
    fast: dict[str, Any] = {"base_delay": 0.01, "max_delay": 0.05}
    async with served(peer, str(tmp_path / "csi.sock")) as endpoint:
        client = CSIClient(endpoint, timeout=5)
        info = await client.driver_info()
        secret = {"data": {"k": base64.b64encode(b"v").decode()}}
        await api.create(SECRET, {"metadata": {"name": "creds", "namespace": "default"}, **secret})
        await make_class(
            api,
            binding="WaitForFirstConsumer",
            params={
                "csi.storage.k8s.io/provisioner-secret-name": "creds",
                "csi.storage.k8s.io/provisioner-secret-namespace": "default",
            },
        )
        a: Any = rec["provisioner"]
        r: Any = rec["resizer"]
        c: Any = rec["capacity"]
        loops = [
            ClusterSim(api),
            Provisioner(a, client, info, node_name="node-1", node_topology=topo, **fast),
            Resizer(r, client, info, node_topology=topo, **fast),
            CapacityTracker(
                c, client, info, "csi", node_name="node-1", node_topology=topo, poll_interval=0.05, **fast
            ),
        ]
        tasks = await run_tasks(*loops)
        try:
            # Provisioner: a claim with secrets, a restore, a clone, a repeated failure, a deletion.
            await make_claim(api, "data", node="node-1")
            await eventually(lambda: bound(api, "data"), "bound")
            await make_ready_snapshot(api)
            snap_src = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}
            await make_claim(api, "restored", node="node-1", source=snap_src)
            await make_claim(
                api, "copy", node="node-1", source={"kind": "PersistentVolumeClaim", "name": "data"}
            )
            await eventually(lambda: bound(api, "restored") and bound(api, "copy"), "restored and cloned")
            await make_claim(api, "bad", node="node-1", size="lots")
            await eventually(lambda: ("", "events", "patch") in rec["provisioner"].used, "event repeated")
            await api.delete(PVC, "copy", "default")
            await eventually(lambda: claim(api, "copy") is None and len(peer.deleted) == 1, "deleted")
            # Resizer: a PV with an expansion secret (and node affinity to this node), a failure, a success.
            expr = {"key": TOPO_KEY, "operator": "In", "values": ["node-1"]}
            await make_bound(
                api,
                "grow",
                csi_extra={"controllerExpandSecretRef": {"name": "creds", "namespace": "default"}},
            )
            await api.patch(
                loops[1].pvs.res,
                "pv-grow",
                {
                    "spec": {
                        "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [expr]}]}}
                    }
                },
            )
            peer.fail("ControllerExpandVolume", grpc.StatusCode.INTERNAL, "busy", times=3)
            await api.patch(PVC, "grow", {"spec": {"resources": {"requests": {"storage": "2Gi"}}}}, "default")
            await eventually(
                lambda: (
                    ((claim(api, "grow") or {}).get("status") or {}).get("capacity", {}).get("storage")
                    == "2Gi"
                ),
                "expanded",
            )
            # Resizer: a VolumeAttributesClass change (modify).
            await api.create(
                VOLUME_ATTRIBUTES_CLASS,
                {"metadata": {"name": "gold"}, "driverName": peer.name, "parameters": {"iops": "3000"}},
            )
            await api.patch(PVC, "grow", {"spec": {"volumeAttributesClassName": "gold"}}, "default")
            await eventually(
                lambda: (
                    ((claim(api, "grow") or {}).get("status") or {}).get("currentVolumeAttributesClassName")
                    == "gold"
                ),
                "modified",
            )
            # Capacity: created, updated, removed with its class.
            peer.capacity["node-1"] = 4 << 30
            await eventually(
                lambda: ("storage.k8s.io", "csistoragecapacities", "patch") in rec["capacity"].used, ""
            )
            await api.delete(STORAGE_CLASS, "fast")
            await eventually(
                lambda: ("storage.k8s.io", "csistoragecapacities", "delete") in rec["capacity"].used, ""
            )
        finally:
            await stop_tasks(tasks)
            await client.close()
    return {name: x.used for name, x in rec.items()}


@pytest.mark.parametrize("driver", sorted(DRIVERS))
async def test_rbac_is_exactly_what_the_loops_use(driver: str, recorded: dict[str, Used]) -> None:
    ns = f"csi-kit-{driver}"
    for loop in ("provisioner", "resizer", "capacity"):
        grant = granted(driver, f"{ns}-{loop}")
        used = recorded[loop]
        assert used - grant == set(), f"{driver}/{loop}: used but not granted"
        assert grant - used == set(), f"{driver}/{loop}: granted but never used"


def _rules(path: pathlib.Path, name: str) -> list[Any]:
    with open(path) as f:
        for d in yaml.safe_load_all(f):
            if d and d["kind"] in ("ClusterRole", "Role") and d["metadata"]["name"] == name:
                return list(d["rules"])
    raise AssertionError(f"{name} not in {path}")


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_snapshot_and_lease_roles_match_the_checked_snapshot_manifests(driver: str) -> None:
    shared = DEPLOY / "snapshot" / "rbac.yaml"
    mine = DEPLOY / driver / "rbac.yaml"
    for role in ("snapshot-controller", "snapshotter", "leader-election"):
        assert _rules(mine, f"csi-kit-{driver}-{role}") == _rules(shared, f"csi-kit-{role}")


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_every_driver_directory_is_complete_and_consistent(driver: str) -> None:
    name = DRIVERS[driver]
    kinds: dict[str, list[dict[str, Any]]] = {}
    for f in (
        "csidriver.yaml",
        "rbac.yaml",
        "daemonset.yaml",
        "storageclass.yaml",
        "volumesnapshotclass.yaml",
    ):
        for d in docs(driver, f):
            kinds.setdefault(d["kind"], []).append(d)
    (csidriver,) = kinds["CSIDriver"]
    (sc,) = kinds["StorageClass"]
    (vsc,) = kinds["VolumeSnapshotClass"]
    (ds,) = kinds["DaemonSet"]
    assert csidriver["metadata"]["name"] == sc["provisioner"] == vsc["driver"] == name
    assert csidriver["spec"]["attachRequired"] is False  # node-local: no attacher deployed
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer" and sc["allowVolumeExpansion"] is True
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env["CSI_KIT_CONTROLLERS"].split(",")) == {
        "snapshot", "provisioner", "resizer", "capacity", "registration", "liveness"
    }  # fmt: skip
    assert env["CSI_KIT_NODE_DEPLOYMENT"] == "true"
    assert f"--driver-name={name}" in container["args"] and f"--backend={driver}" in container["args"]
    sock = f"/var/lib/kubelet/plugins/{name}/csi.sock"
    assert (
        f"--endpoint=unix://{sock}" in container["args"] and env["CSI_KIT_KUBELET_REGISTRATION_PATH"] == sock
    )
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["serviceAccountName"] == "csi-kit" and ds["metadata"]["namespace"] == f"csi-kit-{driver}"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    # Every role is bound to the DaemonSet's service account.
    roles = {d["metadata"]["name"] for k in ("ClusterRole", "Role") for d in kinds[k]}
    bound_roles = {
        d["roleRef"]["name"]
        for k in ("ClusterRoleBinding", "RoleBinding")
        for d in kinds[k]
        if d["subjects"] == [{"kind": "ServiceAccount", "name": "csi-kit", "namespace": f"csi-kit-{driver}"}]
    }
    assert roles == bound_roles
