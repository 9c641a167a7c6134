"""The snapshot-metadata loop (external-snapshot-metadata) on the in-memory API:
authentication (TokenReview with the SnapshotMetadataService's audience),
authorization (SubjectAccessReview: get volumesnapshots in the namespace),
VolumeSnapshot → VolumeSnapshotContent → CSI handle translation, and the
relay to a real csi_kit driver's SnapshotMetadata service; one run over TLS.

The fake API stores TokenReviews and SubjectAccessReviews like any object;
`ReviewingAPI` answers them as kube-apiserver would, from tables a test sets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit._pb import snapshot_metadata_pb2 as kpb
from csi_kit._pb import snapshot_metadata_pb2_grpc as kpbg
from csi_kit.backend import BackendContext
from csi_kit.k8s import cli as k8s_cli
from csi_kit.k8s.api import VOLUME_SNAPSHOT, VOLUME_SNAPSHOT_CONTENT, Obj, Resource
from csi_kit.k8s.csi_client import DriverInfo
from csi_kit.k8s.snapshot import metadata as sm
from csi_kit.testing.driver import running_driver
from csi_kit.testing.fake_k8s import FakeKubeAPI
from csi_kit.types import BlockMetadata, BlockMetadataType, BlockRange, Snapshot
from csi_kit_backends.hostpath.backend import HostPathBackend, HostPathConfig

C = grpc.StatusCode
DRIVER = "hostpath.csi-kit.io"
AUDIENCE = "cbt-audience"
NS = "backup"
KiB = 1024


class MetaHostPath(HostPathBackend):
    """hostPath whose snapshots answer fixed ranges: allocated 0-8 KiB and 64 KiB-68 KiB,
    delta 64 KiB-68 KiB between any two snapshots of one volume."""

    def snapshot_allocated(self, snapshot: Snapshot, starting_offset: int) -> BlockMetadata:
        ranges = iter([BlockRange(0, 8 * KiB), BlockRange(64 * KiB, 4 * KiB)])
        return BlockMetadata(BlockMetadataType.VARIABLE_LENGTH, snapshot.size_bytes, ranges)

    def snapshot_delta(self, base: Snapshot, target: Snapshot, starting_offset: int) -> BlockMetadata:
        ranges = iter([BlockRange(64 * KiB, 4 * KiB)])
        return BlockMetadata(BlockMetadataType.FIXED_LENGTH, target.size_bytes, ranges)


class ReviewingAPI(FakeKubeAPI):
    """The fake API, answering TokenReview and SubjectAccessReview creates."""

    def __init__(self) -> None:
        super().__init__()
        #: token -> (username, audiences the token is valid for)
        self.tokens: dict[str, tuple[str, tuple[str, ...]]] = {}
        #: (username, namespace) pairs allowed to get volumesnapshots
        self.allowed: set[tuple[str, str]] = set()
        self.reviews: list[Obj] = []

    async def create(self, res: Resource, obj: Obj, namespace: str | None = None) -> Obj:
        if res == sm.TOKEN_REVIEW:
            self.reviews.append(obj)
            spec = obj["spec"]
            user, audiences = self.tokens.get(spec["token"], ("", ()))
            both = [a for a in spec.get("audiences", []) if a in audiences]
            status: Obj = {"authenticated": bool(user and both), "audiences": both}
            if user and both:
                status["user"] = {"username": user, "uid": f"uid-{user}", "groups": ["system:authenticated"]}
            elif user:
                status["error"] = "token audiences do not match"
            return dict(obj, status=status)
        if res == sm.SUBJECT_ACCESS_REVIEW:
            self.reviews.append(obj)
            spec = obj["spec"]
            attrs_ = spec["resourceAttributes"]
            ok = (
                (spec["user"], attrs_["namespace"]) in self.allowed
                and attrs_ == {"namespace": attrs_["namespace"], "verb": "get",
                               "group": "snapshot.storage.k8s.io", "resource": "volumesnapshots"}
            )  # fmt: skip
            return dict(obj, status={"allowed": ok})
        return await super().create(res, obj, namespace)


@pytest.fixture
def driver() -> Iterator[str]:
    state = tempfile.mkdtemp(prefix="ck-sm-", dir="/tmp")
    try:
        backend = MetaHostPath(HostPathConfig(), BackendContext(DRIVER, "node-1", state))
        with running_driver(state, backend_object=backend, driver_name=DRIVER) as endpoint:
            yield endpoint
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _snapshots(endpoint: str) -> tuple[str, str, str]:
    """A volume and two snapshots on the driver: (base handle, target handle, other volume's handle)."""
    with grpc.insecure_channel(endpoint) as ch:
        ctl = pbg.ControllerStub(ch)
        cap = pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(), access_mode=pb.VolumeCapability.AccessMode(mode=1)
        )
        vids = [
            ctl.CreateVolume(
                pb.CreateVolumeRequest(name=n, volume_capabilities=[cap]), timeout=30
            ).volume.volume_id
            for n in ("v1", "v2")
        ]
        snap = [
            ctl.CreateSnapshot(
                pb.CreateSnapshotRequest(name=n, source_volume_id=v), timeout=30
            ).snapshot.snapshot_id
            for n, v in (("a", vids[0]), ("b", vids[0]), ("c", vids[1]))
        ]
    return snap[0], snap[1], snap[2]


