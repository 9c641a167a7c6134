"""`csi-kit call`: call one CSI RPC on any driver endpoint, by hand or from a script.

What gocsi's ``csc`` is to Go drivers, for every RPC of the schema this
package is built from (Identity, Controller, Node, GroupController and the
streaming SnapshotMetadata service): the method table is read from the
``csi.v1`` descriptors, never kept by hand, so an RPC added to the proto is
callable without a change here.

A request is built in three layers, later ones winning:

1. ``--request-file FILE`` (``-`` for stdin): the request as JSON or YAML in
   protobuf's JSON mapping (snake_case or lowerCamel field names);
2. flags for the common fields (``--name``, ``--volume-id``, ``--size``,
   ``--param KEY=VALUE`` …); a flag the method's request has no field for is
   an error, not silently dropped;
3. ``--secrets-file FILE``: a flat YAML/JSON map put into the request's
   ``secrets`` field.  Its content is never printed or logged, not even in
   an error about the file itself.

A request that needs a volume capability and got none gets one mount
volume, ``SINGLE_NODE_WRITER`` (csc's default).

The response goes to stdout as ``text`` (protobuf text format), ``json``
(protobuf's JSON mapping, snake_case names; int64 values are strings, so
the output is valid ``--request-file`` input) or ``yaml``.  A streaming RPC
prints one JSON object per line, or one YAML document per message.

Exit status: 0 when the call answered OK; ``10 + the gRPC status code``
when it did not (13 INVALID_ARGUMENT, 15 NOT_FOUND, 16 ALREADY_EXISTS,
20 ABORTED, 22 UNIMPLEMENTED, 24 UNAVAILABLE — also a dead endpoint —
…); 2 for a mistake on our side of the wire (unknown method, bad flag,
unreadable file).  The offset keeps the codes apart from 1 and 2, which
every shell tool already uses for failure and usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

import attrs
import grpc
import yaml
from google.protobuf import json_format, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from csi_kit._grpc.redact import is_secret
from csi_kit._grpc.server import parse_endpoint
from csi_kit._pb import csi_pb2
from csi_kit.errors import CSIError
from csi_kit.log import escape_text

__all__ = ["main", "build_parser", "methods", "Method", "EXIT_OFFSET", "UsageError"]

#: Exit status of a call that ended with gRPC status code ``c`` (c > 0): ``EXIT_OFFSET + c``.
EXIT_OFFSET = 10
_USAGE = 2


class UsageError(Exception):
    """A mistake before anything was sent: one line, exit status 2."""


@attrs.frozen
class Method:
    """One RPC of the ``csi.v1`` schema."""

    service: str
    name: str
    request: Descriptor
    response: Descriptor
    streaming: bool

    @property
    def path(self) -> str:
        return f"/csi.v1.{self.service}/{self.name}"


def methods() -> list[Method]:
    """Every RPC of every service in ``csi.proto``, in schema order."""
    out = []
    for service in csi_pb2.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            out.append(Method(service.name, m.name, m.input_type, m.output_type, m.server_streaming))
    return out


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_method(spelling: str) -> Method:
    """``CreateVolume``, ``Controller.CreateVolume``, ``controller/create-volume``, any case."""
    service, _, name = spelling.replace("/", ".").rpartition(".")
    hits = [
        m
        for m in methods()
        if _norm(m.name) == _norm(name) and (not service or _norm(m.service) == _norm(service))
    ]
    if not hits:
        raise UsageError(f"no CSI method {spelling!r} (csi-kit call --list shows them)")
    return hits[0]


# --- flags for the common fields ---------------------------------------------

#: flag dest -> request field (scalars and repeated scalars).
_SCALARS = {
    "name": "name",
    "volume_id": "volume_id",
    "snapshot_id": "snapshot_id",
    "group_snapshot_id": "group_snapshot_id",
    "node_id": "node_id",
    "target_path": "target_path",
    "staging_target_path": "staging_target_path",
    "volume_path": "volume_path",
    "readonly": "readonly",
    "max_entries": "max_entries",
    "starting_token": "starting_token",
    "max_results": "max_results",
    "starting_offset": "starting_offset",
    "base_snapshot_id": "base_snapshot_id",
    "target_snapshot_id": "target_snapshot_id",
    "snapshot_ids": "snapshot_ids",
}
_MAPS = {"param": ("parameters", "mutable_parameters"), "volume_context": ("volume_context",)}
_MAPS["publish_context"] = ("publish_context",)
_SIZE = re.compile(r"^(\d+)\s*([KMGTP]i?)?B?$", re.I)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_UNITS |= {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}


def parse_size(text: str) -> int:
    """``1073741824``, ``1Gi``, ``64Mi``, ``10G`` → bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (bytes, or a number with Ki/Mi/Gi/Ti or K/M/G/T)"
        )
    return int(m.group(1)) * _UNITS[(m.group(2) or "").lower()]


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _access_mode(text: str) -> int:
    enum = csi_pb2.VolumeCapability.AccessMode.Mode
    name = text.strip().upper().replace("-", "_")
    names = list(enum.keys())  # an enum wrapper, not a dict
    if name not in names:
        choices = ", ".join(k.lower().replace("_", "-") for k in names if k != "UNKNOWN")
        raise argparse.ArgumentTypeError(f"access mode {text!r} is not one of {choices}")
    return int(enum.Value(name))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csi-kit call",
        description="Call one CSI RPC on a driver endpoint and print the answer.",
        epilog=(
            "Exit status: 0 OK; 10 + the gRPC status code otherwise (13 INVALID_ARGUMENT, 15 NOT_FOUND, "
            "16 ALREADY_EXISTS, 24 UNAVAILABLE also for a dead endpoint, ...); 2 for usage and file errors."
        ),
    )
    p.add_argument("method", nargs="?", help="RPC name, e.g. CreateVolume or Node.NodePublishVolume")
    p.add_argument("--list", action="store_true", help="list every RPC and its request fields, then exit")
    p.add_argument(
        "--endpoint",
        default=os.environ.get("CSI_KIT_ENDPOINT") or os.environ.get("CSI_ENDPOINT"),
        help="unix:///path/csi.sock, a socket path, or host:port (env CSI_KIT_ENDPOINT or CSI_ENDPOINT)",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=("text", "json", "yaml"),
        default="text",
        help="output format (default: %(default)s)",
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds the call may take (default: %(default)s)"
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="seconds to wait for the endpoint (default: %(default)s)",
    )
    p.add_argument("--request-file", metavar="FILE", help="the request as JSON or YAML (- for stdin)")
    p.add_argument("--secrets-file", metavar="FILE", help="secrets as a flat JSON/YAML map (never printed)")
    f = p.add_argument_group("request fields (each needs the field in the method's request)")
    for flag in ("name", "volume-id", "snapshot-id", "group-snapshot-id", "node-id"):
        f.add_argument(f"--{flag}")
    f.add_argument("--target-path")
    f.add_argument("--staging-target-path")
    f.add_argument("--volume-path")
    f.add_argument("--size", type=parse_size, help="capacity_range.required_bytes (1Gi, 64Mi, bytes)")
    f.add_argument("--limit-bytes", type=parse_size, help="capacity_range.limit_bytes")
    f.add_argument(
        "--source-volume-id",
        action="append",
        help="CreateVolume: clone source; CreateSnapshot: source; CreateVolumeGroupSnapshot: repeatable",
    )
    f.add_argument("--source-snapshot-id", help="CreateVolume: restore from this snapshot")
    f.add_argument(
        "--snapshot-ids", action="append", metavar="ID", help="snapshot_ids (group snapshots), repeatable"
    )
    f.add_argument("--access-mode", type=_access_mode, help="e.g. single-node-writer (default when needed)")
    f.add_argument(
        "--access-type", choices=("mount", "block"), help="default mount when a capability is needed"
    )
    f.add_argument("--fs-type", help="mount capability's fs_type")
    f.add_argument("--mount-flag", action="append", help="mount capability's mount_flags, repeatable")
    f.add_argument("--readonly", action="store_true", default=None, help="readonly = true")
    f.add_argument(
        "--param", type=_key_value, action="append", metavar="KEY=VALUE", help="parameters, repeatable"
    )
    f.add_argument("--volume-context", type=_key_value, action="append", metavar="KEY=VALUE")
    f.add_argument("--publish-context", type=_key_value, action="append", metavar="KEY=VALUE")
    f.add_argument("--max-entries", type=int)
    f.add_argument("--starting-token")
    f.add_argument("--max-results", type=int)
    f.add_argument("--starting-offset", type=int)
    f.add_argument("--base-snapshot-id")
    f.add_argument("--target-snapshot-id")
    return p


