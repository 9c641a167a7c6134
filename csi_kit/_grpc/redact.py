"""Log-safe views of CSI messages: fields marked ``csi_secret`` never appear.

The spec marks secret-bearing fields with the ``(csi_secret) = true`` field
option; we read that option from the descriptors instead of keeping a list, so
a field added to the schema later is covered without a code change.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from csi_kit._pb import csi_pb2

__all__ = ["is_secret", "redacted", "request_fields"]

REDACTED = "***stripped***"
#: Request fields worth a place in every log line.
_ID_FIELDS = (
    "name",
    "volume_id",
    "snapshot_id",
    "source_volume_id",
    "group_snapshot_id",
    "node_id",
    "target_path",
    "staging_target_path",
    "volume_path",
)


def is_secret(field: FieldDescriptor) -> bool:
    opts = field.GetOptions()
    ext: Any = csi_pb2.csi_secret
    return bool(opts.HasExtension(ext) and opts.Extensions[ext])


@cache
def _secret_fields(desc: Descriptor) -> frozenset[str]:
    return frozenset(f.name for f in desc.fields if is_secret(f))


def redacted(msg: Message) -> dict[str, Any]:
    """The message as a dict, with every csi_secret field's content replaced."""
    out: dict[str, Any] = {}
    secret = _secret_fields(msg.DESCRIPTOR)
    for field, value in msg.ListFields():
        if field.name in secret:
            out[field.name] = REDACTED
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                out[field.name] = dict(value)
            elif field.is_repeated:
                out[field.name] = [redacted(v) for v in value]
            else:
                out[field.name] = redacted(value)
        elif field.is_repeated:
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


@cache
def _id_fields(desc: Descriptor) -> tuple[tuple[str, str], ...]:
    """(field, log key) of the identifying fields a message type has, secrets left out."""
    names = {f.name for f in desc.fields}
    secret = _secret_fields(desc)
    # "name" would clash with LogRecord.name
    return tuple(
        (name, "object_name" if name == "name" else name)
        for name in _ID_FIELDS
        if name in names and name not in secret
    )


def request_fields(msg: Message) -> dict[str, str]:
    """The identifying fields of a request, for the per-call log line."""
    out = {}
    for name, key in _id_fields(msg.DESCRIPTOR):
        value = getattr(msg, name)
        if value:
            out[key] = str(value)[:256]
    return out
