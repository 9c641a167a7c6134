"""Concurrent duplicate requests, as a CO that lost its state sends them:
every success names the same object, every failure is ABORTED (the spec's
"operation pending"), and exactly one object exists afterwards."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.sanity._support import C, CtrlCap, Resources, SanityContext

__all__ = ["TestConcurrency"]


def _storm(n: int, fn: Callable[[], Any]) -> tuple[list[Any], list[grpc.RpcError]]:
    """Run `fn` from n threads released together."""
    gate = threading.Barrier(n)

    def one() -> Any:
        gate.wait()
        return fn()

    ok: list[Any] = []
    errors: list[grpc.RpcError] = []
    with ThreadPoolExecutor(max_workers=n) as pool:
        for fut in [pool.submit(one) for _ in range(n)]:
            try:
                ok.append(fut.result())
            except grpc.RpcError as err:
                errors.append(err)
    return ok, errors


def _only_aborted(errors: list[grpc.RpcError], rpc: str) -> None:
    bad = [f"{e.code().name}: {e.details()}" for e in errors if e.code() != C.ABORTED]
    assert not bad, f"concurrent duplicate {rpc} calls failed with codes other than ABORTED: {bad}"


class TestConcurrency:
    def test_duplicate_create_volume_makes_one_volume(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        from csi_kit.testing.sanity.test_controller import _list_all_volumes

        listing = CtrlCap.LIST_VOLUMES in csi_sanity.caps.controller
        before = set(_list_all_volumes(csi_sanity)) if listing else set()
        req = csi_sanity.create_request()
        ok, errors = _storm(csi_sanity.config.concurrency, lambda: csi_sanity.controller.CreateVolume(req))
        for r in ok:
            csi_resources.track_volume(r.volume.volume_id)
        _only_aborted(errors, "CreateVolume")
        final = csi_resources.create_volume_from(req)  # the CO's retry after the storm
        ids = {r.volume.volume_id for r in ok} | {final.volume_id}
        assert ids == {final.volume_id}, (
            f"concurrent duplicate CreateVolume made {len(ids)} volumes: {sorted(ids)}"
        )
        if listing:
            made = set(_list_all_volumes(csi_sanity)) - before
            assert made == {final.volume_id}, (
                f"ListVolumes shows {len(made)} new volumes, expected exactly one"
            )

    def test_duplicate_create_snapshot_makes_one_snapshot(
        self, csi_sanity: SanityContext, csi_resources: Resources
    ) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_SNAPSHOT)
        vol = csi_resources.create_volume()
        req = csi_sanity.snapshot_request(vol.volume_id)
        ok, errors = _storm(csi_sanity.config.concurrency, lambda: csi_sanity.controller.CreateSnapshot(req))
        for r in ok:
            csi_resources.track_snapshot(r.snapshot.snapshot_id)
        _only_aborted(errors, "CreateSnapshot")
        final = csi_resources.create_snapshot(vol.volume_id, req.name)
        ids = {r.snapshot.snapshot_id for r in ok} | {final.snapshot_id}
        assert ids == {final.snapshot_id}, f"concurrent duplicate CreateSnapshot made {len(ids)} snapshots"
        if CtrlCap.LIST_SNAPSHOTS in csi_sanity.caps.controller:
            resp = csi_sanity.controller.ListSnapshots(
                pb.ListSnapshotsRequest(source_volume_id=vol.volume_id)
            )
            assert [e.snapshot.snapshot_id for e in resp.entries] == [final.snapshot_id]

    def test_distinct_creates_in_parallel(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        """Different names at once all succeed: no global lock answers ABORTED."""
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        n = csi_sanity.config.concurrency
        reqs = iter([csi_sanity.create_request() for _ in range(n)])
        lock = threading.Lock()

        def create() -> Any:
            with lock:
                req = next(reqs)
            return csi_sanity.controller.CreateVolume(req)

        ok, errors = _storm(n, create)
        for r in ok:
            csi_resources.track_volume(r.volume.volume_id)
        assert not errors, (
            f"parallel CreateVolume with distinct names failed: {[e.code().name for e in errors]}"
        )
        assert len({r.volume.volume_id for r in ok}) == n, "distinct names gave shared volume ids"

    def test_duplicate_delete_volume(self, csi_sanity: SanityContext, csi_resources: Resources) -> None:
        csi_sanity.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
        vol = csi_resources.create_volume()
        req = csi_sanity.delete_volume_request(vol.volume_id)
        _, errors = _storm(csi_sanity.config.concurrency, lambda: csi_sanity.controller.DeleteVolume(req))
        _only_aborted(errors, "DeleteVolume")
        csi_resources.delete_volume(vol.volume_id)
