"""The suite's toolbox: a connection to the driver, request builders, error
checks, the resource tracker, and the host observations (mounts, loop
devices, canary files) behind the "nothing leaked, nothing touched" checks.

Only the generated stubs are used to talk to the driver: the suite must work
against any CSI endpoint in any language, so nothing from the csi_kit server
side is imported here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import grpc
import pytest

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit.testing.sanity.config import SanityConfig

C = grpc.StatusCode

CtrlCap = pb.ControllerServiceCapability.RPC
NodeCap = pb.NodeServiceCapability.RPC
PluginSvc = pb.PluginCapability.Service
GroupCap = pb.GroupControllerServiceCapability.RPC
Mode = pb.VolumeCapability.AccessMode

#: Codes any RPC may answer (the spec's general error table).
GENERAL_CODES = frozenset({C.INVALID_ARGUMENT, C.PERMISSION_DENIED, C.ABORTED, C.UNAUTHENTICATED})

#: Per-RPC codes from the spec's error tables, on top of GENERAL_CODES.
SPEC_CODES: dict[str, frozenset[grpc.StatusCode]] = {
    "CreateVolume": frozenset({C.NOT_FOUND, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED, C.OUT_OF_RANGE}),
    "DeleteVolume": frozenset({C.FAILED_PRECONDITION}),
    "ControllerPublishVolume": frozenset(
        {C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED}
    ),
    "ControllerUnpublishVolume": frozenset({C.NOT_FOUND}),
    "ValidateVolumeCapabilities": frozenset({C.NOT_FOUND}),
    "ListVolumes": frozenset(),
    "ControllerGetVolume": frozenset({C.NOT_FOUND}),
    "ControllerModifyVolume": frozenset({C.NOT_FOUND}),
    "CreateSnapshot": frozenset({C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED, C.NOT_FOUND}),
    "DeleteSnapshot": frozenset({C.FAILED_PRECONDITION}),
    "ListSnapshots": frozenset(),
    "GetSnapshot": frozenset({C.NOT_FOUND}),
    "ControllerExpandVolume": frozenset({C.NOT_FOUND, C.FAILED_PRECONDITION, C.OUT_OF_RANGE}),
    "NodeStageVolume": frozenset({C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION}),
    "NodeUnstageVolume": frozenset({C.NOT_FOUND}),
    "NodePublishVolume": frozenset({C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION}),
    "NodeUnpublishVolume": frozenset({C.NOT_FOUND}),
    "NodeGetVolumeStats": frozenset({C.NOT_FOUND}),
    "NodeExpandVolume": frozenset({C.NOT_FOUND, C.FAILED_PRECONDITION, C.OUT_OF_RANGE}),
    "CreateVolumeGroupSnapshot": frozenset({C.ALREADY_EXISTS, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED}),
    "DeleteVolumeGroupSnapshot": frozenset({C.FAILED_PRECONDITION}),
    "GetVolumeGroupSnapshot": frozenset({C.NOT_FOUND}),
}


def allowed_codes(rpc: str) -> frozenset[grpc.StatusCode]:
    """Every error code the spec lets `rpc` answer."""
    return GENERAL_CODES | SPEC_CODES.get(rpc, frozenset())


def unique_name(prefix: str) -> str:
    """A CO-style name, unique per call, well under the 128-byte limit."""
    return f"sanity-{prefix}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------
# Calling the driver
# --------------------------------------------------------------------------


class RpcFailed(AssertionError):
    """A call that the test needed to succeed answered an error."""


def _describe(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return f"{code.name if code else '?'}: {details}"


def expect_error(
    call: Callable[..., Any], request: Any, codes: grpc.StatusCode | Sequence[grpc.StatusCode], **kw: Any
) -> grpc.RpcError:
    """Call and insist on an error whose code is one of `codes`.

    The spec also requires a human readable `status.message` with every
    non-OK code, so an empty message fails too.
    """
    wanted = (codes,) if isinstance(codes, grpc.StatusCode) else tuple(codes)
    names = " or ".join(c.name for c in wanted)
    rpc = _rpc_name(call)
    try:
        response = call(request, **kw)
    except grpc.RpcError as err:
        if err.code() not in wanted:
            raise AssertionError(f"{rpc}: expected {names}, got {_describe(err)}") from None
        assert err.details(), f"{rpc}: {err.code().name} without a status message (the spec requires one)"
        return err
    raise AssertionError(f"{rpc}: expected {names}, got OK: {str(response)[:300]!r}")


def call_ok_or(
    call: Callable[..., Any], request: Any, codes: Sequence[grpc.StatusCode], **kw: Any
) -> tuple[Any, grpc.RpcError | None]:
    """Call; accept success or one of `codes`.  Returns (response, error)."""
    rpc = _rpc_name(call)
    try:
        return call(request, **kw), None
    except grpc.RpcError as err:
        if err.code() not in codes:
            wanted = ", ".join(["OK", *(c.name for c in codes)])
            raise AssertionError(f"{rpc}: expected one of {wanted}, got {_describe(err)}") from None
        return None, err


def _rpc_name(call: Callable[..., Any]) -> str:
    name = getattr(call, "_csi_rpc", None) or getattr(call, "_method", b"")
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return str(name).rsplit("/", 1)[-1] or repr(call)


#: RPCs whose success makes something that must be cleaned up.
_CREATING = frozenset({"CreateVolume", "CreateSnapshot", "CreateVolumeGroupSnapshot"})


class _TimedStub:
    """Wraps a generated stub so every call carries the configured deadline
    and a readable RPC name (for error messages)."""

    def __init__(self, stub: Any, timeout: float, on_created: Callable[[str, Any], None]) -> None:
        self._stub = stub
        self._timeout = timeout
        self._on_created = on_created

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._stub, name)
        timeout = self._timeout
        on_created = self._on_created if name in _CREATING else None

        def call(request: Any, **kw: Any) -> Any:
            kw.setdefault("timeout", timeout)
            try:
                response = method(request, **kw)
                if on_created is not None:
                    on_created(name, response)
                return response
            except grpc.RpcError as err:
                if err.code() == C.UNAVAILABLE:
                    # The driver went away: every later test would fail the
                    # same way, so say it plainly.
                    raise AssertionError(f"{name}: driver unavailable (crashed?): {err.details()}") from None
                raise

        call._csi_rpc = name  # type: ignore[attr-defined]
        call.__name__ = name
        return call


def make_channel(target: str) -> grpc.Channel:
    """A channel to `target` (`unix:///path` or `host:port`) without proxies."""
    return grpc.insecure_channel(
        target,
        options=[
            ("grpc.enable_http_proxy", 0),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            # Drivers may echo a hostile 10 KiB id in a status message; above
            # the default 8 KiB soft limit gRPC drops such replies at random,
            # which would make the hostile-input tests flaky.
            ("grpc.max_metadata_size", 256 * 1024),
            ("grpc.absolute_max_metadata_size", 512 * 1024),
        ],
    )


@attrs.frozen
class Capabilities:
    """What the driver advertises, read once per session."""

    plugin: frozenset[int]
    expansion: frozenset[int]
    controller: frozenset[int]
    node: frozenset[int]
    group: frozenset[int]


class SanityContext:
    """The session's connection to the driver under test.

    Holds the stubs (wrapped with the configured deadline), the advertised
    capabilities and the node's id, and the session's scratch directories.
    """

    def __init__(self, config: SanityConfig) -> None:
        self.config = config
        self.channel = make_channel(config.endpoint)
        if config.controller_endpoint and config.controller_endpoint != config.endpoint:
            self.controller_channel = make_channel(config.controller_endpoint)
        else:
            self.controller_channel = self.channel
        for ch in {
            id(self.channel): self.channel,
            id(self.controller_channel): self.controller_channel,
        }.values():
            try:
                grpc.channel_ready_future(ch).result(timeout=config.connect_timeout)
            except grpc.FutureTimeoutError:
                raise RuntimeError(
                    f"cannot connect to the CSI driver at {config.endpoint} within {config.connect_timeout}s"
                ) from None
        t, hook = config.rpc_timeout, self._created
        self.identity: Any = _TimedStub(pbg.IdentityStub(self.channel), t, hook)
        self.controller_identity: Any = _TimedStub(pbg.IdentityStub(self.controller_channel), t, hook)
        self.controller: Any = _TimedStub(pbg.ControllerStub(self.controller_channel), t, hook)
        self.group: Any = _TimedStub(pbg.GroupControllerStub(self.controller_channel), t, hook)
        self.node: Any = _TimedStub(pbg.NodeStub(self.channel), t, hook)
        self._tmp_base: str | None = None
        #: Where objects made by any call are recorded for cleanup: the
        #: running test's Resources, else a session-wide one.
        self.tracker: Resources | None = None
        self.session_resources = Resources(self)
        self.canary = Canary.create(self.scratch("canary-"))

    def check_canary(self) -> None:
        """Assert the canary is intact; if not, raise after replacing it, so
        that only the test that damaged it fails."""
        try:
            self.canary.assert_intact()
        except AssertionError:
            self.canary = Canary.create(self.scratch("canary-"))
            raise

    def _created(self, rpc: str, response: Any) -> None:
        """Record whatever a successful create made — also when a test
        expected an error — so that nothing the suite causes is leaked."""
        res = self.tracker or self.session_resources
        if rpc == "CreateVolume":
            res.track_volume(response.volume.volume_id)
        elif rpc == "CreateSnapshot":
            res.track_snapshot(response.snapshot.snapshot_id)
        else:
            g = response.group_snapshot
            if g.group_snapshot_id and all(g.group_snapshot_id != gid for gid, _ in res.groups):
                res.groups.append((g.group_snapshot_id, [s.snapshot_id for s in g.snapshots]))

    # -- capabilities ---------------------------------------------------

    @functools.cached_property
    def caps(self) -> Capabilities:
        plugin: set[int] = set()
        expansion: set[int] = set()
        for identity in {
            id(self.identity): self.identity,
            id(self.controller_identity): self.controller_identity,
        }.values():
            for cap in identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities:
                if cap.HasField("service"):
                    plugin.add(cap.service.type)
                elif cap.HasField("volume_expansion"):
                    expansion.add(cap.volume_expansion.type)
        controller: set[int] = set()
        if PluginSvc.CONTROLLER_SERVICE in plugin:
            resp = self.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
            controller = {c.rpc.type for c in resp.capabilities}
        node = {
            c.rpc.type for c in self.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities
        }
        group: set[int] = set()
        if PluginSvc.GROUP_CONTROLLER_SERVICE in plugin:
            resp = self.group.GroupControllerGetCapabilities(pb.GroupControllerGetCapabilitiesRequest())
            group = {c.rpc.type for c in resp.capabilities}
        return Capabilities(
            frozenset(plugin), frozenset(expansion), frozenset(controller), frozenset(node), frozenset(group)
        )

    @functools.cached_property
    def node_info(self) -> Any:
        return self.node.NodeGetInfo(pb.NodeGetInfoRequest())

    def need_controller(self, *caps: int) -> None:
        """Skip the calling test unless the controller advertises all `caps`."""
        if PluginSvc.CONTROLLER_SERVICE not in self.caps.plugin:
            pytest.skip("driver does not advertise CONTROLLER_SERVICE")
        for cap in caps:
            if cap not in self.caps.controller:
                pytest.skip(f"controller does not advertise {CtrlCap.Type.Name(cap)}")

    def need_node(self, *caps: int) -> None:
        for cap in caps:
            if cap not in self.caps.node:
                pytest.skip(f"node does not advertise {NodeCap.Type.Name(cap)}")

    def need_group(self, *caps: int) -> None:
        if PluginSvc.GROUP_CONTROLLER_SERVICE not in self.caps.plugin:
            pytest.skip("driver does not advertise GROUP_CONTROLLER_SERVICE")
        for cap in caps:
            if cap not in self.caps.group:
                pytest.skip(f"group controller does not advertise {GroupCap.Type.Name(cap)}")

    @functools.cached_property
    def _host_namespace(self) -> str | None:
        return host_mount_namespace()

    def need_private_mount_namespace(self) -> None:
        """Skip the calling test when it would attack node paths in the
        machine's own mount namespace: a faulty driver's unmount storm (or a
        mount over /etc) must stay inside a namespace made for the run."""
        if self.config.allow_host_namespace:
            return
        reason = self._host_namespace
        if reason is not None:
            pytest.skip(
                f"node-path attacks need a private mount namespace ({reason}): run the suite under "
                "`unshare -m --propagation private`, or pass --allow-host-namespace on a disposable node"
            )

    @property
    def stages(self) -> bool:
        return NodeCap.STAGE_UNSTAGE_VOLUME in self.caps.node

    @property
    def controller_publishes(self) -> bool:
        return CtrlCap.PUBLISH_UNPUBLISH_VOLUME in self.caps.controller

    # -- scratch directories ---------------------------------------------

    def scratch(self, prefix: str, parent: str | None = None) -> str:
        """A fresh directory for this run (under `parent`, the configured
        mount dir, or a private temporary directory)."""
        if parent is None:
            if self._tmp_base is None:
                self._tmp_base = tempfile.mkdtemp(prefix="csi-sanity-")
            parent = self._tmp_base
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix=prefix, dir=parent)

    def close(self) -> list[str]:
        """Undo what no test tracked; returns what could not be undone."""
        problems = self.session_resources.cleanup()
        try:
            self.canary.assert_intact()
        except AssertionError as err:
            problems.append(str(err))
        if self._tmp_base is not None and not mounts_under(self._tmp_base):
            shutil.rmtree(self._tmp_base, ignore_errors=True)
        self.channel.close()
        if self.controller_channel is not self.channel:
            self.controller_channel.close()
        return problems

    # -- request builders -------------------------------------------------

    def capability(
        self,
        mode: Any = Mode.SINGLE_NODE_WRITER,
        *,
        access_type: str | None = None,
        fs_type: str | None = None,
    ) -> Any:
        """A VolumeCapability of the configured access type."""
        at = access_type or self.config.access_type
        cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=mode))
        if at == "block":
            cap.block.SetInParent()
        else:
            cap.mount.fs_type = self.config.fs_type if fs_type is None else fs_type
        return cap

    def create_request(self, name: str | None = None, *, size: int | None = None, **kw: Any) -> Any:
        """A CreateVolumeRequest with the configured parameters and secrets."""
        req = pb.CreateVolumeRequest(
            name=unique_name("vol") if name is None else name,
            volume_capabilities=[self.capability()],
            parameters=self.config.parameters,
            secrets=self.config.secrets_for("CreateVolume"),
            **kw,
        )
        req.capacity_range.required_bytes = self.config.volume_size if size is None else size
        return req

    def snapshot_request(self, source_volume_id: str, name: str | None = None) -> Any:
        return pb.CreateSnapshotRequest(
            name=unique_name("snap") if name is None else name,
            source_volume_id=source_volume_id,
            parameters=self.config.snapshot_parameters,
            secrets=self.config.secrets_for("CreateSnapshot"),
        )

    def delete_volume_request(self, volume_id: str) -> Any:
        return pb.DeleteVolumeRequest(volume_id=volume_id, secrets=self.config.secrets_for("DeleteVolume"))

    def delete_snapshot_request(self, snapshot_id: str) -> Any:
        return pb.DeleteSnapshotRequest(
            snapshot_id=snapshot_id, secrets=self.config.secrets_for("DeleteSnapshot")
        )


# --------------------------------------------------------------------------
# Resources: everything a test makes is undone, even on failure
# --------------------------------------------------------------------------


@attrs.define
class Published:
    volume_id: str
    target_path: str
    staging_path: str = ""
    readonly: bool = False


class Resources:
    """Tracks what a test made on the driver and undoes it in reverse order.

    Tests create through these helpers (or `track_*` what they made by hand);
    `cleanup` unpublishes, unstages, controller-unpublishes, deletes group
    snapshots, snapshots and volumes, and reports every step that failed, so
    a leak is a visible failure rather than a silent one.
    """

    def __init__(self, ctx: SanityContext) -> None:
        self.ctx = ctx
        self.volumes: list[str] = []
        self.snapshots: list[str] = []
        self.groups: list[tuple[str, list[str]]] = []
        self.published: list[tuple[str, str]] = []
        self.staged: list[tuple[str, str]] = []
        self.controller_published: list[tuple[str, str]] = []
        self._workdir: str | None = None

    # -- tracking ----------------------------------------------------------

    def track_volume(self, volume_id: str) -> None:
        if volume_id and volume_id not in self.volumes:
            self.volumes.append(volume_id)

    def track_snapshot(self, snapshot_id: str) -> None:
        if snapshot_id and snapshot_id not in self.snapshots:
            self.snapshots.append(snapshot_id)

    def forget_volume(self, volume_id: str) -> None:
        if volume_id in self.volumes:
            self.volumes.remove(volume_id)

    def forget_snapshot(self, snapshot_id: str) -> None:
        if snapshot_id in self.snapshots:
            self.snapshots.remove(snapshot_id)

    # -- paths ---------------------------------------------------------------

    @property
    def workdir(self) -> str:
        """This test's scratch directory (under the configured mount dir)."""
        if self._workdir is None:
            self._workdir = self.ctx.scratch("t-", self.ctx.config.mount_dir)
        return self._workdir

    def target_path(self, tag: str = "target") -> str:
        """A publish target whose parent exists and which does not (the SP creates it)."""
        return os.path.join(self.workdir, f"{tag}-{uuid.uuid4().hex[:6]}")

    def staging_path(self, tag: str = "staging") -> str:
        """A staging directory that exists (the CO creates it)."""
        parent = self.ctx.config.staging_dir
        if parent is None:
            path = os.path.join(self.workdir, f"{tag}-{uuid.uuid4().hex[:6]}")
            os.mkdir(path)
            return path
        return self.ctx.scratch(f"{tag}-", parent)

    # -- controller helpers ------------------------------------------------------

    def create_volume(self, name: str | None = None, **kw: Any) -> Any:
        """CreateVolume that must succeed; returns the Volume."""
        req = self.ctx.create_request(name, **kw)
        return self.create_volume_from(req)

    def create_volume_from(self, req: Any) -> Any:
        try:
            resp = self.ctx.controller.CreateVolume(req)
        except grpc.RpcError as err:
            raise RpcFailed(f"CreateVolume {req.name!r} failed: {_describe(err)}") from None
        vol = resp.volume
        assert vol.volume_id, "CreateVolume answered without a volume_id"
        self.track_volume(vol.volume_id)
        return vol

    def delete_volume(self, volume_id: str) -> None:
        self.ctx.controller.DeleteVolume(self.ctx.delete_volume_request(volume_id))
        self.forget_volume(volume_id)

    def create_snapshot(self, source_volume_id: str, name: str | None = None) -> Any:
        req = self.ctx.snapshot_request(source_volume_id, name)
        try:
            snap = self.ctx.controller.CreateSnapshot(req).snapshot
        except grpc.RpcError as err:
            raise RpcFailed(f"CreateSnapshot {req.name!r} failed: {_describe(err)}") from None
        assert snap.snapshot_id, "CreateSnapshot answered without a snapshot_id"
        self.track_snapshot(snap.snapshot_id)
        return snap

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.ctx.controller.DeleteSnapshot(self.ctx.delete_snapshot_request(snapshot_id))
        self.forget_snapshot(snapshot_id)

    # -- node helpers --------------------------------------------------------------

    def controller_publish(self, volume_id: str, readonly: bool = False, cap: Any = None) -> dict[str, str]:
        """ControllerPublishVolume to this node when the driver needs it."""
        if not self.ctx.controller_publishes:
            return {}
        node_id = self.ctx.node_info.node_id
        resp = self.ctx.controller.ControllerPublishVolume(
            pb.ControllerPublishVolumeRequest(
                volume_id=volume_id,
                node_id=node_id,
                volume_capability=cap or self.ctx.capability(),
                readonly=readonly,
                secrets=self.ctx.config.secrets_for("ControllerPublishVolume"),
            )
        )
        if (volume_id, node_id) not in self.controller_published:
            self.controller_published.append((volume_id, node_id))
        return dict(resp.publish_context)

    def stage(self, volume_id: str, publish_context: dict[str, str] | None = None, cap: Any = None) -> str:
        """NodeStageVolume to a fresh staging path if the node stages; '' otherwise."""
        if not self.ctx.stages:
            return ""
        path = self.staging_path()
        self.staged.append((volume_id, path))
        self.ctx.node.NodeStageVolume(
            pb.NodeStageVolumeRequest(
                volume_id=volume_id,
                staging_target_path=path,
                volume_capability=cap or self.ctx.capability(),
                publish_context=publish_context or {},
                secrets=self.ctx.config.secrets_for("NodeStageVolume"),
            )
        )
        return path

    def publish_request(
        self,
        volume_id: str,
        target: str,
        staging: str = "",
        *,
        readonly: bool = False,
        cap: Any = None,
        publish_context: dict[str, str] | None = None,
    ) -> Any:
        return pb.NodePublishVolumeRequest(
            volume_id=volume_id,
            target_path=target,
            staging_target_path=staging,
            volume_capability=cap or self.ctx.capability(),
            readonly=readonly,
            publish_context=publish_context or {},
            secrets=self.ctx.config.secrets_for("NodePublishVolume"),
        )

    def node_publish(self, req: Any) -> None:
        """NodePublishVolume, tracked for unpublishing whatever the answer."""
        if (req.volume_id, req.target_path) not in self.published:
            self.published.append((req.volume_id, req.target_path))
        self.ctx.node.NodePublishVolume(req)

    def publish(self, volume_id: str, *, readonly: bool = False, cap: Any = None) -> Published:
        """The whole road to a usable path: [ControllerPublish] → [Stage] → Publish."""
        ctx = self.controller_publish(volume_id, readonly=readonly, cap=cap)
        staging = self.stage(volume_id, ctx, cap=cap)
        target = self.target_path()
        self.node_publish(
            self.publish_request(volume_id, target, staging, readonly=readonly, cap=cap, publish_context=ctx)
        )
        return Published(volume_id, target, staging, readonly)

    def unpublish(self, p: Published) -> None:
        """Undo `publish` in order; each step must succeed."""
        self.ctx.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=p.volume_id, target_path=p.target_path)
        )
        with contextlib.suppress(ValueError):
            self.published.remove((p.volume_id, p.target_path))
        if p.staging_path:
            self.ctx.node.NodeUnstageVolume(
                pb.NodeUnstageVolumeRequest(volume_id=p.volume_id, staging_target_path=p.staging_path)
            )
            with contextlib.suppress(ValueError):
                self.staged.remove((p.volume_id, p.staging_path))
        if self.ctx.controller_publishes:
            node_id = self.ctx.node_info.node_id
            self.ctx.controller.ControllerUnpublishVolume(
                pb.ControllerUnpublishVolumeRequest(
                    volume_id=p.volume_id,
                    node_id=node_id,
                    secrets=self.ctx.config.secrets_for("ControllerUnpublishVolume"),
                )
            )
            with contextlib.suppress(ValueError):
                self.controller_published.remove((p.volume_id, node_id))

    # -- cleanup -----------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Undo everything still tracked; returns what could not be undone."""
        problems: list[str] = []
        c, n, cfg = self.ctx.controller, self.ctx.node, self.ctx.config

        def attempt(
            what: str, call: Callable[..., Any], request: Any, ok: Sequence[grpc.StatusCode] = ()
        ) -> None:
            try:
                call(request)
            except grpc.RpcError as err:
                if err.code() not in ok:
                    problems.append(f"{what}: {_describe(err)}")
            except AssertionError as err:
                problems.append(f"{what}: {err}")

        for vol, target in reversed(self.published):
            attempt(
                f"NodeUnpublishVolume {vol!r} {target}",
                n.NodeUnpublishVolume,
                pb.NodeUnpublishVolumeRequest(volume_id=vol, target_path=target),
                ok=(C.NOT_FOUND, C.INVALID_ARGUMENT),
            )
        for vol, path in reversed(self.staged):
            attempt(
                f"NodeUnstageVolume {vol!r} {path}",
                n.NodeUnstageVolume,
                pb.NodeUnstageVolumeRequest(volume_id=vol, staging_target_path=path),
                ok=(C.NOT_FOUND, C.INVALID_ARGUMENT),
            )
        for vol, node_id in reversed(self.controller_published):
            attempt(
                f"ControllerUnpublishVolume {vol}",
                c.ControllerUnpublishVolume,
                pb.ControllerUnpublishVolumeRequest(
                    volume_id=vol, node_id=node_id, secrets=cfg.secrets_for("ControllerUnpublishVolume")
                ),
                ok=(C.NOT_FOUND,),
            )
        for gid, snap_ids in reversed(self.groups):
            attempt(
                f"DeleteVolumeGroupSnapshot {gid}",
                self.ctx.group.DeleteVolumeGroupSnapshot,
                pb.DeleteVolumeGroupSnapshotRequest(
                    group_snapshot_id=gid,
                    snapshot_ids=snap_ids,
                    secrets=cfg.secrets_for("DeleteVolumeGroupSnapshot"),
                ),
            )
        for sid in reversed(self.snapshots):
            attempt(f"DeleteSnapshot {sid}", c.DeleteSnapshot, self.ctx.delete_snapshot_request(sid))
        for vid in reversed(self.volumes):
            attempt(f"DeleteVolume {vid}", c.DeleteVolume, self.ctx.delete_volume_request(vid))
        self.published.clear()
        self.staged.clear()
        self.controller_published.clear()
        self.groups.clear()
        self.snapshots.clear()
        self.volumes.clear()
        if self._workdir is not None:
            left = mounts_under(self._workdir)
            if left:
                problems.append(f"mounts left under {self._workdir}: {left}")
            else:
                shutil.rmtree(self._workdir, ignore_errors=True)
        return problems


