"""Changed-block tracking for backup applications: what external-snapshot-metadata does.

Opt-in with ``csi-kit serve --controllers snapshot-metadata``.  A backup
application finds the driver's endpoint in the cluster-scoped
SnapshotMetadataService object (``cbt.storage.k8s.io``) named after the
driver -- its ``spec.address``, ``spec.audience`` and ``spec.caCert`` -- and
calls the *Kubernetes* SnapshotMetadata API (proto/snapshot_metadata.proto)
there over TLS.  Each call is handled in this order, as upstream does:

1. the request's fields are checked (INVALID_ARGUMENT; a missing token is
   UNAUTHENTICATED);
2. **authentication**: a TokenReview of ``security_token`` with the
   audience from the SnapshotMetadataService object (UNAUTHENTICATED unless
   the API server says the token is valid *for that audience*);
3. **authorization**: a SubjectAccessReview for the token's user -- may it
   ``get`` ``volumesnapshots.snapshot.storage.k8s.io`` in the request's
   namespace (PERMISSION_DENIED otherwise);
4. **translation**: the VolumeSnapshot name is resolved through its bound
   VolumeSnapshotContent to the CSI snapshot handle: NOT_FOUND for a
   missing object, UNAVAILABLE while it is not ready, INVALID_ARGUMENT for a
   snapshot of another driver, FAILED_PRECONDITION for a content that is not
   bound back to that VolumeSnapshot.  A delta's base is given directly as a
   CSI snapshot handle (``base_snapshot_id``, upstream's current field) and
   is passed through; the driver checks it (NOT_FOUND, or INVALID_ARGUMENT
   for a snapshot of another volume);
5. **secrets**: the snapshot's VolumeSnapshotClass (the one its spec names,
   else the driver's default class) may name a snapshotter secret with
   ``csi.storage.k8s.io/snapshotter-secret-name``/``-namespace`` (the same
   templates the snapshotter resolves); that secret's data goes to the
   driver in the CSI request's ``secrets``, as the snapshotter's
   CreateSnapshot got it.  A delta uses the *target*'s class, as upstream
   does (the base is only a handle).  A class, template or secret that
   cannot be read is UNAVAILABLE; a snapshot with no class and no default
   class is forwarded without secrets (upstream refuses it);
6. **forwarding** to the driver's CSI SnapshotMetadata service over its unix
   socket, streaming each answer back as it comes; the driver's error codes
   reach the caller unchanged, and a caller that goes away cancels the CSI
   stream.

The Kubernetes and CSI response messages have the same field numbers and
types, so an answer is relayed by re-parsing its bytes.

The audience is read from the SnapshotMetadataService object (cached for
`AUDIENCE_TTL` seconds, so an edit takes effect without a restart), unless
``--snapshot-metadata-audience`` names one; with
``--snapshot-metadata-service-address`` the loop also creates that object
when it is missing (address, audience, and the CA bundle from
``--snapshot-metadata-ca-cert``).

The serving certificate and key are files, reloaded when they change
(`tls.CertificateReloader`, re-exported here).
"""

from __future__ import annotations

import argparse
import base64
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import grpc
import grpc.aio

from csi_kit._pb import csi_pb2 as pb
from csi_kit._pb import csi_pb2_grpc as _pbg
from csi_kit._pb import snapshot_metadata_pb2 as kpb
from csi_kit._pb import snapshot_metadata_pb2_grpc as _kpbg
from csi_kit.k8s.objects.resources import (
    SNAPSHOT_METADATA_SERVICE,
    SUBJECT_ACCESS_REVIEW,
    TOKEN_REVIEW,
    VOLUME_SNAPSHOT,
    VOLUME_SNAPSHOT_CLASS,
    VOLUME_SNAPSHOT_CONTENT,
)
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj, is_not_found, read_secret
from csi_kit.k8s.runtime.context import LoopContext, Planned
from csi_kit.k8s.runtime.controller import Loop
from csi_kit.k8s.runtime.csi import DriverInfo, grpc_target
from csi_kit.k8s.runtime.options import env as _env
from csi_kit.k8s.snapshot import protocol as p
from csi_kit.k8s.snapshot.tls import CertificateReloader, TLSFiles

__all__ = [
    "SNAPSHOT_METADATA_SERVICE",
    "TOKEN_REVIEW",
    "SUBJECT_ACCESS_REVIEW",
    "Caller",
    "Resolved",
    "Refused",
    "Gate",
    "MetadataProxy",
    "TLSFiles",
    "CertificateReloader",
    "SnapshotMetadataLoop",
    "add_options",
    "loop_from_args",
]

