"""The whole snapshot story against the real csi_kit hostPath driver (over its CSI socket)."""

from __future__ import annotations

import os

from k8s_helpers import (
    contents,
    create_volume,
    eventually,
    is_ready,
    make_class,
    make_snapshot,
    running,
    snapshot,
)

from csi_kit.k8s.objects.resources import PV, PVC, VOLUME_SNAPSHOT
from csi_kit.k8s.runtime.csi import CSIClient
from csi_kit.k8s.snapshot.controller import SnapshotController
from csi_kit.k8s.snapshot.snapshotter import Snapshotter
from csi_kit.testing.driver import running_driver
from csi_kit.testing.fake_k8s import FakeKubeAPI

DRIVER = "hostpath.csi-kit.io"


async def test_snapshot_lifecycle_on_the_hostpath_driver(tmp_path: os.PathLike[str]) -> None:
    api = FakeKubeAPI()
    with running_driver(str(tmp_path), driver_name=DRIVER) as endpoint:
        volume_id = await create_volume(endpoint, "pvc-e2e")
        await api.create(
            PV,
            {"metadata": {"name": "pv-e2e"}, "spec": {"csi": {"driver": DRIVER, "volumeHandle": volume_id}}},
        )
        pvc = await api.create(
            PVC, {"metadata": {"name": "data", "namespace": "default"}, "spec": {"volumeName": "pv-e2e"}}
        )
        pvc["status"] = {"phase": "Bound"}
        await api.update_status(PVC, pvc)
        await make_class(api, "hp", driver=DRIVER)
        client = CSIClient(endpoint)
        info = await client.driver_info()
        assert info.name == DRIVER and "CREATE_DELETE_SNAPSHOT" in info.controller_capabilities
        ctrl = SnapshotController(api, base_delay=0.01, max_delay=0.1)
        snapper = Snapshotter(api, client, info.name, base_delay=0.01, max_delay=0.1)
        try:
            async with running(ctrl, snapper):
                await make_snapshot(api)
                await eventually(lambda: is_ready(api), "snapshot ready on the real driver", limit=60)
                [content] = contents(api)
                handle = content["status"]["snapshotHandle"]
                listed = await client.list_snapshots(snapshot_id=handle)
                assert [s.source_volume_id for s in listed] == [volume_id]
                assert snapshot(api)["status"]["restoreSize"]  # type: ignore[index]

                await api.delete(VOLUME_SNAPSHOT, "snap", "default")
                await eventually(lambda: snapshot(api) is None and not contents(api), "all gone", limit=60)
                assert await client.list_snapshots(snapshot_id=handle) == []
        finally:
            await client.close()