# --------------------------------------------------------------------------
# Host observations
# --------------------------------------------------------------------------

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, root within the source fs, source) for every mount,
    from /proc/self/mountinfo (os.path.ismount misses same-fs bind mounts)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            try:
                sep = parts.index("-")
            except ValueError:
                continue
            out.append((_unescape(parts[4]), _unescape(parts[3]), _unescape(parts[sep + 2])))
    return out


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    return any(mp == real for mp, _root, _src in mountinfo())


def mounts_under(path: str) -> list[str]:
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    return [mp for mp, _r, _s in mountinfo() if mp == real or mp.startswith(prefix)]


def mount_table() -> frozenset[tuple[int, str]]:
    """(mount id, mount point) of every mount in this namespace: a mount
    replaced by another at the same place counts as a change."""
    out = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4:
                out.add((int(parts[0]), _unescape(parts[4])))
    return frozenset(out)


def _mount_changes(before: frozenset[tuple[int, str]], what: str) -> str:
    after = mount_table()
    gone = sorted(mp for _id, mp in before - after)
    new = sorted(mp for _id, mp in after - before)
    return f"{what} changed the mount table: unmounted {gone}, mounted {new}" if gone or new else ""


@contextlib.contextmanager
def mounts_unchanged(what: str) -> Iterator[None]:
    """Assert that the block mounts and unmounts nothing (in this namespace);
    a failed assertion inside the block is reported with the changes."""
    before = mount_table()
    try:
        yield
    except AssertionError as err:
        changes = _mount_changes(before, what)
        if changes:
            raise AssertionError(f"{err}; and {changes}") from None
        raise
    changes = _mount_changes(before, what)
    assert not changes, changes


