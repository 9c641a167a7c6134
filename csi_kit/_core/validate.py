"""Request validation: the one place that checks requests against the spec.

Every check raises a `csi_kit.errors` exception whose message names the field
and what was wrong with it.  Checks here depend only on the request and the
backend's static description (class attributes), never on stored state:
whether an object exists is the engine's business.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from csi_kit.backend import Backend
from csi_kit.errors import InvalidArgument, OutOfRange
from csi_kit.types import AccessMode, CapacityRange, VolumeCapability

__all__ = [
    "MAX_STRING",
    "MAX_MAP",
    "MAX_PATH",
    "require",
    "check_name",
    "check_id",
    "check_path",
    "check_map",
    "check_capabilities",
    "check_capability",
    "check_capacity_range",
    "resolve_capacity",
    "check_parameters",
    "parse_size",
]

#: The spec's general size limits (Field Requirements / Size Limits).
MAX_STRING = 128
MAX_MAP = 4096
#: Paths chosen by the CO: the spec asks plugins to accept at least 128 bytes;
#: Linux allows PATH_MAX.
MAX_PATH = 4096


def require(value: object, field: str) -> None:
    """Raise INVALID_ARGUMENT when a REQUIRED field is missing or empty."""
    if value is None or value == "" or (isinstance(value, (list, tuple, dict)) and not value):
        raise InvalidArgument(f"{field} is required")


def _check_string(value: str, field: str, limit: int = MAX_STRING) -> None:
    if "\x00" in value:
        raise InvalidArgument(f"{field} must not contain NUL bytes")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidArgument(f"{field} is {size} bytes long; the limit is {limit} bytes")


#: Characters the spec bans from names: control characters other than
#: common whitespace (U+0000-U+0008, U+000B, U+000C, U+000E-U+001F, U+007F-U+009F).
_BANNED = frozenset([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)])
#: Every C0 and C1 control character and DEL: never part of an id or a path.
_CONTROL = frozenset([*range(0x00, 0x20), *range(0x7F, 0xA0)])


def _quoted(value: str, limit: int = 64) -> str:
    """``value`` for an error message: its repr, cut to ``limit`` characters so
    a hostile 10 KiB value is not echoed whole."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _first_control(value: str) -> str | None:
    return next((ch for ch in value if ord(ch) in _CONTROL), None)


def check_name(value: str, field: str = "name") -> None:
    """A CO-chosen name: required, at most 128 bytes, none of the banned characters."""
    require(value, field)
    _check_string(value, field)
    for ch in value:
        if ord(ch) in _BANNED:
            raise InvalidArgument(
                f"{field} contains the control character U+{ord(ch):04X}, which the spec bans"
            )


def check_id(value: str, field: str, *, opaque: bool = False) -> None:
    """An id from a caller: required, at most 128 bytes and one path component.

    This is the one check every caller-supplied id passes before any backend
    method sees it, node RPCs included: not empty, at most `MAX_STRING` bytes
    of UTF-8, no NUL, no ``/``, not ``.`` or ``..``, and no control character
    (U+0000-U+001F, U+007F-U+009F).  A backend may therefore join an id into a
    path as one component.  Ids csi_kit generates (UUIDs) always pass.

    With ``opaque`` (a backend whose `Backend.opaque_ids` is True: it never
    uses an id in a path or command) only the required, length and NUL rules
    apply.

    Only malformed ids are INVALID_ARGUMENT here: a well-formed id that names
    nothing ("some-vol-id") is left to the engine, which answers NOT_FOUND (or
    OK for a delete) as the spec and csi-sanity expect.
    """
    require(value, field)
    _check_string(value, field)
    if opaque:
        return
    if "/" in value:
        raise InvalidArgument(f"{field} {_quoted(value)} must be one path component: it contains '/'")
    if value in (".", ".."):
        raise InvalidArgument(f"{field} {_quoted(value)} must not be '.' or '..'")
    ch = _first_control(value)
    if ch is not None:
        raise InvalidArgument(f"{field} {_quoted(value)} contains the control character U+{ord(ch):04X}")


def check_path(value: str, field: str) -> str:
    """A CO-chosen path (target, staging, volume path): absolute and already normal.

    The lexical half of the path rule; the engine and `csi_kit.linux` do the
    rest (not inside the driver's roots, no symlink in any component).  A path
    that is not already in normal form is rejected, never normalised: what the
    caller names is exactly what gets checked and used.  Rejected: relative
    paths, ``/`` itself, ``.`` or ``..`` components, ``//`` anywhere, a
    trailing ``/``, NUL or any control character, more than `MAX_PATH` bytes.
    Returns the path unchanged.
    """
    require(value, field)
    _check_string(value, field, MAX_PATH)
    shown = _quoted(value)
    ch = _first_control(value)
    if ch is not None:
        raise InvalidArgument(f"{field} {shown} contains the control character U+{ord(ch):04X}")
    if not value.startswith("/"):
        raise InvalidArgument(f"{field} must be an absolute path, got {shown}")
    if value == "/":
        raise InvalidArgument(f"{field} must not be the root directory /")
    if "//" in value:
        raise InvalidArgument(f"{field} {shown} is not in normal form: it contains '//'")
    if value.endswith("/"):
        raise InvalidArgument(f"{field} {shown} is not in normal form: it ends with '/'")
    parts = value.split("/")
    if ".." in parts:
        raise InvalidArgument(f"{field} {shown} must not contain '..' components")
    if "." in parts:
        raise InvalidArgument(f"{field} {shown} is not in normal form: it contains a '.' component")
    return value


