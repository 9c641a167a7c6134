"""A hypothesis state machine that interleaves create / snapshot / restore /
clone / expand / stage / publish / write / unpublish / unstage / delete
against the driver and checks it against a model.

Invariants: the same name (and request) always gives the same id; every
error code is one the spec's tables allow for that RPC, and one the model
expects; sizes never shrink; data written before a snapshot is what a
restored volume reads, and a clone is independent of its source (when the
suite can see the published path); after teardown no mounts and no loop
devices that the run created are left.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from csi_kit._pb import csi_pb2 as pb
from csi_kit.testing.sanity._support import (
    C,
    CtrlCap,
    Published,
    Resources,
    SanityContext,
    allowed_codes,
    block_read,
    block_write,
    no_new_mounts_or_loops,
    read_tokens,
    unique_name,
    write_token,
)

__all__ = ["TestStateMachine"]


@attrs.define
class VolModel:
    volume_id: str
    name: str
    request: Any
    capacity: int
    files: dict[str, bytes]
    published: Published | None = None


@attrs.define
class SnapModel:
    snapshot_id: str
    source: str
    files: dict[str, bytes]


def _checked(
    ctx: SanityContext, rpc: str, fn: Callable[[], Any], expected: Iterable[grpc.StatusCode] = ()
) -> Any:
    """Call; an error must be allowed by the spec for `rpc` *and* expected by
    the model here.  Returns the response, or the error if it was expected."""
    try:
        return fn()
    except grpc.RpcError as err:
        code = err.code()
        assert code in allowed_codes(rpc), (
            f"{rpc} answered {code.name}, which its spec error table does not allow: {err.details()}"
        )
        if code in tuple(expected):
            return err
        raise AssertionError(
            f"{rpc} failed where the model expected success: {code.name}: {err.details()}"
        ) from None


def machine_for(ctx: SanityContext, *, node: bool) -> type[RuleBasedStateMachine]:
    """A state machine class bound to the driver under test."""
    caps = ctx.caps.controller
    snapshots = CtrlCap.CREATE_DELETE_SNAPSHOT in caps
    clones = CtrlCap.CLONE_VOLUME in caps
    expands = CtrlCap.EXPAND_VOLUME in caps
    get_volume = CtrlCap.GET_VOLUME in caps
    data = node
    block = ctx.config.access_type == "block"
    size = ctx.config.volume_size

    class CSIMachine(RuleBasedStateMachine):
        volumes = Bundle("volumes")
        snaps = Bundle("snapshots")

        def __init__(self) -> None:
            super().__init__()
            self.res = Resources(ctx)
            ctx.tracker = self.res
            self.vols: dict[str, VolModel] = {}
            self.snapshots: dict[str, SnapModel] = {}
            self.names: dict[str, str] = {}
            self.counter = 0

        # -- creation ------------------------------------------------------

        def _source_gone(self, req: Any) -> bool:
            src = req.volume_content_source
            if src.HasField("snapshot"):
                return src.snapshot.snapshot_id not in self.snapshots
            if src.HasField("volume"):
                return src.volume.volume_id not in self.vols
            return False

        def _create(self, req: Any, files: dict[str, bytes]) -> VolModel | None:
            # Replaying a request whose source has since been deleted may be
            # answered OK (idempotency) or NOT_FOUND (source gone): the spec
            # has rules for both.
            expected = (C.OUT_OF_RANGE, C.NOT_FOUND) if self._source_gone(req) else (C.OUT_OF_RANGE,)
            resp = _checked(ctx, "CreateVolume", lambda: ctx.controller.CreateVolume(req), expected)
            if isinstance(resp, grpc.RpcError):
                return self.vols.get(self.names.get(req.name, "")) if resp.code() == C.NOT_FOUND else None
            vol = resp.volume
            self.res.track_volume(vol.volume_id)
            if req.name in self.names:
                assert vol.volume_id == self.names[req.name], (
                    "same name and request gave a different volume id"
                )
                return self.vols[vol.volume_id]
            assert vol.volume_id not in self.vols, "a new name was given an existing volume's id"
            assert vol.capacity_bytes == 0 or vol.capacity_bytes >= req.capacity_range.required_bytes
            m = VolModel(vol.volume_id, req.name, req, vol.capacity_bytes, dict(files))
            self.vols[vol.volume_id] = m
            self.names[req.name] = vol.volume_id
            return m

        @initialize(target=volumes)
        def first_volume(self) -> str:
            m = self._create(ctx.create_request(), {})
            assert m is not None
            return m.volume_id

        @rule(target=volumes, mult=st.integers(1, 3))
        def create_volume(self, mult: int) -> str:
            m = self._create(ctx.create_request(size=size * mult), {})
            assert m is not None
            return m.volume_id

        @rule(vid=volumes)
        def repeat_create(self, vid: str) -> None:
            """Replaying a volume's CreateVolume answers the same volume."""
            m = self.vols.get(vid)
            if m is None:
                return
            again = self._create(m.request, {})
            assert again is m

        @precondition(lambda self: snapshots)
        @rule(target=snaps, vid=volumes)
        def snapshot(self, vid: str) -> str:
            m = self.vols.get(vid)
            if m is None:
                return "sanity-deleted-source"
            req = ctx.snapshot_request(vid)
            resp = _checked(ctx, "CreateSnapshot", lambda: ctx.controller.CreateSnapshot(req))
            snap = resp.snapshot
            self.res.track_snapshot(snap.snapshot_id)
            assert snap.source_volume_id == vid
            assert snap.snapshot_id not in self.snapshots, "a new snapshot name got an existing snapshot id"
            self.snapshots[snap.snapshot_id] = SnapModel(snap.snapshot_id, vid, dict(m.files))
            return str(snap.snapshot_id)

        @precondition(lambda self: snapshots)
        @rule(target=volumes, sid=snaps)
        def restore(self, sid: str) -> str:
            s = self.snapshots.get(sid)
            req = ctx.create_request()
            req.volume_content_source.snapshot.snapshot_id = sid
            if s is None:
                got = _checked(ctx, "CreateVolume", lambda: ctx.controller.CreateVolume(req), (C.NOT_FOUND,))
                if not isinstance(got, grpc.RpcError):
                    self.res.track_volume(got.volume.volume_id)
                    raise AssertionError(f"CreateVolume from the deleted snapshot {sid} succeeded")
                return "sanity-never-made"
            m = self._create(req, s.files)
            return m.volume_id if m else "sanity-never-made"

        @precondition(lambda self: clones)
        @rule(target=volumes, vid=volumes)
        def clone(self, vid: str) -> str:
            src = self.vols.get(vid)
            if src is None:
                return "sanity-never-made"
            req = ctx.create_request(size=max(size, src.capacity))
            req.volume_content_source.volume.volume_id = vid
            m = self._create(req, src.files)
            return m.volume_id if m else "sanity-never-made"

        @precondition(lambda self: expands)
        @rule(vid=volumes, grow=st.integers(0, 2))
        def expand(self, vid: str, grow: int) -> None:
            m = self.vols.get(vid)
            if m is None:
                return
            want = max(m.capacity, size) + grow * size
            req = pb.ControllerExpandVolumeRequest(volume_id=vid)
            req.capacity_range.required_bytes = want
            resp = _checked(
                ctx,
                "ControllerExpandVolume",
                lambda: ctx.controller.ControllerExpandVolume(req),
                (C.FAILED_PRECONDITION,) if m.published else (),
            )
            if isinstance(resp, grpc.RpcError):
                return
            assert resp.capacity_bytes >= want, f"expanded to {resp.capacity_bytes}, asked for {want}"
            assert resp.capacity_bytes >= m.capacity, "ControllerExpandVolume shrank the volume"
            m.capacity = resp.capacity_bytes

        # -- node -------------------------------------------------------------

        @precondition(lambda self: node)
        @rule(vid=volumes, readonly=st.booleans())
        def publish(self, vid: str, readonly: bool) -> None:
            m = self.vols.get(vid)
            if m is None or m.published is not None:
                return
            m.published = self.res.publish(vid, readonly=readonly)
            if data and block:
                # Only the blocks the run wrote are known; each must read back.
                for key, payload in m.files.items():
                    got_bytes = block_read(m.published.target_path, int(key), len(payload))
                    assert got_bytes == payload, (
                        f"volume {vid}: block at offset {key} does not hold what was written"
                    )
            elif data:
                got = read_tokens(m.published.target_path)
                assert got == m.files, (
                    f"volume {vid} shows {sorted(got)} through its published path, expected {sorted(m.files)}"
                )

        @precondition(lambda self: data)
        @rule(vid=volumes)
        def write(self, vid: str) -> None:
            m = self.vols.get(vid)
            if m is None or m.published is None or m.published.readonly:
                return
            self.counter += 1
            token = f"{self.counter}-{unique_name('w')[-6:]}"
            if block:
                # Distinct 4 KiB-aligned blocks past the first MiB, within the volume.
                offset = (1 << 20 if size >= 4 << 20 else 0) + (self.counter % 64) * 4096
                payload = token.encode().ljust(512, b"#")
                block_write(m.published.target_path, offset, payload)
                m.files[str(offset)] = payload
            else:
                m.files[token] = write_token(m.published.target_path, token)

        @precondition(lambda self: node)
        @rule(vid=volumes)
        def unpublish(self, vid: str) -> None:
            m = self.vols.get(vid)
            if m is None or m.published is None:
                return
            self.res.unpublish(m.published)
            assert not os.path.lexists(m.published.target_path), "target path left after NodeUnpublishVolume"
            m.published = None

        # -- deletion ------------------------------------------------------------

        @rule(vid=consumes(volumes))
        def delete_volume(self, vid: str) -> None:
            m = self.vols.get(vid)
            if m is not None and m.published is not None:
                self.unpublish(vid)
            req = ctx.delete_volume_request(vid)
            resp = _checked(
                ctx, "DeleteVolume", lambda: ctx.controller.DeleteVolume(req), (C.FAILED_PRECONDITION,)
            )
            if isinstance(resp, grpc.RpcError):
                return  # refused: the driver keeps volumes with snapshots
            self.res.forget_volume(vid)
            if m is not None:
                del self.vols[vid]
                del self.names[m.name]
            if get_volume:
                _checked(
                    ctx,
                    "ControllerGetVolume",
                    lambda: ctx.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vid)),
                    (C.NOT_FOUND,),
                )

        @precondition(lambda self: snapshots)
        @rule(sid=consumes(snaps))
        def delete_snapshot(self, sid: str) -> None:
            req = ctx.delete_snapshot_request(sid)
            _checked(ctx, "DeleteSnapshot", lambda: ctx.controller.DeleteSnapshot(req))
            self.res.forget_snapshot(sid)
            self.snapshots.pop(sid, None)

        # -- invariants --------------------------------------------------------------

        @precondition(lambda self: get_volume)
        @invariant()
        def sizes_never_shrink(self) -> None:
            for vid, m in self.vols.items():
                got = ctx.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vid)).volume
                assert got.capacity_bytes >= m.capacity, (
                    f"volume {vid} shrank from {m.capacity} to {got.capacity_bytes}"
                )

        def teardown(self) -> None:
            ctx.tracker = None
            problems = self.res.cleanup()
            assert not problems, "teardown failed:\n  " + "\n  ".join(problems)

    return CSIMachine


