"""Every test of the conformance suite against the loopfile backend, three
times: ext4 volumes, XFS volumes and raw block volumes.

The driver is a `csi-kit serve --backend loopfile` child process whose root
is a directory on a loop-mounted XFS filesystem with reflinks, as the issue
asks.  Needs root (loop devices, mounts); skipped elsewhere.

The directory's conftest.py points the session-wide `csi_sanity_config` at
the hostPath driver; this module overrides it, and `csi_sanity` with it, at
module scope, parametrized over the three access configurations, so each
configuration gets its own driver and its own suite run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from csi_kit.testing.sanity import *  # noqa: F403
from csi_kit.testing.sanity import SanityConfig
from csi_kit.testing.sanity._support import SanityContext

pytestmark = pytest.mark.privileged

MiB = 1 << 20

#: (access type, fs type, volume size): XFS cannot be made below 300 MiB.
CONFIGURATIONS = {
    "ext4": ("mount", "ext4", 64 * MiB),
    "xfs": ("mount", "xfs", 300 * MiB),
    "block": ("block", "", 32 * MiB),
}


@pytest.fixture(scope="module")
def loopfile_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A directory on a loop-mounted XFS (reflink=1) filesystem."""
    if os.geteuid() != 0:
        pytest.skip("needs root (real mounts and loop devices)")
    for tool in ("mkfs.xfs", "mkfs.ext4", "blkid", "e2fsck", "resize2fs", "xfs_growfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    from csi_kit.testing.fsimage import loop_mounted_fs

    with loop_mounted_fs(str(tmp_path_factory.mktemp("loopfile-xfs")), "xfs", 8192) as mount_point:
        yield mount_point


@pytest.fixture(scope="module", params=sorted(CONFIGURATIONS))
def csi_sanity_config(
    request: pytest.FixtureRequest, loopfile_root: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SanityConfig]:
    from csi_kit.testing.driver import driver_process, running_driver

    access_type, fs_type, size = CONFIGURATIONS[request.param]
    root = os.path.join(loopfile_root, request.param)
    os.makedirs(root, exist_ok=True)
    state = str(tmp_path_factory.mktemp(f"loopfile-{request.param}-state"))
    kw = {
        "backend": "loopfile",
        "backend_options": {"root": root},
        "node_id": "node-1",
        "driver_name": "loopfile.csi-kit.io",
    }

    def config(endpoint: str) -> SanityConfig:
        return SanityConfig(
            endpoint=endpoint,
            mount_dir=str(tmp_path_factory.mktemp("sanity-mounts")),
            volume_size=size,
            access_type=access_type,
            fs_type=fs_type,
            driver_roots=(root, state),
            idempotency_repeats=int(os.environ.get("CSI_SANITY_REPEATS", "5")),
            modify_parameters={"allocation": "preallocated"},
        )

    if os.environ.get("CSI_SANITY_DRIVER") == "thread":
        with running_driver(state, **kw) as endpoint:  # type: ignore[arg-type]
            yield config(endpoint)
    else:
        with driver_process(state, **kw) as proc:  # type: ignore[arg-type]
            yield config(proc.endpoint)


@pytest.fixture(scope="module")
def csi_sanity(csi_sanity_config: SanityConfig) -> Iterator[SanityContext]:
    """One connection per configuration (the plugin's is per session)."""
    try:
        ctx = SanityContext(csi_sanity_config)
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    yield ctx
    ctx.close()