#: The initial mount namespace's inode number on kernels that number the
#: initial namespaces statically (6.18 on, MNT_NS_INIT_INO in linux/nsfs.h).
#: Older kernels hand out numbers from 0xF0000000 up, so this one is never
#: another namespace's.
_MNT_NS_INIT_INO = 0xEFFFFFF8


def _kernel_numbers_initial_mnt_ns() -> bool:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (6, 18)


def host_mount_namespace() -> str | None:
    """Why this process may be in the machine's initial mount namespace, or
    None when it is in a namespace of its own.

    Compares /proc/self/ns/mnt with pid 1's; where pid 1's cannot be read
    (another pid namespace, ptrace restrictions) the kernel's fixed number
    for the initial namespace decides, and a kernel without one is "cannot
    tell" — which counts as the machine's, the safe side.
    """
    own = os.stat("/proc/self/ns/mnt").st_ino
    if own == _MNT_NS_INIT_INO:
        return "this is the kernel's initial mount namespace"
    try:
        init = os.stat("/proc/1/ns/mnt").st_ino
    except OSError as err:
        if _kernel_numbers_initial_mnt_ns():
            return None
        return f"cannot tell whether it is the machine's: /proc/1/ns/mnt: {err.strerror}"
    return "it is pid 1's mount namespace" if own == init else None


