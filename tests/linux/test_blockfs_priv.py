"""blockfs on a real loop device: NodeExpandVolume after NodeStage grew ext4 offline.

The kubelet calls NodeExpandVolume after a NodeStage that already grew the
filesystem offline (issue #13).  Online ext4 growth needs CAP_SYS_RESOURCE;
`grow_filesystem` must answer OK without it when nothing is left to grow.
The grow runs in a child whose bounding set lacks CAP_SYS_RESOURCE (setpriv),
so after its exec the capability is really missing whether or not this
process has it; the child shows it by being refused once the device grows.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_kit.linux import blockfs, loop
from csi_kit.linux.mounts import mount, unmount_stack
from csi_kit.linux.run import Result, run

pytestmark = pytest.mark.privileged

MiB = 1 << 20

_CHILD = """
import sys
from csi_kit.errors import CSIError
from csi_kit.linux import blockfs
with open("/proc/self/status") as f:
    eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
assert not eff >> 24 & 1, "CAP_SYS_RESOURCE is still effective"
try:
    blockfs.grow_filesystem(sys.argv[1], sys.argv[2], "ext4")
except CSIError as e:
    print(type(e).__name__, e)
    sys.exit(3)
print("ok")
"""


def _grow_without_cap_sys_resource(device: str, mount_point: str) -> Result:
    return run(
        [
            "setpriv",
            "--bounding-set=-sys_resource",
            "--inh-caps=-sys_resource",
            "--",
            sys.executable,
            "-c",
            _CHILD,
            device,
            mount_point,
        ],
        check=False,
    )


@pytest.fixture
def ext4_loop(tmp_path: Path) -> Iterator[tuple[str, str, loop.LoopAttachment]]:
    """(image, mount point, attachment): a 64 MiB ext4 on a loop device, not yet mounted."""
    for tool in ("mkfs.ext4", "resize2fs", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    image = str(tmp_path / "vol.img")
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    att = loop.attach(image, direct_io=False, block_size=4096)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        blockfs.make_filesystem(att.path, "ext4")
        yield image, str(mnt), att
    finally:
        unmount_stack(str(mnt))
        att.close()
        loop.detach(att.device)


def test_ext4_grown_offline_then_expanded_online_without_cap_sys_resource(
    ext4_loop: tuple[str, str, loop.LoopAttachment],
) -> None:
    image, mnt, att = ext4_loop
    device = att.path
    # The controller grew the volume while it was not staged; NodeStage grows ext4 offline.
    os.truncate(image, 128 * MiB)
    loop.set_capacity(att.device)
    assert not blockfs.fills_device(device, "ext4")
    assert blockfs.grow_unmounted(device, "ext4")
    assert blockfs.fills_device(device, "ext4")
    mount(device, mnt, "ext4", [])
    # The kubelet's NodeExpandVolume that follows: nothing to grow, so OK without the capability.
    first = _grow_without_cap_sys_resource(device, mnt)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.strip() == "ok"
    # The same child is refused once there is something to grow: the capability is really missing.
    os.truncate(image, 192 * MiB)
    loop.set_capacity(att.device)
    second = _grow_without_cap_sys_resource(device, mnt)
    assert second.returncode == 3, second.stdout + second.stderr
    assert "FailedPrecondition" in second.stdout and "CAP_SYS_RESOURCE" in second.stdout
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize < 130 * MiB  # the refused grow changed nothing