# --- building the request ------------------------------------------------------


def _load_mapping(text: str, where: str, *, secret: bool = False) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        # A YAML error quotes the offending text: never for a secrets file.
        why = "" if secret else f": {escape_text(str(getattr(e, 'problem', '') or e))}"
        raise UsageError(f"{where} is not valid JSON or YAML{at}{why}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where} must hold a JSON/YAML mapping, not {type(data).__name__}")
    return data


def _read(path: str, stdin: IO[str]) -> str:
    if path == "-":
        return stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _field(msg: Message, name: str, flag: str, method: Method) -> Any:
    field = msg.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        raise UsageError(f"{method.name} has no field {name!r} (--{flag.replace('_', '-')})")
    return field


def _capability_fields(desc: Any) -> list[FieldDescriptor]:
    return [f for f in desc.fields if f.message_type is csi_pb2.VolumeCapability.DESCRIPTOR]


def _apply_capability(req: Message, ns: argparse.Namespace, method: Method) -> None:
    fields = _capability_fields(req.DESCRIPTOR)
    asked = any(v is not None for v in (ns.access_mode, ns.access_type, ns.fs_type, ns.mount_flag))
    if not fields:
        if asked:
            raise UsageError(
                f"{method.name} takes no volume capability (--access-mode/--access-type/--fs-type)"
            )
        return
    field = fields[0]
    target: Any = getattr(req, field.name)
    existing = list(target) if field.is_repeated else ([target] if req.HasField(field.name) else [])
    if existing and not asked:
        return
    cap = csi_pb2.VolumeCapability()
    if existing:
        cap.CopyFrom(existing[0])
    if ns.access_mode is not None or not cap.access_mode.mode:
        cap.access_mode.mode = ns.access_mode or csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    if ns.access_type == "block":
        cap.block.SetInParent()
    elif ns.access_type == "mount" or ns.fs_type or ns.mount_flag or cap.WhichOneof("access_type") is None:
        if ns.fs_type is not None:
            cap.mount.fs_type = ns.fs_type
        if ns.mount_flag:
            cap.mount.mount_flags[:] = ns.mount_flag
        cap.mount.SetInParent()
    if field.is_repeated:
        del target[:]
        target.append(cap)
    else:
        target.CopyFrom(cap)


