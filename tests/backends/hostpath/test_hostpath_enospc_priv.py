"""A copy that runs out of space half-way: the error is RESOURCE_EXHAUSTED
and nothing of the half-made volume or snapshot is left behind."""

from __future__ import annotations

import os
import sqlite3

import grpc
import pytest
from helpers import create_req, expect
from hp_helpers import HostPath

from csi_kit._pb import csi_pb2 as pb

pytestmark = pytest.mark.privileged

FS_TYPE = "ext4"
FS_SIZE_MB = 32


def _rows(hostpath: HostPath, table: str) -> list[str]:
    db = sqlite3.connect(f"file:{os.path.join(hostpath.state, 'state.db')}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute(f"SELECT name FROM {table}")]
    finally:
        db.close()


def test_out_of_space_midway_rolls_back(hostpath: HostPath) -> None:
    csi = hostpath.csi
    src = csi.create("big")
    free = os.statvfs(hostpath.root).f_bavail * os.statvfs(hostpath.root).f_frsize
    with open(os.path.join(hostpath.volume_dir(src.volume_id), "small"), "wb") as f:
        f.write(os.urandom(64 * 1024))
    with open(os.path.join(hostpath.volume_dir(src.volume_id), "large"), "wb") as f:
        f.write(os.urandom(free * 6 // 10))
        f.flush()
        os.fsync(f.fileno())
    req = create_req("clone", volume=src.volume_id)
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, csi.controller.CreateVolume, req, "no space")
    expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        csi.controller.CreateSnapshot,
        pb.CreateSnapshotRequest(name="snap", source_volume_id=src.volume_id),
    )
    assert os.listdir(os.path.join(hostpath.root, "volumes")) == [src.volume_id]
    assert os.listdir(os.path.join(hostpath.root, "snapshots")) == []
    assert os.listdir(os.path.join(hostpath.root, ".incoming")) == []
    assert _rows(hostpath, "volumes") == ["big"] and _rows(hostpath, "snapshots") == []
    # The space is back: after freeing room the same names succeed.
    os.remove(os.path.join(hostpath.volume_dir(src.volume_id), "large"))
    clone = csi.create("clone", volume=src.volume_id)
    assert os.listdir(hostpath.volume_dir(clone.volume_id)) == ["small"]