def loop_devices() -> dict[str, str]:
    """Attached loop devices and their backing files (from sysfs)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/sys/block"):
            if not name.startswith("loop"):
                continue
            try:
                with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8", errors="replace") as f:
                    out[name] = f.read().strip()
            except OSError:
                continue
    return out


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


@attrs.define
class Canary:
    """A file tree outside every root the driver may touch.  Hostile ids
    point at it (by absolute path and by `..` chains); afterwards it must be
    exactly as it was."""

    root: str
    victim: str
    content: bytes

    @classmethod
    def create(cls, root: str) -> Canary:
        victim = os.path.join(root, "victim")
        os.mkdir(victim)
        content = f"canary {uuid.uuid4().hex}\n".encode()
        with open(os.path.join(victim, "file"), "wb") as f:
            f.write(content)
        return cls(root, victim, content)

    def relative_escape(self, depth: int = 32) -> str:
        """`../../…/<victim>`: resolves to the victim from any root."""
        return "../" * depth + self.victim.lstrip("/")

    def snapshot(self) -> list[tuple[str, int]]:
        entries = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for n in sorted(dirnames + filenames):
                p = os.path.join(dirpath, n)
                entries.append((p, os.lstat(p).st_mode))
        return sorted(entries)

    def assert_intact(self) -> None:
        path = os.path.join(self.victim, "file")
        assert os.path.isfile(path), f"canary {path} was removed: the driver touched a path outside its roots"
        with open(path, "rb") as f:
            assert f.read() == self.content, f"canary {path} was modified by the driver"
        assert sorted(os.listdir(self.root)) == ["victim"], (
            f"the driver created {sorted(os.listdir(self.root))} in the canary directory {self.root}"
        )
        assert sorted(os.listdir(self.victim)) == ["file"], (
            f"the driver created {sorted(os.listdir(self.victim))} in the canary directory {self.victim}"
        )
        assert not mounts_under(self.root), f"the driver mounted something over the canary {self.root}"


# --------------------------------------------------------------------------
# Data through the published path
# --------------------------------------------------------------------------

DATA_PREFIX = "sanity-data-"


def write_token(path: str, token: str, payload: bytes | None = None) -> bytes:
    """Write one file into a published volume and fsync it."""
    data = payload if payload is not None else f"{token}\n".encode() * 64
    fn = os.path.join(path, DATA_PREFIX + token)
    with open(fn, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def read_tokens(path: str) -> dict[str, bytes]:
    """The suite's own files in a published volume (others are ignored)."""
    out: dict[str, bytes] = {}
    for name in os.listdir(path):
        if name.startswith(DATA_PREFIX):
            with open(os.path.join(path, name), "rb") as f:
                out[name[len(DATA_PREFIX) :]] = f.read()
    return out


def block_write(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def block_read(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


@contextlib.contextmanager
def no_new_mounts_or_loops(
    ctx: SanityContext, ids: Callable[[], Sequence[str]], workdir: str
) -> Iterator[None]:
    """Check that a block leaves no mounts under `workdir` and no loop device
    it created (backed by a file naming one of `ids()` or under the driver's
    configured roots).  Other processes' loop devices are not ours to judge."""
    before = loop_devices()
    yield
    left = mounts_under(workdir)
    assert not left, f"mounts left behind after teardown: {left}"
    after = loop_devices()
    roots = [os.path.realpath(r).rstrip("/") + "/" for r in ctx.config.driver_roots]
    leaked = []
    known = [i for i in ids() if len(i) >= 4]
    for dev, backing in after.items():
        if dev in before and before[dev] == backing:
            continue
        if any(backing.startswith(r) for r in roots) or any(i in backing for i in known):
            leaked.append(f"/dev/{dev} -> {backing}")
    assert not leaked, f"loop devices left behind after teardown: {leaked}"
