"""blockfs without root: ext4 images in plain files (mkfs and resize2fs work on files)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from csi_kit.errors import FailedPrecondition
from csi_kit.linux import blockfs

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None or shutil.which("resize2fs") is None,
    reason="e2fsprogs is not installed",
)


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = str(tmp_path / "vol.img")
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
    blockfs.make_filesystem(path, "ext4")
    return path


def test_fills_device_follows_the_superblock(image: str) -> None:
    assert blockfs.fills_device(image, "ext4")
    os.truncate(image, 32 * MiB + blockfs.GROW_SLACK - 4096)
    assert blockfs.fills_device(image, "ext4"), "less than the slack to gain is nothing to grow"
    os.truncate(image, 48 * MiB)
    assert not blockfs.fills_device(image, "ext4")
    assert blockfs.grow_unmounted(image, "ext4")
    assert blockfs.fills_device(image, "ext4")
    assert blockfs.filesystem_size(image, "ext4") == 48 * MiB
    assert not blockfs.fills_device(image, "xfs"), "no XFS superblock: nothing known to fill it"


def test_an_ext4_that_fills_its_device_needs_no_capability_to_grow(
    image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NodeExpandVolume after a NodeStage that grew it offline: OK, not refused for CAP_SYS_RESOURCE."""
    monkeypatch.setattr(blockfs, "_has_capability", lambda bit: False)
    os.truncate(image, 48 * MiB)
    assert blockfs.grow_unmounted(image, "ext4")
    blockfs.grow_filesystem(image, "/nonexistent-mount", "ext4")  # no tool runs: nothing to grow
    os.truncate(image, 64 * MiB)
    with pytest.raises(FailedPrecondition, match="CAP_SYS_RESOURCE"):
        blockfs.grow_filesystem(image, "/nonexistent-mount", "ext4")
