"""hostPath on ext4 (no reflinks): copies use the in-kernel sparse-aware copy,
and every data case holds."""

from __future__ import annotations

import pytest
from data_cases import *  # noqa: F403 - the shared data tests run on this filesystem
from hp_helpers import HostPath

from csi_kit._pb import csi_pb2 as pb

pytestmark = pytest.mark.privileged

FS_TYPE = "ext4"


def test_copy_method_is_the_in_kernel_copy(hostpath: HostPath) -> None:
    manifest = hostpath.csi.identity.GetPluginInfo(pb.GetPluginInfoRequest()).manifest
    assert manifest["copy"] == "copy_file_range"
    assert manifest["capacity"] == "advisory"