async def _bound_snapshot(
    api: FakeKubeAPI, name: str, handle: str, *, ready: bool = True, driver: str = DRIVER, bound_to: str = ""
) -> None:
    content = f"snapcontent-{name}"
    vs = await api.create(
        VOLUME_SNAPSHOT,
        {
            "apiVersion": VOLUME_SNAPSHOT.api_version,
            "kind": VOLUME_SNAPSHOT.kind,
            "metadata": {"name": name, "namespace": NS},
            "spec": {"source": {"persistentVolumeClaimName": "pvc"}},
        },
    )
    await api.update_status(
        VOLUME_SNAPSHOT, dict(vs, status={"boundVolumeSnapshotContentName": content, "readyToUse": ready})
    )
    vsc = await api.create(
        VOLUME_SNAPSHOT_CONTENT,
        {
            "apiVersion": VOLUME_SNAPSHOT_CONTENT.api_version,
            "kind": VOLUME_SNAPSHOT_CONTENT.kind,
            "metadata": {"name": content},
            "spec": {
                "driver": driver,
                "deletionPolicy": "Delete",
                "source": {"snapshotHandle": handle},
                "volumeSnapshotRef": {"name": bound_to or name, "namespace": NS},
            },
        },
    )
    await api.update_status(
        VOLUME_SNAPSHOT_CONTENT, dict(vsc, status={"snapshotHandle": handle, "readyToUse": True})
    )


async def _service_object(api: FakeKubeAPI, audience: str = AUDIENCE) -> None:
    await api.create(
        sm.SNAPSHOT_METADATA_SERVICE,
        {
            "apiVersion": sm.SNAPSHOT_METADATA_SERVICE.api_version,
            "kind": sm.SNAPSHOT_METADATA_SERVICE.kind,
            "metadata": {"name": DRIVER},
            "spec": {"address": "csi-kit:50051", "audience": audience, "caCert": ""},
        },
    )


@contextlib.asynccontextmanager
async def serving(loop: sm.SnapshotMetadataLoop) -> AsyncIterator[int]:
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(loop.started.wait(), 30)
        yield loop.port
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def world(driver: str) -> AsyncIterator[tuple[ReviewingAPI, Any, tuple[str, str, str]]]:
    handles = await asyncio.to_thread(_snapshots, driver)
    api = ReviewingAPI()
    api.tokens = {
        "good": ("alice", (AUDIENCE,)),
        "elsewhere": ("alice", ("other",)),
        "bob": ("bob", (AUDIENCE,)),
    }
    api.allowed = {("alice", NS)}
    await _service_object(api)
    await _bound_snapshot(api, "snap-a", handles[0])
    await _bound_snapshot(api, "snap-b", handles[1])
    loop = sm.SnapshotMetadataLoop(api, driver, DRIVER, address="127.0.0.1:0", tls=None)
    async with serving(loop) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield api, kpbg.SnapshotMetadataStub(ch), handles


