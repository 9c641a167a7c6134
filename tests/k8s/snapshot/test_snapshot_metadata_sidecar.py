"""The snapshot-metadata loop (external-snapshot-metadata) on the in-memory API:
authentication (TokenReview with the SnapshotMetadataService's audience),
authorization (SubjectAccessReview: get volumesnapshots in the namespace),
VolumeSnapshot → VolumeSnapshotContent → CSI handle translation, the
VolumeSnapshotClass's snapshotter secret passed to the driver, and the relay
to a real csi_kit driver's SnapshotMetadata service; runs over TLS, with the
serving certificate renewed underneath; the loop's RBAC manifest checked
against a recorded run.

The fake API stores TokenReviews and SubjectAccessReviews like any object;
`ReviewingAPI` answers them as kube-apiserver would, from tables a test sets.
`RecordingCSI` is a driver's SnapshotMetadata service that notes each request
(the secrets a backend sees are not visible through a real driver's hooks).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml
from k8s_helpers import Recording, granted

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as pbg
from csi_kit._pb import snapshot_metadata_pb2 as kpb
from csi_kit._pb import snapshot_metadata_pb2_grpc as kpbg
from csi_kit.backend import BackendContext
from csi_kit.k8s import cli as k8s_cli
from csi_kit.k8s.objects.resources import (
    SECRET,
    SNAPSHOT_METADATA_SERVICE,
    SUBJECT_ACCESS_REVIEW,
    TOKEN_REVIEW,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CLASS,
    VOLUME_SNAPSHOT_CONTENT,
)
from csi_kit.k8s.runtime.api import Obj, Resource
from csi_kit.k8s.runtime.csi import DriverInfo
from csi_kit.k8s.snapshot import metadata as sm
from csi_kit.k8s.snapshot import protocol as p
from csi_kit.linux.run import run
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
        if res == TOKEN_REVIEW:
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
        if res == SUBJECT_ACCESS_REVIEW:
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
    api: FakeKubeAPI,
    name: str,
    handle: str,
    *,
    ready: bool = True,
    driver: str = DRIVER,
    bound_to: str = "",
    cls: str = "",
) -> None:
    content = f"snapcontent-{name}"
    spec: Obj = {"source": {"persistentVolumeClaimName": "pvc"}}
    if cls:
        spec["volumeSnapshotClassName"] = cls
    vs = await api.create(
        VOLUME_SNAPSHOT,
        {
            "apiVersion": VOLUME_SNAPSHOT.api_version,
            "kind": VOLUME_SNAPSHOT.kind,
            "metadata": {"name": name, "namespace": NS},
            "spec": spec,
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
        SNAPSHOT_METADATA_SERVICE,
        {
            "apiVersion": SNAPSHOT_METADATA_SERVICE.api_version,
            "kind": SNAPSHOT_METADATA_SERVICE.kind,
            "metadata": {"name": DRIVER},
            "spec": {"address": "csi-kit:50051", "audience": audience, "caCert": ""},
        },
    )


async def _alice_api(*, service: bool = True) -> ReviewingAPI:
    """The API where token "good" is alice's for AUDIENCE and alice may read snapshots in NS
    (with `service`, the SnapshotMetadataService object exists too)."""
    api = ReviewingAPI()
    api.tokens = {"good": ("alice", (AUDIENCE,))}
    api.allowed = {("alice", NS)}
    if service:
        await _service_object(api)
    return api


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
    api = await _alice_api()
    api.tokens |= {"elsewhere": ("alice", ("other",)), "bob": ("bob", (AUDIENCE,))}
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
    api = await _alice_api(service=False)
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
    obj = api.peek(SNAPSHOT_METADATA_SERVICE, DRIVER)
    assert obj is not None
    assert obj["spec"]["address"] == "csi-kit.kube-system:50051" and obj["spec"]["audience"] == "aud"
    assert obj["spec"]["caCert"] == "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="
    await loop.ensure_service_object()  # present: left alone
    await loop.proxy.close()


SERVER_NAME = "csi-kit-snapshot-metadata"


def _key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `SERVER_NAME` and its key: (cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={SERVER_NAME}",
         "-addext", f"subjectAltName=DNS:{SERVER_NAME}"])  # fmt: skip
    return cert, key


def _install(src: Path, dst: Path) -> None:
    """Replace `dst` by a copy of `src` in one rename, as a Secret volume update does."""
    tmp = dst.with_suffix(".new")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


async def _allocated_over_tls(port: int, trusted: Path) -> list[tuple[int, int]] | grpc.StatusCode:
    """GetMetadataAllocated of snap-b on a new TLS connection trusting `trusted`: ranges or error code."""
    creds = grpc.ssl_channel_credentials(root_certificates=trusted.read_bytes())
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
        try:
            return _ranges(await _allocated(kpbg.SnapshotMetadataStub(ch), "snap-b"))
        except grpc.aio.AioRpcError as e:
            return e.code()


async def _tls_world(driver: str) -> ReviewingAPI:
    handles = await asyncio.to_thread(_snapshots, driver)
    api = await _alice_api()
    await _bound_snapshot(api, "snap-b", handles[1])
    return api


async def test_served_over_tls(driver: str, tmp_path: Path) -> None:
    cert, key = _key_pair(tmp_path, "tls")
    api = await _tls_world(driver)
    loop = sm.SnapshotMetadataLoop(
        api, driver, DRIVER, address="127.0.0.1:0", tls=sm.TLSFiles(str(cert), str(key))
    )
    async with serving(loop) as port:
        assert await _allocated_over_tls(port, cert) == [(0, 8 * KiB), (64 * KiB, 4 * KiB)]
        # A client that does not speak TLS gets nowhere.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            code, _ = await _code(_allocated(kpbg.SnapshotMetadataStub(plain), "snap-b"))
            assert code == C.UNAVAILABLE


async def test_a_renewed_certificate_serves_the_next_connections(driver: str, tmp_path: Path) -> None:
    old_cert, old_key = _key_pair(tmp_path, "old")
    new_cert, new_key = _key_pair(tmp_path, "new")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _install(old_cert, cert)
    _install(old_key, key)
    api = await _tls_world(driver)
    loop = sm.SnapshotMetadataLoop(
        api, driver, DRIVER, address="127.0.0.1:0", tls=sm.TLSFiles(str(cert), str(key))
    )
    want = [(0, 8 * KiB), (64 * KiB, 4 * KiB)]
    async with serving(loop) as port:
        assert await _allocated_over_tls(port, old_cert) == want
        assert await _allocated_over_tls(port, new_cert) == C.UNAVAILABLE  # not renewed yet
        _install(new_key, key)
        _install(new_cert, cert)
        assert await _allocated_over_tls(port, new_cert) == want
        assert await _allocated_over_tls(port, old_cert) == C.UNAVAILABLE
        # A broken renewal (the old key with the new certificate): refused, the last good pair serves on.
        _install(old_key, key)
        assert await _allocated_over_tls(port, new_cert) == want
        assert await _allocated_over_tls(port, new_cert) == want
        assert loop.certificates is not None and loop.certificates.loads == 2
        # Files that cannot be read at all: the same.
        key.unlink()
        assert await _allocated_over_tls(port, new_cert) == want
        _install(new_key, key)
        assert await _allocated_over_tls(port, new_cert) == want
        assert loop.certificates.loads == 3  # the repaired pair was loaded again


def test_unusable_tls_files_are_one_clear_error(tmp_path: Path) -> None:
    cert, key = _key_pair(tmp_path, "a")
    _, other_key = _key_pair(tmp_path, "b")
    with pytest.raises(ValueError, match="No such file") as e:
        sm.CertificateReloader(sm.TLSFiles(str(tmp_path / "missing.crt"), str(key)))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=re.escape(str(cert))):
        sm.CertificateReloader(sm.TLSFiles(str(cert), str(other_key)))
    with pytest.raises(ValueError, match=re.escape(str(key))):
        sm.CertificateReloader(sm.TLSFiles(str(key), str(key)))
    # An encrypted key is refused at once (OpenSSL would otherwise ask a terminal for its password).
    locked = tmp_path / "locked.key"
    run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:x", "-out", str(locked)])
    with pytest.raises(ValueError, match="encrypted"):
        sm.CertificateReloader(sm.TLSFiles(str(cert), str(locked)))


# -- the snapshotter secret ------------------------------------------------------------------


class RecordingCSI(pbg.SnapshotMetadataServicer):
    """A driver's SnapshotMetadata service answering one range, noting every request."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def GetMetadataAllocated(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.requests.append(request)
        yield pb.GetMetadataAllocatedResponse(
            block_metadata_type=pb.FIXED_LENGTH,
            volume_capacity_bytes=1 << 20,
            block_metadata=[pb.BlockMetadata(byte_offset=0, size_bytes=4 * KiB)],
        )

    async def GetMetadataDelta(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.requests.append(request)
        yield pb.GetMetadataDeltaResponse(
            block_metadata_type=pb.FIXED_LENGTH,
            volume_capacity_bytes=1 << 20,
            block_metadata=[pb.BlockMetadata(byte_offset=4 * KiB, size_bytes=4 * KiB)],
        )


async def _class(
    api: FakeKubeAPI, name: str, params: dict[str, str] | None = None, *, default: bool = False
) -> None:
    meta: Obj = {"name": name}
    if default:
        meta["annotations"] = {p.ANN_IS_DEFAULT_CLASS: "true"}
    await api.create(
        VOLUME_SNAPSHOT_CLASS,
        {"metadata": meta, "driver": DRIVER, "deletionPolicy": "Delete", "parameters": params or {}},
    )


async def _secret(api: FakeKubeAPI, name: str, namespace: str, **data: str) -> None:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    await api.create(SECRET, {"metadata": {"name": name, "namespace": namespace}, "data": encoded})


SECRET_PARAMS = {
    p.SECRET_NAME_KEY: "${volumesnapshot.name}-creds",
    p.SECRET_NAMESPACE_KEY: "${volumesnapshot.namespace}",
}


@contextlib.asynccontextmanager
async def _recording_driver(tmp_path: Path) -> AsyncIterator[tuple[RecordingCSI, str]]:
    """`RecordingCSI` served on a socket in `tmp_path`: it and its endpoint."""
    csi = RecordingCSI()
    server = grpc.aio.server()
    pbg.add_SnapshotMetadataServicer_to_server(csi, server)
    sock = f"unix://{tmp_path}/csi.sock"
    server.add_insecure_port(sock)
    await server.start()
    try:
        yield csi, sock
    finally:
        await server.stop(None)


@pytest.fixture
async def recorded(tmp_path: Path) -> AsyncIterator[tuple[ReviewingAPI, Any, RecordingCSI]]:
    """The loop in front of `RecordingCSI`, alice allowed in NS, no snapshots or classes yet."""
    async with _recording_driver(tmp_path) as (csi, sock):
        api = await _alice_api()
        loop = sm.SnapshotMetadataLoop(api, sock, DRIVER, address="127.0.0.1:0", tls=None)
        async with serving(loop) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield api, kpbg.SnapshotMetadataStub(ch), csi


async def test_the_class_secret_reaches_the_driver(recorded: Any) -> None:
    api, stub, csi = recorded
    await _class(api, "with-secret", SECRET_PARAMS)
    await _class(api, "plain")
    await _secret(api, "target-creds", NS, user="backup", password="s3cret")
    await _secret(api, "base-creds", NS, user="someone-else")
    await _bound_snapshot(api, "base", "h-base", cls="plain")
    await _bound_snapshot(api, "target", "h-target", cls="with-secret")
    assert _ranges(await _allocated(stub, "target")) == [(0, 4 * KiB)]
    assert dict(csi.requests[-1].secrets) == {"user": "backup", "password": "s3cret"}
    assert csi.requests[-1].snapshot_id == "h-target"
    assert _ranges(await _allocated(stub, "base")) == [(0, 4 * KiB)]
    assert dict(csi.requests[-1].secrets) == {}
    # A delta carries the target's secret (the base is only a handle).
    assert _ranges(await _delta(stub, "h-base", "target")) == [(4 * KiB, 4 * KiB)]
    last = csi.requests[-1]
    assert (last.base_snapshot_id, last.target_snapshot_id) == ("h-base", "h-target")
    assert dict(last.secrets) == {"user": "backup", "password": "s3cret"}


async def test_without_a_class_name_the_drivers_default_class_counts(recorded: Any) -> None:
    api, stub, csi = recorded
    await _bound_snapshot(api, "static", "h-static")
    await _allocated(stub, "static")  # no class at all: nothing to pass
    assert dict(csi.requests[-1].secrets) == {}
    await _class(api, "default", SECRET_PARAMS, default=True)
    await _secret(api, "static-creds", NS, token="t")
    await _allocated(stub, "static")
    assert dict(csi.requests[-1].secrets) == {"token": "t"}
    await _class(api, "another-default", default=True)
    code, details = await _code(_allocated(stub, "static"))
    assert code == C.UNAVAILABLE and "more than one default" in details


async def test_secret_problems_are_unavailable_and_never_show_values(recorded: Any) -> None:
    api, stub, csi = recorded
    await _class(api, "with-secret", SECRET_PARAMS)
    await _class(api, "half", {p.SECRET_NAME_KEY: "creds"})
    await _class(api, "bad-token", {p.SECRET_NAME_KEY: "${pvc.name}", p.SECRET_NAMESPACE_KEY: NS})
    not_text = base64.b64encode(b"\xff\xfe-s3cret").decode()
    await api.create(
        SECRET, {"metadata": {"name": "garbled-creds", "namespace": NS}, "data": {"k": not_text}}
    )
    await _bound_snapshot(api, "no-secret", "h1", cls="with-secret")
    await _bound_snapshot(api, "missing-class", "h2", cls="no-such-class")
    await _bound_snapshot(api, "half", "h3", cls="half")
    await _bound_snapshot(api, "bad-token", "h4", cls="bad-token")
    await _bound_snapshot(api, "garbled", "h5", cls="with-secret")
    want = {
        "no-secret": f"{NS}/no-secret-creds",
        "missing-class": "no-such-class",
        "half": "Both must be specified",
        "bad-token": "pvc.name",
        "garbled": "not base64 of UTF-8",
    }
    for name, words in want.items():
        code, details = await _code(_allocated(stub, name))
        assert code == C.UNAVAILABLE and words in details, f"{name}: {code.name}: {details}"
        assert "s3cret" not in details
    assert csi.requests == []  # nothing reached the driver


# -- the RBAC manifest -----------------------------------------------------------------------

MANIFESTS = Path(__file__).resolve().parents[3] / "examples" / "deploy" / "loopfile"


async def test_rbac_is_exactly_what_the_loop_uses(tmp_path: Path) -> None:
    found = {
        (d["kind"], d["metadata"]["name"]): d
        for d in yaml.safe_load_all((MANIFESTS / "rbac-snapshot-metadata.yaml").read_text())
        if d
    }
    name = "csi-kit-loopfile-snapshot-metadata"
    binding = found[("ClusterRoleBinding", name)]
    assert binding["roleRef"] == {
        "kind": "ClusterRole",
        "name": name,
        "apiGroup": "rbac.authorization.k8s.io",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "csi-kit", "namespace": "csi-kit-loopfile"}
    ]
    fake = await _alice_api()
    await _class(fake, "with-secret", SECRET_PARAMS)
    await _class(fake, "default", default=True)
    await _secret(fake, "named-creds", NS, k="v")
    await _bound_snapshot(fake, "named", "h1", cls="with-secret")
    await _bound_snapshot(fake, "unnamed", "h2")
    rec = Recording(fake)
    async with _recording_driver(tmp_path) as (csi, sock):
        loop = sm.SnapshotMetadataLoop(rec, sock, DRIVER, address="127.0.0.1:0", tls=None)
        async with serving(loop) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = kpbg.SnapshotMetadataStub(ch)
            await _allocated(stub, "named")  # the class by name, its secret
            await _delta(stub, "h1", "unnamed")  # the default class, found in the list
    assert len(csi.requests) == 2
    assert rec.used == granted(found[("ClusterRole", name)])