def _apply_flags(req: Message, ns: argparse.Namespace, method: Method) -> None:
    r: Any = req  # generated fields are not known to the type checker
    for dest, name in _SCALARS.items():
        value = getattr(ns, dest, None)
        if value is None:
            continue
        field = _field(req, name, dest, method)
        if field.is_repeated:
            getattr(req, name).extend(value)
        else:
            setattr(req, name, value)
    for dest, names in _MAPS.items():
        pairs = getattr(ns, dest)
        if not pairs:
            continue
        name = next((n for n in names if n in req.DESCRIPTOR.fields_by_name), names[0])
        _field(req, name, dest, method)
        getattr(req, name).update(dict(pairs))
    if ns.size is not None or ns.limit_bytes is not None:
        _field(req, "capacity_range", "size", method)
        cr: Any = r.capacity_range
        if ns.size is not None:
            cr.required_bytes = ns.size
        if ns.limit_bytes is not None:
            cr.limit_bytes = ns.limit_bytes
    fields = req.DESCRIPTOR.fields_by_name
    if ns.source_volume_id:
        if "source_volume_ids" in fields:
            r.source_volume_ids.extend(ns.source_volume_id)
        elif len(ns.source_volume_id) > 1:
            raise UsageError(f"{method.name} takes one --source-volume-id")
        elif "source_volume_id" in fields:
            r.source_volume_id = ns.source_volume_id[0]
        else:
            _field(req, "volume_content_source", "source_volume_id", method)
            r.volume_content_source.volume.volume_id = ns.source_volume_id[0]
    if ns.source_snapshot_id is not None:
        _field(req, "volume_content_source", "source_snapshot_id", method)
        r.volume_content_source.snapshot.snapshot_id = ns.source_snapshot_id
    _apply_capability(req, ns, method)