async def _allocated(stub: Any, name: str, token: str = "good", ns: str = NS) -> list[Any]:
    req = kpb.GetMetadataAllocatedRequest(security_token=token, namespace=ns, snapshot_name=name)
    return [r async for r in stub.GetMetadataAllocated(req, timeout=30)]


async def _delta(stub: Any, base: str, target: str, token: str = "good") -> list[Any]:
    req = kpb.GetMetadataDeltaRequest(
        security_token=token, namespace=NS, base_snapshot_id=base, target_snapshot_name=target
    )
    return [r async for r in stub.GetMetadataDelta(req, timeout=30)]


async def _code(coro: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError("the call succeeded; an error was expected")


def _ranges(responses: list[Any]) -> list[tuple[int, int]]:
    return [(b.byte_offset, b.size_bytes) for r in responses for b in r.block_metadata]


async def test_names_are_translated_and_answers_relayed(world: Any) -> None:
    api, stub, (a, _, _) = world
    out = await _allocated(stub, "snap-b")
    assert _ranges(out) == [(0, 8 * KiB), (64 * KiB, 4 * KiB)]
    assert out[0].block_metadata_type == kpb.VARIABLE_LENGTH and out[0].volume_capacity_bytes > 0
    out = await _delta(stub, a, "snap-b")
    assert _ranges(out) == [(64 * KiB, 4 * KiB)] and out[0].block_metadata_type == kpb.FIXED_LENGTH
    # What was asked of the API server: the token for the service's audience, then `get volumesnapshots`.
    review, access = api.reviews[0], api.reviews[1]
    assert review["spec"] == {"token": "good", "audiences": [AUDIENCE]}
    assert access["spec"]["user"] == "alice" and access["spec"]["uid"] == "uid-alice"
    assert access["spec"]["resourceAttributes"]["namespace"] == NS


async def test_authentication(world: Any) -> None:
    _, stub, _ = world
    assert (await _code(_allocated(stub, "snap-a", token="")))[0] == C.UNAUTHENTICATED
    assert (await _code(_allocated(stub, "snap-a", token="forged")))[0] == C.UNAUTHENTICATED
    code, details = await _code(_allocated(stub, "snap-a", token="elsewhere"))
    assert code == C.UNAUTHENTICATED, details


async def test_authorization(world: Any) -> None:
    api, stub, _ = world
    code, details = await _code(_allocated(stub, "snap-a", token="bob"))
    assert code == C.PERMISSION_DENIED and "bob" in details
    code, _ = await _code(_allocated(stub, "snap-a", ns="other"))
    assert code == C.PERMISSION_DENIED
    # Refused before any VolumeSnapshot is read: nothing about the objects leaks.
    assert all(r["kind"] in ("TokenReview", "SubjectAccessReview") for r in api.reviews)


async def test_translation_errors(world: Any) -> None:
    api, stub, (a, _, _) = world
    api.allowed.add(("alice", NS))
    await _bound_snapshot(api, "not-ready", a, ready=False)
    await _bound_snapshot(api, "foreign", a, driver="other.csi.example.com")
    await _bound_snapshot(api, "stolen", a, bound_to="someone-else")
    cases = {
        "missing": C.NOT_FOUND,
        "not-ready": C.UNAVAILABLE,
        "foreign": C.INVALID_ARGUMENT,
        "stolen": C.FAILED_PRECONDITION,
    }
    for name, want in cases.items():
        code, details = await _code(_allocated(stub, name))
        assert code == want, f"{name}: {code.name}: {details}"
    assert (await _code(_allocated(stub, "")))[0] == C.INVALID_ARGUMENT
    assert (await _code(_delta(stub, "", "snap-b")))[0] == C.INVALID_ARGUMENT


async def test_driver_errors_pass_through(world: Any) -> None:
    _, stub, (_, _, other) = world
    assert (await _code(_delta(stub, "no-such-handle", "snap-b")))[0] == C.NOT_FOUND
    # A base of another volume: the driver's own INVALID_ARGUMENT.
    assert (await _code(_delta(stub, other, "snap-b")))[0] == C.INVALID_ARGUMENT


async def test_audience_follows_the_service_object(driver: str) -> None:
    api = ReviewingAPI()
    api.tokens = {"good": ("alice", (AUDIENCE,))}
    api.allowed = {("alice", NS)}
    loop = sm.SnapshotMetadataLoop(api, driver, DRIVER, address="127.0.0.1:0", tls=None)
    async with serving(loop) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = kpbg.SnapshotMetadataStub(ch)
        code, details = await _code(_allocated(stub, "snap-a"))
        assert code == C.UNAVAILABLE and "SnapshotMetadataService" in details
        await _service_object(api, audience="something-else")
        assert (await _code(_allocated(stub, "snap-a")))[0] == C.UNAUTHENTICATED


async def test_the_service_object_is_created_when_asked(driver: str, tmp_path: Path) -> None:
    api = ReviewingAPI()
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    loop = sm.SnapshotMetadataLoop(
        api,
        driver,
        DRIVER,
        address="127.0.0.1:0",
        tls=None,
        audience="aud",
        service_address="csi-kit.kube-system:50051",
    )
    loop.tls = sm.TLSFiles("", "", str(ca))  # only the CA bundle is read here
    await loop.ensure_service_object()
    obj = api.peek(sm.SNAPSHOT_METADATA_SERVICE, DRIVER)
    assert obj is not None
    assert obj["spec"]["address"] == "csi-kit.kube-system:50051" and obj["spec"]["audience"] == "aud"
    assert obj["spec"]["caCert"] == "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="
    await loop.ensure_service_object()  # present: left alone
    await loop.proxy.close()


async def test_served_over_tls(driver: str, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=csi-kit-snapshot-metadata",
         "-addext", "subjectAltName=DNS:csi-kit-snapshot-metadata"],
        check=True, capture_output=True,
    )  # fmt: skip
    handles = await asyncio.to_thread(_snapshots, driver)
    api = ReviewingAPI()
    api.tokens = {"good": ("alice", (AUDIENCE,))}
    api.allowed = {("alice", NS)}
    await _service_object(api)
    await _bound_snapshot(api, "snap-b", handles[1])
    loop = sm.SnapshotMetadataLoop(
        api, driver, DRIVER, address="127.0.0.1:0", tls=sm.TLSFiles(str(cert), str(key))
    )
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    options = [("grpc.ssl_target_name_override", "csi-kit-snapshot-metadata")]
    async with serving(loop) as port:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
            out = await _allocated(kpbg.SnapshotMetadataStub(ch), "snap-b")
            assert _ranges(out) == [(0, 8 * KiB), (64 * KiB, 4 * KiB)]
        # A client that does not speak TLS gets nowhere.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            code, _ = await _code(_allocated(kpbg.SnapshotMetadataStub(plain), "snap-b"))
            assert code == C.UNAVAILABLE