def test_the_crd_and_the_sample_agree_with_the_loop() -> None:
    (crd,) = yaml.safe_load_all((MANIFESTS / "snapshotmetadataservice-crd.yaml").read_text())
    res = SNAPSHOT_METADATA_SERVICE
    assert crd["metadata"]["name"] == f"{res.plural}.{res.group}"
    assert crd["spec"]["group"] == res.group and crd["spec"]["scope"] == "Cluster"
    assert crd["spec"]["names"]["kind"] == res.kind and crd["spec"]["names"]["plural"] == res.plural
    (version,) = crd["spec"]["versions"]
    assert version["name"] == res.version and version["served"] and version["storage"]
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert sorted(spec_schema["required"]) == ["address", "audience", "caCert"]
    assert spec_schema["properties"]["caCert"]["format"] == "byte"
    sample = {
        d["kind"]: d for d in yaml.safe_load_all((MANIFESTS / "snapshotmetadataservice.yaml").read_text())
    }
    sms = sample["SnapshotMetadataService"]
    assert sms["apiVersion"] == res.api_version and sms["metadata"]["name"] == "loopfile.csi-kit.io"
    assert set(sms["spec"]) == set(spec_schema["properties"])
    base64.b64decode(sms["spec"]["caCert"], validate=True)
    service = sample["Service"]
    host, port = sms["spec"]["address"].rsplit(":", 1)
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert int(port) == service["spec"]["ports"][0]["port"]
    assert service["spec"]["ports"][0]["targetPort"] == 50051  # the loop's default port