def _apply_secrets(req: Message, path: str, stdin: IO[str], method: Method) -> None:
    desc: Any = req.DESCRIPTOR
    secret_fields = [f for f in desc.fields if is_secret(f)]
    if not secret_fields:
        raise UsageError(f"{method.name} takes no secrets (--secrets-file)")
    data = _load_mapping(_read(path, stdin), f"secrets file {path}", secret=True)
    secrets: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str) or isinstance(value, dict | list) or value is None:
            raise UsageError(f"secrets file {path} must be a flat map of names to strings")
        secrets[key] = value if isinstance(value, str) else json.dumps(value)
    getattr(req, secret_fields[0].name).update(secrets)


def build_request(method: Method, ns: argparse.Namespace, stdin: IO[str] = sys.stdin) -> Message:
    """The request message from ``--request-file``, the field flags and ``--secrets-file``."""
    req = GetMessageClass(method.request)()
    if ns.request_file:
        where = "stdin" if ns.request_file == "-" else ns.request_file
        data = _load_mapping(_read(ns.request_file, stdin), where)
        try:
            json_format.ParseDict(data, req)
        except json_format.ParseError as e:
            raise UsageError(f"{where}: not a {method.request.name}: {escape_text(str(e))}") from None
    _apply_flags(req, ns, method)
    if ns.secrets_file:
        _apply_secrets(req, ns.secrets_file, stdin, method)
    return req


# --- output ------------------------------------------------------------------


def _as_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def render(messages: Iterable[Message], fmt: str, streaming: bool, out: IO[str]) -> None:
    """Write each response as it arrives (a stream may be long)."""
    for i, msg in enumerate(messages):
        if fmt == "json":
            out.write(json.dumps(_as_dict(msg), indent=None if streaming else 2) + "\n")
        elif fmt == "yaml":
            if streaming and i:
                out.write("---\n")
            out.write(yaml.safe_dump(_as_dict(msg), sort_keys=False, default_flow_style=False))
        else:
            if streaming and i:
                out.write("\n")
            out.write(text_format.MessageToString(msg))
        out.flush()


def _list(out: IO[str]) -> None:
    for m in methods():
        fields = ", ".join(f.name for f in m.request.fields)
        stream = " (stream)" if m.streaming else ""
        out.write(f"{m.service}.{m.name}{stream}: {fields or '-'}\n")


# --- the call ----------------------------------------------------------------


def _status_line(method: Method, err: grpc.RpcError) -> tuple[int, str]:
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return EXIT_OFFSET + int(code.value[0]), f"{method.name}: {code.name}: {escape_text(details or '')}"


def call(
    method: Method,
    request: Message,
    endpoint: str,
    *,
    timeout: float,
    connect_timeout: float,
    out: IO[str],
    fmt: str,
) -> tuple[int, str]:
    """Send one request; print the answer.  Returns (exit status, error line or "")."""
    try:
        ep = parse_endpoint(endpoint)
    except CSIError as e:
        raise UsageError(str(e)) from None
    if ep.scheme == "unix" and not os.path.exists(ep.address):
        code = grpc.StatusCode.UNAVAILABLE
        return EXIT_OFFSET + int(code.value[0]), f"no CSI driver at {endpoint}: {ep.address} does not exist"
    response_class = GetMessageClass(method.response)
    with grpc.insecure_channel(ep.grpc_target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            code = grpc.StatusCode.UNAVAILABLE
            line = f"no CSI driver answers on {endpoint} (waited {connect_timeout:g} s)"
            return EXIT_OFFSET + int(code.value[0]), line
        kind: Callable[..., Any] = channel.unary_stream if method.streaming else channel.unary_unary
        stub = kind(
            method.path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        try:
            answer = stub(request, timeout=timeout)
            render(answer if method.streaming else [answer], fmt, method.streaming, out)
        except grpc.RpcError as e:
            return _status_line(method, e)
    return 0, ""


def main(argv: Sequence[str] | None = None, stdin: IO[str] | None = None, out: IO[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        if ns.list:
            _list(out)
            return 0
        if not ns.method:
            raise UsageError("which method? (csi-kit call --list shows them)")
        if not ns.endpoint:
            raise UsageError("--endpoint is required (or env CSI_KIT_ENDPOINT)")
        method = find_method(ns.method)
        request = build_request(method, ns, stdin or sys.stdin)
        rc, line = call(
            method,
            request,
            ns.endpoint,
            timeout=ns.timeout,
            connect_timeout=ns.connect_timeout,
            out=out,
            fmt=ns.output,
        )
    except UsageError as e:
        print(f"csi-kit call: {e}", file=sys.stderr)
        return _USAGE
    if line:
        print(f"csi-kit call: {line}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
