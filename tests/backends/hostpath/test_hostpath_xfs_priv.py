"""hostPath on XFS with reflink=1: copies are reflinks (shared extents), and
every data case holds."""

from __future__ import annotations

import os

import pytest
from data_cases import *  # noqa: F403 - the shared data tests run on this filesystem
from hp_helpers import HostPath, fill

from csi_kit._pb import csi_pb2 as pb
from csi_kit.linux.run import run

pytestmark = pytest.mark.privileged

FS_TYPE = "xfs"


def _shared_extents(path: str) -> bool:
    out = run(["filefrag", "-v", path]).stdout
    return any("shared" in line for line in out.splitlines()[3:])


def test_copy_method_is_reflink(hostpath: HostPath) -> None:
    manifest = hostpath.csi.identity.GetPluginInfo(pb.GetPluginInfoRequest()).manifest
    assert manifest["copy"] == "reflink"
    assert manifest["capacity"] == "advisory"
    vol = hostpath.csi.create("advisory")
    assert vol.volume_context["csi-kit.io/capacity"] == "advisory"


def test_snapshot_and_restore_share_extents(hostpath: HostPath) -> None:
    csi = hostpath.csi
    src = csi.create("reflink-src")
    fill(hostpath.volume_dir(src.volume_id), seed=20)
    snap = csi.snapshot("reflink-snap", src.volume_id)
    restored = csi.create("reflink-restored", snapshot=snap.snapshot_id)
    for d in (hostpath.snapshot_dir(snap.snapshot_id), hostpath.volume_dir(restored.volume_id)):
        assert _shared_extents(os.path.join(d, "random.bin"))
    assert _shared_extents(os.path.join(hostpath.volume_dir(src.volume_id), "random.bin"))
