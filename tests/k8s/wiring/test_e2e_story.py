"""The whole story in one process: a real hostPath driver, every loop, the fake API.

StorageClass → PVC → volume; data written into the volume on the backend;
VolumeSnapshot → restore into a new PVC; PVC clone; PVC expansion; then
everything deleted and the backend left empty.  The driver is the real
csi_kit driver serving CSI on a unix socket; the loops reach it only through
CSI, as in a cluster.  The PV controller's part (binding, Released) is played
by `ClusterSim`; the scheduler's part by writing the selected-node annotation.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from k8s_helpers import cli_running, http_get, parse, running
from k8s_helpers import make_class as make_snapshot_class
from volume_peer import ClusterSim, bound, claim, eventually, make_class

from csi_kit.k8s.objects.quantity import parse_quantity
from csi_kit.k8s.objects.resources import (
    PV,
    PVC,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CONTENT,
)
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import Obj
from csi_kit.k8s.runtime.csi import CSIClient
from csi_kit.k8s.snapshot.controller import SnapshotController
from csi_kit.k8s.snapshot.snapshotter import Snapshotter
from csi_kit.k8s.volume.provisioner import Provisioner
from csi_kit.k8s.volume.resizer import Resizer
from csi_kit.testing.driver import running_driver
from csi_kit.testing.fake_k8s import FakeKubeAPI

DRIVER = "hostpath.csi-kit.io"
NODE = "node-1"
MiB = 1 << 20


class Story:
    def __init__(self, api: FakeKubeAPI, state: str) -> None:
        self.api = api
        self.volumes_dir = os.path.join(state, "hostpath", "volumes")
        self.snapshots_dir = os.path.join(state, "hostpath", "snapshots")

    def volume_dir(self, pvc_name: str) -> str:
        c = claim(self.api, pvc_name)
        assert c is not None
        pv = self.api.peek(PV, c["spec"]["volumeName"])
        assert pv is not None
        return os.path.join(self.volumes_dir, pv["spec"]["csi"]["volumeHandle"])

    async def claim(self, name: str, size: str = "64Mi", source: dict[str, Any] | None = None) -> Obj:
        spec: Obj = {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "hostpath",
            "resources": {"requests": {"storage": size}},
            "volumeMode": "Filesystem",
        }
        if source:
            spec["dataSource"] = source
            spec["dataSourceRef"] = source
        pvc = await self.api.create(PVC, {"metadata": {"name": name, "namespace": "default"}, "spec": spec})
        # The scheduler places the first consumer on node-1.
        await self.api.patch(
            PVC, name, {"metadata": {"annotations": {"volume.kubernetes.io/selected-node": NODE}}}, "default"
        )
        await eventually(lambda: bound(self.api, name), f"claim {name} bound")
        return pvc


async def make_classes(api: FakeKubeAPI, snapshot_class: str) -> None:
    """What the story's cluster admin made: StorageClass "hostpath" (late binding, expandable)
    and a default VolumeSnapshotClass, both of the hostPath driver."""
    await make_class(api, "hostpath", driver=DRIVER, binding="WaitForFirstConsumer")
    await make_snapshot_class(api, snapshot_class, driver=DRIVER)


@pytest.fixture
async def story(api: FakeKubeAPI, tmp_path: Any) -> AsyncIterator[Story]:
    state = str(tmp_path / "driver")
    os.makedirs(state)
    with running_driver(state, backend="hostpath", node_id=NODE, driver_name=DRIVER) as endpoint:
        client = CSIClient(endpoint, timeout=30)
        info = await client.driver_info()
        node_id, topology = await client.node_info()
        assert node_id == NODE
        fast: dict[str, Any] = {"base_delay": 0.01, "max_delay": 0.1}
        loops = [
            ClusterSim(api),
            Provisioner(api, client, info, node_name=NODE, node_topology=topology, **fast),
            SnapshotController(api, **fast),
            Snapshotter(api, client, DRIVER, **fast),
            Resizer(api, client, info, **fast),
        ]
        await make_classes(api, "hostpath-snap")
        try:
            async with running(*loops):
                yield Story(api, state)
        finally:
            await client.close()


async def test_pvc_snapshot_restore_clone_expand_and_clean_up(story: Story) -> None:
    api = story.api
    # 1. A claim gets a volume: a directory on the backend, bound through a PV with node affinity.
    await story.claim("data")
    src_dir = story.volume_dir("data")
    assert os.path.isdir(src_dir)
    pv = api.peek(PV, (claim(api, "data") or {})["spec"]["volumeName"])
    assert pv is not None
    (term,) = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert {(e["key"], tuple(e["values"])) for e in term["matchExpressions"]} == {
        (f"topology.{DRIVER}/node", (NODE,)),
        ("kubernetes.io/hostname", (NODE,)),  # what distributed snapshotting routes by
    }

    # 2. The application writes data (what a pod would do through its bind mount).
    with open(os.path.join(src_dir, "hello.txt"), "w") as f:
        f.write("written before the snapshot\n")
    os.makedirs(os.path.join(src_dir, "sub"))
    with open(os.path.join(src_dir, "sub", "blob.bin"), "wb") as f:
        f.write(os.urandom(1 << 20))
    with open(os.path.join(src_dir, "sub", "blob.bin"), "rb") as f:
        blob = f.read()

    # 3. A snapshot of it becomes ready.
    await api.create(
        VOLUME_SNAPSHOT,
        {
            "metadata": {"name": "snap", "namespace": "default"},
            "spec": {"source": {"persistentVolumeClaimName": "data"}},
        },
    )
    await eventually(
        lambda: (
            ((api.peek(VOLUME_SNAPSHOT, "snap", "default") or {}).get("status") or {}).get("readyToUse")
            is True
        ),
        "snapshot ready",
    )
    # Written after the snapshot: must not appear in the restore, must appear in the clone.
    with open(os.path.join(src_dir, "later.txt"), "w") as f:
        f.write("written after the snapshot\n")

    # 4. Restore the snapshot into a new claim.
    await story.claim(
        "restored", source={"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}
    )
    restored = story.volume_dir("restored")
    assert restored != src_dir
    with open(os.path.join(restored, "hello.txt")) as f:
        assert f.read() == "written before the snapshot\n"
    with open(os.path.join(restored, "sub", "blob.bin"), "rb") as f:
        assert f.read() == blob
    assert not os.path.exists(os.path.join(restored, "later.txt"))

    # 5. Clone the original claim.
    await story.claim("copy", source={"kind": "PersistentVolumeClaim", "name": "data"})
    copy_dir = story.volume_dir("copy")
    with open(os.path.join(copy_dir, "later.txt")) as f:
        assert f.read() == "written after the snapshot\n"
    with open(os.path.join(copy_dir, "sub", "blob.bin"), "rb") as f:
        assert f.read() == blob
    # The clone is a copy, not a view: writing to it leaves the source alone.
    with open(os.path.join(copy_dir, "hello.txt"), "w") as f:
        f.write("changed in the copy\n")
    with open(os.path.join(src_dir, "hello.txt")) as f:
        assert f.read() == "written before the snapshot\n"
    # Source protections are gone once the new volumes exist.
    await eventually(
        lambda: (
            "provisioner.storage.kubernetes.io/cloning-protection"
            not in k.finalizers_of(claim(api, "data") or {})
        ),
        "clone source released",
    )
    await eventually(
        lambda: (
            "provisioner.storage.kubernetes.io/volumesnapshot-as-source-protection"
            not in k.finalizers_of(api.peek(VOLUME_SNAPSHOT, "snap", "default") or {})
        ),
        "snapshot source released",
    )

    # 6. Expand the original claim (online, controller-side for hostPath).
    await api.patch(PVC, "data", {"spec": {"resources": {"requests": {"storage": "128Mi"}}}}, "default")

    def capacity() -> int:
        st = (claim(api, "data") or {}).get("status") or {}
        return parse_quantity((st.get("capacity") or {}).get("storage", 0))

    await eventually(lambda: capacity() == 128 * MiB, "claim expanded")
    pv = api.peek(PV, (claim(api, "data") or {})["spec"]["volumeName"])
    assert pv is not None and parse_quantity(pv["spec"]["capacity"]["storage"]) == 128 * MiB
    with open(os.path.join(src_dir, "hello.txt")) as f:
        assert f.read() == "written before the snapshot\n"

    # 7. Delete everything: nothing is left on the backend or in the API.
    await api.delete(VOLUME_SNAPSHOT, "snap", "default")
    for name in ("data", "restored", "copy"):
        await api.delete(PVC, name, "default")
    await eventually(lambda: not api.objects(PV), "PVs deleted")
    await eventually(lambda: not api.objects(VOLUME_SNAPSHOT_CONTENT), "contents deleted")
    await eventually(lambda: not os.listdir(story.volumes_dir), "backend volumes deleted")
    await eventually(lambda: not os.listdir(story.snapshots_dir), "backend snapshots deleted")
    assert not api.objects(PVC) and not api.objects(VOLUME_SNAPSHOT)


async def test_one_process_all_controllers_per_node(
    api: FakeKubeAPI, tmp_path: Any, unused_tcp_port: int
) -> None:
    """`--controllers all --node-deployment` as the CLI wires it, on the real driver: one DaemonSet pod."""
    import grpc.aio

    from csi_kit._pb import pluginregistration_pb2 as rpb
    from csi_kit._pb import pluginregistration_pb2_grpc as rpbg
    from csi_kit.k8s.objects.resources import CSI_STORAGE_CAPACITY

    state = str(tmp_path / "driver")
    os.makedirs(state)
    registry = str(tmp_path / "registry")
    args = parse(
        "--controllers", "all", "--node-deployment", "--node-name", NODE, "--distributed-snapshotting",
        "--leader-election", "--leader-election-namespace", "csi",
        "--kube-api-qps", "0", "--retry-interval-start", "0.01", "--retry-interval-max", "0.1",
        "--plugin-registry-dir", registry,
        "--health-address", "127.0.0.1", "--health-port", str(unused_tcp_port),
        "--capacity-poll-interval", "0.2",
    )  # fmt: skip
    with running_driver(state, backend="hostpath", node_id=NODE, driver_name=DRIVER) as endpoint:
        story = Story(api, state)
        async with running(ClusterSim(api)), cli_running(args, endpoint, api, limit=60):
            await make_classes(api, "snap")
            await story.claim("data")
            with open(os.path.join(story.volume_dir("data"), "f"), "w") as f:
                f.write("one process\n")
            await api.create(
                VOLUME_SNAPSHOT,
                {
                    "metadata": {"name": "s", "namespace": "default"},
                    "spec": {"source": {"persistentVolumeClaimName": "data"}},
                },
            )
            await eventually(
                lambda: ((api.peek(VOLUME_SNAPSHOT, "s", "default") or {}).get("status") or {}).get(
                    "readyToUse"
                ),
                "snapshot ready",
            )
            await story.claim(
                "back", source={"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "s"}
            )
            with open(os.path.join(story.volume_dir("back"), "f")) as f:
                assert f.read() == "one process\n"
            await api.patch(
                PVC, "data", {"spec": {"resources": {"requests": {"storage": "96Mi"}}}}, "default"
            )
            await eventually(
                lambda: (
                    ((claim(api, "data") or {}).get("status") or {}).get("capacity", {}).get("storage")
                    == "96Mi"
                ),
                "expanded",
            )
            # Capacity for this node, registration with the kubelet, liveness through Probe.
            await eventually(lambda: api.objects(CSI_STORAGE_CAPACITY), "capacity published")
            (cap,) = api.objects(CSI_STORAGE_CAPACITY)
            assert cap["nodeTopology"]["matchLabels"] == {f"topology.{DRIVER}/node": NODE}
            async with grpc.aio.insecure_channel(f"unix://{registry}/{DRIVER}-reg.sock") as ch:
                info = await rpbg.RegistrationStub(ch).GetInfo(rpb.InfoRequest())
            assert (info.name, info.endpoint) == (DRIVER, endpoint.removeprefix("unix://"))
            assert await http_get(unused_tcp_port) == (200, "ok")