def _run(ctx: SanityContext, node: bool) -> None:
    ctx.need_controller(CtrlCap.CREATE_DELETE_VOLUME)
    machine = machine_for(ctx, node=node)
    ids: list[str] = []
    probe = Resources(ctx)
    workdir = probe.workdir

    class Recording(machine):  # type: ignore[valid-type, misc]
        def __init__(self) -> None:
            super().__init__()
            self.res._workdir = ctx.scratch("sm-", workdir)  # keep every run under one watched dir

        def teardown(self) -> None:
            ids.extend(self.vols)
            ids.extend(self.snapshots)
            super().teardown()

    with no_new_mounts_or_loops(ctx, lambda: ids, workdir):
        run_state_machine_as_test(
            Recording,
            settings=settings(
                max_examples=ctx.config.hypothesis_examples,
                stateful_step_count=ctx.config.hypothesis_steps,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                print_blob=False,
            ),
        )
    probe.cleanup()


class TestStateMachine:
    def test_controller_state_machine(self, csi_sanity: SanityContext) -> None:
        """Create / snapshot / restore / clone / expand / delete, interleaved."""
        _run(csi_sanity, node=False)

    @pytest.mark.privileged
    def test_full_state_machine(self, csi_sanity: SanityContext) -> None:
        """The controller rules plus stage / publish / write / unpublish /
        unstage, with data checks through the published path."""
        _run(csi_sanity, node=True)