log = logging.getLogger(__name__)
pbg: Any = _pbg  # generated, untyped
kpbg: Any = _kpbg


#: Seconds an audience read from the SnapshotMetadataService object is used.
AUDIENCE_TTL = 30.0
C = grpc.StatusCode


class Refused(Exception):
    """A call answered with an error status before (or instead of) reaching the driver."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@attrs.frozen
class Caller:
    """Who a token belongs to, as the TokenReview said."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = attrs.field(factory=dict, eq=False)


@attrs.frozen
class Resolved:
    """A VolumeSnapshot the caller named, through its bound content."""

    handle: str
    snapshot: Obj = attrs.field(eq=False, repr=False)
    content_name: str


def _api_refusal(e: ApiError, what: str) -> Refused:
    if e.code == 404:
        return Refused(C.NOT_FOUND, f"{what} not found")
    if e.code in (401, 403):
        return Refused(C.INTERNAL, f"the sidecar may not read {what}: {e.code} {e.reason}")
    return Refused(C.UNAVAILABLE, f"reading {what}: {e.code} {e.reason}: {e.message}")


class Gate:
    """Authentication, authorization and name translation against the API server."""

    def __init__(self, api: KubeAPI, driver_name: str, *, audience: str = "") -> None:
        self.api = api
        self.driver_name = driver_name
        self.fixed_audience = audience
        self._audience: tuple[float, str] | None = None

    async def audience(self) -> str:
        """The audience a token must be for: the flag's, or the SnapshotMetadataService object's."""
        if self.fixed_audience:
            return self.fixed_audience
        now = time.monotonic()
        if self._audience is not None and now - self._audience[0] < AUDIENCE_TTL:
            return self._audience[1]
        try:
            obj = await self.api.get(SNAPSHOT_METADATA_SERVICE, self.driver_name)
        except ApiError as e:
            if is_not_found(e):
                raise Refused(
                    C.UNAVAILABLE,
                    f"no SnapshotMetadataService {self.driver_name!r}: the service is not set up",
                ) from None
            raise _api_refusal(e, f"SnapshotMetadataService {self.driver_name!r}") from None
        audience = str((obj.get("spec") or {}).get("audience") or "")
        if not audience:
            raise Refused(C.UNAVAILABLE, f"SnapshotMetadataService {self.driver_name!r} has no spec.audience")
        self._audience = (now, audience)
        return audience

    async def authenticate(self, token: str) -> Caller:
        """Who the token is, if the API server says it is valid *for our audience*."""
        if not token:
            raise Refused(C.UNAUTHENTICATED, "security_token is required")
        audience = await self.audience()
        review: Obj = {
            "apiVersion": TOKEN_REVIEW.api_version,
            "kind": TOKEN_REVIEW.kind,
            "metadata": {},
            "spec": {"token": token, "audiences": [audience]},
        }
        try:
            answer = await self.api.create(TOKEN_REVIEW, review)
        except ApiError as e:
            raise _api_refusal(e, "TokenReview") from None
        status = answer.get("status") or {}
        if not status.get("authenticated"):
            reason = status.get("error") or "the token is not valid"
            raise Refused(C.UNAUTHENTICATED, f"security_token rejected: {reason}")
        if audience not in (status.get("audiences") or []):
            raise Refused(C.UNAUTHENTICATED, f"security_token is not meant for audience {audience!r}")
        return _caller(status.get("user") or {})

    async def authorize(self, caller: Caller, namespace: str) -> None:
        review: Obj = {
            "apiVersion": SUBJECT_ACCESS_REVIEW.api_version,
            "kind": SUBJECT_ACCESS_REVIEW.kind,
            "metadata": {},
            "spec": {
                "user": caller.username,
                "uid": caller.uid,
                "groups": list(caller.groups),
                "extra": caller.extra,
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": "get",
                    "group": VOLUME_SNAPSHOT.group,
                    "resource": VOLUME_SNAPSHOT.plural,
                },
            },
        }
        try:
            answer = await self.api.create(SUBJECT_ACCESS_REVIEW, review)
        except ApiError as e:
            raise _api_refusal(e, "SubjectAccessReview") from None
        if not (answer.get("status") or {}).get("allowed"):
            raise Refused(
                C.PERMISSION_DENIED,
                f"{caller.username or 'the caller'} may not get volumesnapshots in namespace {namespace!r}",
            )

    async def resolve(self, namespace: str, name: str) -> Resolved:
        """VolumeSnapshot ``namespace/name`` and the CSI snapshot handle of its bound content."""
        what = f"VolumeSnapshot {namespace}/{name}"
        try:
            snap = await self.api.get(VOLUME_SNAPSHOT, name, namespace)
        except ApiError as e:
            raise _api_refusal(e, what) from None
        status = snap.get("status") or {}
        content_name = status.get("boundVolumeSnapshotContentName")
        if not content_name or not status.get("readyToUse"):
            raise Refused(C.UNAVAILABLE, f"{what} is not ready to use yet")
        try:
            content = await self.api.get(VOLUME_SNAPSHOT_CONTENT, content_name)
        except ApiError as e:
            raise _api_refusal(e, f"VolumeSnapshotContent {content_name} of {what}") from None
        return Resolved(self._handle(content, snap, what), snap, str(content_name))

    def _handle(self, content: Obj, snap: Obj, what: str) -> str:
        """The snapshot handle of the content bound to `snap`, if it is bound back and this driver's."""
        spec = content.get("spec") or {}
        ref = spec.get("volumeSnapshotRef") or {}
        meta = snap.get("metadata") or {}
        content_name = (content.get("metadata") or {}).get("name")
        if ref.get("name") != meta.get("name") or ref.get("namespace") != meta.get("namespace"):
            raise Refused(
                C.FAILED_PRECONDITION, f"VolumeSnapshotContent {content_name} is not bound to {what}"
            )
        if spec.get("driver") != self.driver_name:
            raise Refused(
                C.INVALID_ARGUMENT,
                f"{what} belongs to driver {spec.get('driver')!r}, not {self.driver_name!r}",
            )
        handle = (content.get("status") or {}).get("snapshotHandle")
        if not handle:
            raise Refused(C.UNAVAILABLE, f"VolumeSnapshotContent {content_name} has no snapshot handle yet")
        return str(handle)

    async def snapshot_handle(self, namespace: str, name: str) -> str:
        """The CSI snapshot handle of VolumeSnapshot ``namespace/name``, through its bound content."""
        return (await self.resolve(namespace, name)).handle

    async def _snapshot_class(self, snapshot: Obj) -> Obj | None:
        """The class the snapshot names, else the driver's one default class, else None."""
        name = p.spec(snapshot).get("volumeSnapshotClassName")
        if name:
            try:
                return await self.api.get(VOLUME_SNAPSHOT_CLASS, str(name))
            except ApiError as e:
                raise Refused(
                    C.UNAVAILABLE, f"reading VolumeSnapshotClass {name}: {e.code} {e.reason}"
                ) from None
        try:
            classes = (await self.api.list(VOLUME_SNAPSHOT_CLASS)).items
        except ApiError as e:
            raise Refused(C.UNAVAILABLE, f"listing VolumeSnapshotClasses: {e.code} {e.reason}") from None
        defaults = [c for c in classes if c.get("driver") == self.driver_name and p.is_default_class(c)]
        if len(defaults) > 1:
            raise Refused(
                C.UNAVAILABLE, f"more than one default VolumeSnapshotClass for driver {self.driver_name}"
            )
        return defaults[0] if defaults else None

    async def secrets(self, resolved: Resolved) -> dict[str, str]:
        """The snapshotter secret of the snapshot's class, decoded; {} when the class names none.

        Only names appear in errors: a secret's values never reach a message or a log line.
        """
        cls = await self._snapshot_class(resolved.snapshot)
        if cls is None:
            return {}
        meta = resolved.snapshot.get("metadata") or {}
        try:
            ref = p.secret_ref(
                {str(k): str(v) for k, v in (cls.get("parameters") or {}).items()},
                resolved.content_name,
                meta.get("name"),
                meta.get("namespace"),
            )
        except ValueError as e:
            raise Refused(
                C.UNAVAILABLE, f"VolumeSnapshotClass {(cls.get('metadata') or {}).get('name')}: {e}"
            ) from None
        if ref is None:
            return {}
        try:
            return await read_secret(self.api, ref)
        except ApiError as e:
            raise Refused(
                C.UNAVAILABLE, f"reading snapshotter secret {ref[1]}/{ref[0]}: {e.code} {e.reason}"
            ) from None
        except ValueError as e:
            raise Refused(C.UNAVAILABLE, f"snapshotter {e}") from None

    async def admit(self, token: str, namespace: str) -> Caller:
        caller = await self.authenticate(token)
        await self.authorize(caller, namespace)
        return caller