def check_map(value: Mapping[str, str], field: str) -> None:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
    if size > MAX_MAP:
        raise InvalidArgument(f"{field} is {size} bytes; the limit is {MAX_MAP} bytes")
    for key in value:
        if "\x00" in key:
            raise InvalidArgument(f"{field} keys must not contain NUL bytes")


def check_parameters(
    backend: type[Backend], parameters: Mapping[str, str], field: str = "parameters"
) -> None:
    check_map(parameters, field)
    allowed = backend.parameter_keys
    if allowed is None:
        return
    # Keys the Kubernetes sidecars add for the driver's information are always accepted.
    unknown = sorted(k for k in parameters if k not in allowed and not k.startswith("csi.storage.k8s.io/"))
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise InvalidArgument(f"unsupported {field} {', '.join(unknown)}; this backend accepts: {known}")


def check_capability(backend: type[Backend], cap: VolumeCapability, field: str = "volume_capability") -> None:
    """One capability: an access type this backend serves and a known mode."""
    if cap.access_type is None:
        raise InvalidArgument(f"{field}.access_type is required (mount or block)")
    if cap.access_type not in backend.access_types:
        served = " and ".join(sorted(backend.access_types))
        raise InvalidArgument(
            f"{field}: {cap.access_type} access is not supported; this backend serves {served}"
        )
    if cap.access_mode == AccessMode.UNKNOWN:
        raise InvalidArgument(f"{field}.access_mode is required")
    try:
        mode = AccessMode(cap.access_mode)
    except ValueError:
        raise InvalidArgument(f"{field}.access_mode {cap.access_mode} is not a known access mode") from None
    if mode not in backend.access_modes:
        raise InvalidArgument(f"{field}: access mode {mode.name} is not supported by this backend")
    if cap.mount is not None:
        fs = cap.mount.fs_type
        if fs not in backend.fs_types and not (fs == "" and backend.default_fs_type):
            accepted = ", ".join(sorted(t for t in backend.fs_types if t)) or "the backend's default"
            raise InvalidArgument(f"{field}: fs_type {fs!r} is not supported; use {accepted}")
        for flag in cap.mount.mount_flags:
            if not flag or "," in flag or "\x00" in flag or "\n" in flag:
                raise InvalidArgument(f"{field}: mount flag {flag!r} is malformed")


def check_capabilities(
    backend: type[Backend], caps: Iterable[VolumeCapability], field: str = "volume_capabilities"
) -> None:
    caps = list(caps)
    require(caps, field)
    for i, cap in enumerate(caps):
        check_capability(backend, cap, f"{field}[{i}]")
    if len({c.access_type for c in caps}) > 1:
        raise InvalidArgument(f"{field} mixes block and mount access; a volume is one or the other")


def check_capacity_range(capacity: CapacityRange) -> None:
    if capacity.required_bytes < 0:
        raise InvalidArgument(
            f"capacity_range.required_bytes must not be negative, got {capacity.required_bytes}"
        )
    if capacity.limit_bytes < 0:
        raise InvalidArgument(f"capacity_range.limit_bytes must not be negative, got {capacity.limit_bytes}")
    if capacity.limit_bytes and capacity.required_bytes > capacity.limit_bytes:
        raise InvalidArgument(
            f"capacity_range.required_bytes ({capacity.required_bytes}) exceeds "
            f"limit_bytes ({capacity.limit_bytes})"
        )


def resolve_capacity(backend: Backend, capacity: CapacityRange, minimum: int = 0) -> int:
    """The size to make: the requested range, the backend's bounds and a floor.

    ``minimum`` is the size of a content source: a restored or cloned volume
    is never smaller than what it copies.
    """
    check_capacity_range(capacity)
    cls = type(backend)
    size = capacity.required_bytes or (
        min(cls.default_volume_bytes, capacity.limit_bytes)
        if capacity.limit_bytes
        else cls.default_volume_bytes
    )
    size = max(size, minimum, cls.min_volume_bytes)
    size = backend.round_capacity(size)
    if capacity.limit_bytes and size > capacity.limit_bytes:
        if minimum > capacity.limit_bytes:
            raise OutOfRange(
                f"the content source holds {minimum} bytes, more than capacity_range.limit_bytes "
                f"({capacity.limit_bytes})"
            )
        raise OutOfRange(
            f"the smallest volume this backend can make for the request is {size} bytes, above "
            f"capacity_range.limit_bytes ({capacity.limit_bytes})"
        )
    if size > cls.max_volume_bytes:
        raise OutOfRange(
            f"{size} bytes requested; this backend's largest volume is {cls.max_volume_bytes} bytes"
        )
    return size


_SIZE = re.compile(r"(\d+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
_SIZE_FACTORS = {
    None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def parse_size(value: str, field: str) -> int:
    """A size given as text (an inline volume's ``size`` attribute): bytes, or a whole number
    with a Kubernetes quantity suffix (``512Mi``, ``1G``)."""
    m = _SIZE.fullmatch(value.strip())
    if m is None:
        raise InvalidArgument(
            f"{field} {_quoted(value)} is not a size (bytes, or a number with Ki, Mi, Gi, k, M, G...)"
        )
    size = int(m.group(1)) * _SIZE_FACTORS[m.group(2)]
    if size >= 2**63:
        raise OutOfRange(f"{field} {_quoted(value)} is beyond the largest size the spec can carry")
    return size
