"""The conformance suite against an LVM-backed csi_kit driver: ext4, XFS and raw block.

The driver serves the lvm backend on the module's VG and 1 GiB thin pool
(conftest.py), in this process by default (a real gRPC server on a unix
socket; ``CSI_SANITY_DRIVER=process`` runs ``csi-kit serve`` as a child
instead, which costs another Python start-up under TCG).

Every ``lvm`` command costs 0.5-4 s in the TCG guest, so the whole suite (a
thousand tests over three configurations) would take hours there.  By
default only `FOCUS` runs: the tests that exercise what this backend does
itself (create, delete, restore, clone, snapshot, expand, capacity,
topology, publish with data, stats, idempotency of a restore); the rest are
deselected at collection (tests/backends/lvm/conftest.py), so they cost nothing in the
guest.  The node side is the shared BlockDeviceBackend, which
the loopfile backend's full run covers.  ``CSI_KIT_LVM_SANITY=full`` runs them
all (natively on a device-mapper kernel, or with patience).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from csi_kit.testing.sanity import *  # noqa: F403
from csi_kit.testing.sanity import SanityConfig
from csi_kit.testing.sanity._support import SanityContext

pytestmark = [pytest.mark.lvm, pytest.mark.privileged]

MiB = 1 << 20

#: (access type, fs type, volume size): XFS cannot be made below 300 MiB.
CONFIGURATIONS = {
    "ext4": ("mount", "ext4", 64 * MiB),
    "xfs": ("mount", "xfs", 300 * MiB),
    "block": ("block", "", 32 * MiB),
}

FOCUS = frozenset(
    {
        "TestCreateVolume::test_from_snapshot",
        "TestCreateVolume::test_from_volume",
        "TestDeleteVolume::test_snapshots_survive_volume_delete",
        "TestControllerExpandVolume::test_grows_the_volume",
        "TestTopology::test_unreachable_requisite_is_resource_exhausted",
        "TestTopology::test_get_capacity_for_node_topology",
        "TestCapacityLimits::test_above_maximum_volume_size_refused",
        "TestCreateSnapshot::test_returns_required_fields",
        "TestDeleteSnapshot::test_deletes_the_snapshot",
        "TestNodeLifecycle::test_publish_write_unpublish",
        "TestNodeLifecycle::test_restored_volume_has_snapshot_data",
        "TestNodeLifecycle::test_clone_is_independent",
        "TestNodeGetVolumeStats::test_reports_usage_of_published_volume",
        "TestNodeExpandVolume::test_expands_published_volume",
        "TestIdempotency::test_create_volume_from_snapshot",
        "TestModifyVolume::test_valid_change_succeeds_repeatedly",
        "TestModifyVolume::test_unknown_volume_is_not_found",
    }
)


@pytest.fixture(scope="module", params=sorted(CONFIGURATIONS))
def csi_sanity_config(
    request: pytest.FixtureRequest, vg: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SanityConfig]:
    from csi_kit.testing.driver import driver_process, running_driver

    access_type, fs_type, size = CONFIGURATIONS[request.param]
    state = str(tmp_path_factory.mktemp(f"lvm-{request.param}-state"))
    kw = {
        "backend": "lvm",
        "backend_options": {"volume_group": vg, "thin_pool": "pool"},
        "node_id": "node-1",
        "driver_name": "lvm.csi-kit.io",
    }

    def config(endpoint: str) -> SanityConfig:
        return SanityConfig(
            endpoint=endpoint,
            mount_dir=str(tmp_path_factory.mktemp("sanity-mounts")),
            volume_size=size,
            access_type=access_type,
            fs_type=fs_type,
            driver_roots=(state,),
            idempotency_repeats=int(os.environ.get("CSI_SANITY_REPEATS", "2")),
            concurrency=2,
            modify_parameters={"readahead": "256"},
        )

    if os.environ.get("CSI_SANITY_DRIVER", "thread") == "thread":
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