def _caller(user: dict[str, Any]) -> Caller:
    """The TokenReview's status.user as the SubjectAccessReview will need it."""
    return Caller(
        username=str(user.get("username") or ""),
        uid=str(user.get("uid") or ""),
        groups=tuple(str(g) for g in user.get("groups") or ()),
        extra={str(k): [str(x) for x in v] for k, v in (user.get("extra") or {}).items()},
    )


def _require(value: str, field: str) -> None:
    if not value:
        raise Refused(C.INVALID_ARGUMENT, f"{field} is required")


class MetadataProxy(kpbg.SnapshotMetadataServicer):  # type: ignore[misc]
    """The Kubernetes SnapshotMetadata service, relaying to the driver's CSI one."""

    def __init__(self, gate: Gate, csi_endpoint: str, *, timeout: float = 600.0) -> None:
        self.gate = gate
        self.csi_endpoint = csi_endpoint
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._csi: Any = None

    @property
    def csi(self) -> Any:
        """The driver's CSI SnapshotMetadata stub; its channel is made on first use, in the serving loop."""
        if self._csi is None:
            self._channel = grpc.aio.insecure_channel(grpc_target(self.csi_endpoint))
            self._csi = pbg.SnapshotMetadataStub(self._channel)
        return self._csi

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._csi = None, None

    async def _relay(self, call: Any, response_type: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for answer in call:
                yield response_type.FromString(answer.SerializeToString())
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "")
        finally:
            call.cancel()  # the caller went away (or we did): stop the driver's stream too

    async def _refused(self, method: str, e: Refused, context: Any) -> None:
        log.info("%s %s: %s", method, e.code.name, e.message)
        await context.abort(e.code, e.message)

    async def _admitted(self, request: Any, snapshot_name: str) -> tuple[Resolved, dict[str, str]]:
        """Steps 2-5: the caller's token and rights, the snapshot's handle, its class's secret."""
        await self.gate.admit(request.security_token, request.namespace)
        snap = await self.gate.resolve(request.namespace, snapshot_name)
        return snap, await self.gate.secrets(snap)

    async def _forward(
        self, method: str, translate: Callable[[], Awaitable[Any]], response_type: Any, context: Any
    ) -> AsyncIterator[Any]:
        """Step 6: `translate` the request (or refuse it), then stream the driver's answers back."""
        try:
            csi_request = await translate()
        except Refused as e:
            await self._refused(method, e, context)
            return
        call = getattr(self.csi, method)(csi_request, timeout=self.timeout)
        async for answer in self._relay(call, response_type, context):
            yield answer

    async def GetMetadataAllocated(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async def translate() -> Any:
            _require(request.namespace, "namespace")
            _require(request.snapshot_name, "snapshot_name")
            snap, secrets = await self._admitted(request, request.snapshot_name)
            return pb.GetMetadataAllocatedRequest(
                snapshot_id=snap.handle,
                starting_offset=request.starting_offset,
                max_results=request.max_results,
                secrets=secrets,
            )

        async for answer in self._forward(
            "GetMetadataAllocated", translate, kpb.GetMetadataAllocatedResponse, context
        ):
            yield answer

    async def GetMetadataDelta(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async def translate() -> Any:
            _require(request.namespace, "namespace")
            _require(request.base_snapshot_id, "base_snapshot_id")
            _require(request.target_snapshot_name, "target_snapshot_name")
            # The base is a bare handle: the secret is the target's class's.
            target, secrets = await self._admitted(request, request.target_snapshot_name)
            return pb.GetMetadataDeltaRequest(
                base_snapshot_id=request.base_snapshot_id,
                target_snapshot_id=target.handle,
                starting_offset=request.starting_offset,
                max_results=request.max_results,
                secrets=secrets,
            )

        async for answer in self._forward(
            "GetMetadataDelta", translate, kpb.GetMetadataDeltaResponse, context
        ):
            yield answer


class SnapshotMetadataLoop(Loop):
    """Serves the Kubernetes SnapshotMetadata API on a TLS port until cancelled."""

    name = "snapshot-metadata"

    def __init__(
        self,
        api: KubeAPI,
        csi_endpoint: str,
        driver_name: str,
        *,
        address: str,
        tls: TLSFiles | None,
        audience: str = "",
        service_address: str = "",
    ) -> None:
        super().__init__()
        self.api = api
        self.driver_name = driver_name
        self.address = address
        self.tls = tls
        self.service_address = service_address
        self.gate = Gate(api, driver_name, audience=audience)
        self.proxy = MetadataProxy(self.gate, csi_endpoint)
        self.port = 0
        self.certificates: CertificateReloader | None = None

    async def ensure_service_object(self) -> None:
        """Create the SnapshotMetadataService object when asked to and it is missing."""
        if not self.service_address:
            return
        try:
            await self.api.get(SNAPSHOT_METADATA_SERVICE, self.driver_name)
            return
        except ApiError as e:
            if not is_not_found(e):
                raise
        ca = b""
        if self.tls is not None and self.tls.ca:
            with open(self.tls.ca, "rb") as f:
                ca = f.read()
        obj: Obj = {
            "apiVersion": SNAPSHOT_METADATA_SERVICE.api_version,
            "kind": SNAPSHOT_METADATA_SERVICE.kind,
            "metadata": {"name": self.driver_name},
            "spec": {
                "address": self.service_address,
                "audience": self.gate.fixed_audience or self.driver_name,
                "caCert": base64.b64encode(ca).decode(),
            },
        }
        await self.api.create(SNAPSHOT_METADATA_SERVICE, obj)
        log.info("created SnapshotMetadataService %s (address %s)", self.driver_name, self.service_address)

    async def run(self) -> None:
        await self.ensure_service_object()
        server = grpc.aio.server()
        kpbg.add_SnapshotMetadataServicer_to_server(self.proxy, server)
        if self.tls is None:
            # Tests only: the CLI refuses to run without TLS (tokens travel in the requests).
            self.port = server.add_insecure_port(self.address)
        else:
            if self.certificates is None:
                self.certificates = CertificateReloader(self.tls)
            self.port = server.add_secure_port(self.address, self.certificates.credentials())
        if self.port == 0:
            raise RuntimeError(f"snapshot-metadata: cannot listen on {self.address}")
        await server.start()
        self.started.set()
        log.info("snapshot-metadata: serving the Kubernetes SnapshotMetadata API on %s (TLS)", self.address)
        try:
            await server.wait_for_termination()
        finally:
            await server.stop(5.0)
            await self.proxy.close()


def add_options(group: Any) -> None:
    """The ``--snapshot-metadata-*`` options (``csi-kit serve``)."""
    group.add_argument(
        "--snapshot-metadata-address",
        default=_env("snapshot-metadata-address", "0.0.0.0:50051"),
        help="host:port of the TLS endpoint for backup applications (snapshot-metadata loop)",
    )
    group.add_argument("--snapshot-metadata-tls-cert", default=_env("snapshot-metadata-tls-cert", ""))
    group.add_argument("--snapshot-metadata-tls-key", default=_env("snapshot-metadata-tls-key", ""))
    group.add_argument(
        "--snapshot-metadata-audience",
        default=_env("snapshot-metadata-audience", ""),
        help="token audience; default: spec.audience of the SnapshotMetadataService named after the driver",
    )
    group.add_argument(
        "--snapshot-metadata-service-address",
        default=_env("snapshot-metadata-service-address", ""),
        help="create the SnapshotMetadataService object when missing, advertising this address",
    )
    group.add_argument(
        "--snapshot-metadata-ca-cert",
        default=_env("snapshot-metadata-ca-cert", ""),
        help="CA bundle put in the created SnapshotMetadataService's spec.caCert",
    )


def loop_from_args(
    args: argparse.Namespace, api: KubeAPI, csi_endpoint: str, info: DriverInfo
) -> SnapshotMetadataLoop | None:
    """The loop, or None (with a warning) when the driver has no SnapshotMetadata service."""
    if "SNAPSHOT_METADATA_SERVICE" not in info.plugin_capabilities:
        log.warning(
            "driver %s does not offer SNAPSHOT_METADATA_SERVICE: not running snapshot-metadata", info.name
        )
        return None
    if not (args.snapshot_metadata_tls_cert and args.snapshot_metadata_tls_key):
        raise ValueError(
            "snapshot-metadata needs --snapshot-metadata-tls-cert and --snapshot-metadata-tls-key "
            "(security tokens travel in its requests)"
        )
    tls = TLSFiles(
        args.snapshot_metadata_tls_cert, args.snapshot_metadata_tls_key, args.snapshot_metadata_ca_cert
    )
    loop = SnapshotMetadataLoop(
        api,
        csi_endpoint,
        info.name,
        address=args.snapshot_metadata_address,
        tls=tls,
        audience=args.snapshot_metadata_audience,
        service_address=args.snapshot_metadata_service_address,
    )
    loop.certificates = CertificateReloader(tls)  # unusable files fail here, in one line (ValueError)
    return loop


# ---------------------------------------------------------------------- wiring
# The loop's factory, listed in k8s/registry.py; kept by the wiring (the module's owner works above).


async def build(ctx: LoopContext) -> list[Planned]:
    """The snapshot-metadata server: on every replica (no Lease), with its own API budget -- each
    call costs a TokenReview, a SubjectAccessReview and two reads."""
    loop = loop_from_args(ctx.args, ctx.clients.api_for("snapshot-metadata"), ctx.csi_endpoint, ctx.info)
    return [] if loop is None else [Planned(loop, None)]