def _args(**kw: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    k8s_cli.add_controller_options(parser)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    return parser.parse_args(argv)


def test_cli_selects_the_loop_only_when_asked() -> None:
    assert "snapshot-metadata" in k8s_cli.selected(_args(controllers="snapshot-metadata"))
    assert "snapshot-metadata" not in k8s_cli.selected(_args(controllers="all"))


def test_cli_loop_needs_the_driver_service_and_tls() -> None:
    api = FakeKubeAPI()
    without = DriverInfo(DRIVER, "1", frozenset({"CONTROLLER_SERVICE"}), frozenset(), frozenset())
    with_service = DriverInfo(
        DRIVER, "1", frozenset({"CONTROLLER_SERVICE", "SNAPSHOT_METADATA_SERVICE"}), frozenset(), frozenset()
    )
    assert sm.loop_from_args(_args(), api, "unix:///x.sock", without) is None
    with pytest.raises(ValueError, match="tls"):
        sm.loop_from_args(_args(), api, "unix:///x.sock", with_service)
    loop = sm.loop_from_args(
        _args(snapshot_metadata_tls_cert="/c", snapshot_metadata_tls_key="/k"),
        api,
        "unix:///x.sock",
        with_service,
    )
    assert loop is not None and loop.address == "0.0.0.0:50051"