def _args(**kw: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    k8s_cli.add_controller_options(parser)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    return parser.parse_args(argv)


def test_cli_selects_the_loop_only_when_asked() -> None:
    assert "snapshot-metadata" in k8s_cli.selected(_args(controllers="snapshot-metadata"))
    assert "snapshot-metadata" not in k8s_cli.selected(_args(controllers="all"))


def test_cli_loop_needs_the_driver_service_and_tls(tmp_path: Path) -> None:
    api = FakeKubeAPI()
    without = DriverInfo(DRIVER, "1", frozenset({"CONTROLLER_SERVICE"}), frozenset(), frozenset())
    with_service = DriverInfo(
        DRIVER, "1", frozenset({"CONTROLLER_SERVICE", "SNAPSHOT_METADATA_SERVICE"}), frozenset(), frozenset()
    )
    assert sm.loop_from_args(_args(), api, "unix:///x.sock", without) is None
    with pytest.raises(ValueError, match="tls"):
        sm.loop_from_args(_args(), api, "unix:///x.sock", with_service)
    with pytest.raises(ValueError, match=re.escape("/nowhere/tls.crt")):
        sm.loop_from_args(
            _args(
                snapshot_metadata_tls_cert="/nowhere/tls.crt", snapshot_metadata_tls_key="/nowhere/tls.key"
            ),
            api,
            "unix:///x.sock",
            with_service,
        )
    cert, key = _key_pair(tmp_path, "tls")
    loop = sm.loop_from_args(
        _args(snapshot_metadata_tls_cert=str(cert), snapshot_metadata_tls_key=str(key)),
        api,
        "unix:///x.sock",
        with_service,
    )
    assert loop is not None and loop.address == "0.0.0.0:50051"
    assert loop.certificates is not None and loop.certificates.loads == 1
