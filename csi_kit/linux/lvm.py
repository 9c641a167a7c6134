"""LVM through the ``lvm`` command: thin pools, thin and linear volumes, thin snapshots.

Why the command and not a library: lvm2 has no stable C or D-Bus API that a
node plugin can count on, while ``lvm <cmd> --reportformat json`` is stable,
locked (LVM serialises its own metadata updates) and present wherever LVM is.
Every call goes through `csi_kit.linux.run.run` as ``lvm <subcommand> ...``
(one binary, so one thing to install in a node image) with
``LVM_SUPPRESS_FD_WARNINGS=1`` (a driver has open sockets LVM would warn
about on every call).  Reports use ``--units b --nosuffix``: sizes are exact
byte counts, never rounded human units.

Names.  CSI ids are the driver's, but LVM's name rules are narrow: only
``[A-Za-z0-9+_.-]``, no leading ``-``, no ``snapshot``/``pvmove`` prefix, no
``_tdata``/``_cmeta``/... substrings, at most 127 characters, and the
device-mapper name ``<vg>-<lv>`` (hyphens doubled) must also fit in 127.
`lv_name_for` maps an id to ``<prefix><escaped id>``: letters, digits, ``.``,
``+`` and ``-`` stay, every other byte of the UTF-8 id becomes ``_XX`` (upper
case hex).  So ``_`` only ever starts an escape, and since every reserved
LVM suffix is ``_`` plus a *lower case* letter, no mapped name can contain
one; the prefix keeps the name off ``-``, ``snapshot`` and ``pvmove``.
`csi_id_from_lv_name` inverts it exactly and returns None for names that
are not ours.

Changed blocks: `thin_delta` and `thin_mappings` read a thin pool's
metadata (through a metadata snapshot, `metadata_snapshot`) with
thin-provisioning-tools, for the SnapshotMetadata service.

Ownership: everything csi_kit creates carries a tag starting with
`TAG_PREFIX`; a backend lists its volumes by tag and never touches LVs
without one.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from csi_kit.errors import CommandFailed, FailedPrecondition, InvalidArgument, NotFound
from csi_kit.linux.run import run

__all__ = [
    "TAG_PREFIX",
    "LogicalVolume",
    "ThinRanges",
    "ThinPool",
    "VgReport",
    "VolumeGroup",
    "activate",
    "add_tags",
    "create_linear_lv",
    "create_thin_snapshot",
    "create_thin_lv",
    "create_thin_pool",
    "csi_id_from_lv_name",
    "deactivate",
    "extend_lv",
    "get_lv",
    "list_lvs",
    "lv_device_path",
    "lv_name_for",
    "metadata_snapshot",
    "parse_thin_delta",
    "parse_thin_dump",
    "parse_lvs",
    "parse_vgs",
    "remove_lv",
    "report",
    "thin_delta",
    "thin_id",
    "thin_mappings",
    "thin_pool",
    "thin_snapshot",
    "validate_tag",
    "validate_vg_name",
    "vg_info",
]

TAG_PREFIX = "csi-kit."
"""Every tag csi_kit puts on an LV starts with this: the mark of ownership."""

NAME_MAX = 127
_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
_REPORT = ("--reportformat", "json", "--units", "b", "--nosuffix")
_LV_FIELDS = (
    "lv_name,vg_name,lv_uuid,lv_size,lv_attr,segtype,pool_lv,origin,lv_tags,"
    "data_percent,metadata_percent,lv_metadata_size"
)
_VG_FIELDS = (
    "vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_extent_count,vg_free_count,vg_tags,lv_count,pv_count"
)
_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*")
_TAG_RE = re.compile(r"[A-Za-z0-9_+.\-/=!:#&]+")
_KEEP = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.+-")
_RESERVED_PREFIXES = ("snapshot", "pvmove")
_RESERVED_PARTS = (
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_iorig", "_mimage", "_mlog", "_pmspare",
    "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
)  # fmt: skip


# ---------------------------------------------------------------- values


@attrs.frozen
class LogicalVolume:
    """One LV as ``lvs`` reports it; sizes in bytes.

    `attr` is LVM's ten-character ``lv_attr``; the properties below read the
    parts a backend needs.  `pool` and `origin` are None when empty;
    `data_percent` is None for LVs that have no such figure (linear ones).
    """

    vg: str
    name: str
    uuid: str
    size: int
    attr: str
    segtype: str
    pool: str | None
    origin: str | None
    tags: frozenset[str]
    data_percent: float | None
    metadata_percent: float | None

    @property
    def active(self) -> bool:
        return len(self.attr) > 4 and self.attr[4] == "a"

    @property
    def skips_activation(self) -> bool:
        """Thin snapshots are made with this flag: plain ``-ay`` ignores them (``-K`` does not)."""
        return len(self.attr) > 9 and self.attr[9] == "k"

    @property
    def is_thin(self) -> bool:
        return self.segtype == "thin"

    @property
    def is_thin_pool(self) -> bool:
        return self.segtype == "thin-pool"

    @property
    def device_path(self) -> str:
        return lv_device_path(self.vg, self.name)


@attrs.frozen
class ThinPool:
    """A thin pool's size and fill; `used_bytes` derives from LVM's percentage (two decimals)."""

    vg: str
    name: str
    size: int
    metadata_size: int
    data_percent: float
    metadata_percent: float
    tags: frozenset[str]

    @property
    def used_bytes(self) -> int:
        return int(self.size * self.data_percent / 100)


@attrs.frozen
class VgReport:
    """One ``lvs`` report of a volume group: each visible LV by name.

    A backend reads it once per operation and answers every question of
    that operation from it (the source, a leftover target, the pool's fill)
    rather than asking ``lvs`` three times: each ``lvm`` call costs a
    process start and a metadata scan.
    """

    vg: str
    rows: Mapping[str, Mapping[str, Any]]

    @classmethod
    def parse(cls, vg: str, report_json: str) -> VgReport:
        """From ``lvm lvs --reportformat json --units b --nosuffix -o <_LV_FIELDS> VG``."""
        return cls(vg, {row["lv_name"]: row for row in _rows(report_json, "lv")})

    def lv(self, name: str) -> LogicalVolume | None:
        row = self.rows.get(name)
        return _lv(row) if row is not None else None

    def pool(self, name: str) -> ThinPool:
        """Size and fill of a thin pool; NotFound if absent, FailedPrecondition if not a thin pool."""
        row = self.rows.get(name)
        if row is None:
            raise NotFound(f"thin pool {self.vg}/{name} does not exist")
        if row["segtype"] != "thin-pool":
            raise FailedPrecondition(f"{self.vg}/{name} is a {row['segtype']} LV, not a thin pool")
        return _thin_pool_from(row)


@attrs.frozen
class VolumeGroup:
    vg: str
    uuid: str
    size: int
    free: int
    extent_size: int
    extent_count: int
    free_count: int
    tags: frozenset[str]
    lv_count: int
    pv_count: int


# ---------------------------------------------------------------- names


def validate_vg_name(vg: str) -> str:
    """A VG name LVM accepts (configuration, not user input, but checked before any call)."""
    if not _NAME_RE.fullmatch(vg) or len(vg) > NAME_MAX or vg in (".", ".."):
        raise InvalidArgument(f"invalid LVM volume group name {vg!r}")
    return vg


def validate_tag(tag: str) -> str:
    if not _TAG_RE.fullmatch(tag) or tag.startswith("-") or len(tag) > 1024:
        raise InvalidArgument(f"invalid LVM tag {tag!r}: allowed are [A-Za-z0-9_+.-/=!:#&], no leading '-'")
    return tag


def _validate_lv_name(name: str) -> str:
    if (
        not _NAME_RE.fullmatch(name)
        or len(name) > NAME_MAX
        or name in (".", "..")
        or name.startswith(_RESERVED_PREFIXES)
        or any(part in name for part in _RESERVED_PARTS)
    ):
        raise InvalidArgument(f"invalid LVM logical volume name {name!r}")
    return name


def _dm_escape(name: str) -> str:
    return name.replace("-", "--")


def lv_device_path(vg: str, name: str) -> str:
    """The LV's device-mapper node, ``/dev/mapper/<vg>-<lv>`` with hyphens doubled.

    Device-mapper creates this node itself (with or without udev), unlike the
    ``/dev/<vg>/<lv>`` symlink, which needs udev or LVM's own fallback.
    """
    return f"/dev/mapper/{_dm_escape(vg)}-{_dm_escape(name)}"


def lv_name_for(csi_id: str, prefix: str, vg: str) -> str:
    """The LV name for a CSI id (see the module docstring); InvalidArgument if it cannot fit.

    ``prefix`` must itself be a valid LV name start without ``_`` (e.g.
    ``"csi-v-"``), so that the inverse can tell it from an escape.
    """
    if not prefix or "_" in prefix:
        raise ValueError(f"prefix {prefix!r} must be non-empty and contain no '_'")
    if not csi_id:
        raise InvalidArgument("empty id")
    out = [prefix]
    for byte in csi_id.encode():
        out.append(chr(byte) if byte in _KEEP else f"_{byte:02X}")
    name = _validate_lv_name("".join(out))
    if len(_dm_escape(vg)) + 1 + len(_dm_escape(name)) > NAME_MAX:
        raise InvalidArgument(f"id {csi_id!r} is too long for an LVM name in volume group {vg!r}")
    return name


def csi_id_from_lv_name(name: str, prefix: str) -> str | None:
    """The CSI id `lv_name_for` mapped to ``name``, or None if ``name`` is not one of its names."""
    if not name.startswith(prefix):
        return None
    body = name[len(prefix) :]
    raw = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == "_":
            hexpart = body[i + 1 : i + 3]
            if len(hexpart) != 2 or not re.fullmatch(r"[0-9A-F]{2}", hexpart):
                return None
            byte = int(hexpart, 16)
            if byte in _KEEP:
                return None  # not canonical: lv_name_for never escapes these
            raw.append(byte)
            i += 3
        elif ord(c) in _KEEP:
            raw.append(ord(c))
            i += 1
        else:
            return None
    try:
        return raw.decode() or None
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------- parsing


def _rows(report_json: str, key: str) -> list[dict[str, str]]:
    """The rows of every ``key`` section in an ``lvm ... --reportformat json`` document."""
    try:
        doc = json.loads(report_json)
    except json.JSONDecodeError as e:
        raise ValueError(f"lvm printed something that is not JSON: {e}") from None
    rows: list[dict[str, str]] = []
    for section in doc.get("report", []):
        rows.extend(section.get(key, []))
    return rows


def _int(value: str) -> int:
    return int(value) if value else 0


def _pct(value: str) -> float | None:
    return float(value) if value else None


def _tags(value: str) -> frozenset[str]:
    return frozenset(t for t in value.split(",") if t)


def _lv(row: Mapping[str, Any]) -> LogicalVolume:
    return LogicalVolume(
        vg=row["vg_name"],
        name=row["lv_name"],
        uuid=row["lv_uuid"],
        size=_int(row["lv_size"]),
        attr=row["lv_attr"],
        segtype=row["segtype"],
        pool=row["pool_lv"] or None,
        origin=row["origin"] or None,
        tags=_tags(row["lv_tags"]),
        data_percent=_pct(row["data_percent"]),
        metadata_percent=_pct(row["metadata_percent"]),
    )


def parse_lvs(report_json: str) -> list[LogicalVolume]:
    """Parse ``lvm lvs --reportformat json --units b --nosuffix -o <_LV_FIELDS>``."""
    return [_lv(row) for row in _rows(report_json, "lv")]


def parse_vgs(report_json: str) -> list[VolumeGroup]:
    """Parse ``lvm vgs --reportformat json --units b --nosuffix -o <_VG_FIELDS>``."""
    return [
        VolumeGroup(
            vg=row["vg_name"],
            uuid=row["vg_uuid"],
            size=_int(row["vg_size"]),
            free=_int(row["vg_free"]),
            extent_size=_int(row["vg_extent_size"]),
            extent_count=_int(row["vg_extent_count"]),
            free_count=_int(row["vg_free_count"]),
            tags=_tags(row["vg_tags"]),
            lv_count=_int(row["lv_count"]),
            pv_count=_int(row["pv_count"]),
        )
        for row in _rows(report_json, "vg")
    ]


def _thin_pool_from(row: Mapping[str, Any]) -> ThinPool:
    return ThinPool(
        vg=row["vg_name"],
        name=row["lv_name"],
        size=_int(row["lv_size"]),
        metadata_size=_int(row["lv_metadata_size"]),
        data_percent=_pct(row["data_percent"]) or 0.0,
        metadata_percent=_pct(row["metadata_percent"]) or 0.0,
        tags=_tags(row["lv_tags"]),
    )


# ---------------------------------------------------------------- queries


def _lvm(*args: str, timeout: float = 120.0) -> str:
    return run(["lvm", *args], env=_ENV, timeout=timeout).stdout


def _vgs() -> list[VolumeGroup]:
    return parse_vgs(_lvm("vgs", *_REPORT, "-o", _VG_FIELDS))


def vg_info(vg: str) -> VolumeGroup:
    """The volume group's size and free space; FailedPrecondition if it does not exist.

    Lists all VGs and picks one, rather than parsing LVM's "not found"
    message: a missing VG is a node set-up problem, not a request error.
    """
    validate_vg_name(vg)
    for info in _vgs():
        if info.vg == vg:
            return info
    raise FailedPrecondition(f"LVM volume group {vg!r} does not exist on this node")


def _lvs_json(vg: str) -> str:
    validate_vg_name(vg)
    try:
        return _lvm("lvs", *_REPORT, "-o", _LV_FIELDS, vg)
    except CommandFailed:
        vg_info(vg)  # raises FailedPrecondition when the VG is what is missing
        raise


def report(vg: str) -> VgReport:
    """The LVs of ``vg`` as one ``lvs`` call sees them."""
    return VgReport.parse(vg, _lvs_json(vg))


def list_lvs(vg: str, tag: str | None = None) -> list[LogicalVolume]:
    """Visible LVs of ``vg`` (not LVM's hidden sub-volumes), optionally only those carrying ``tag``."""
    lvs = parse_lvs(_lvs_json(vg))
    if tag is not None:
        lvs = [lv for lv in lvs if tag in lv.tags]
    return lvs


def get_lv(vg: str, name: str) -> LogicalVolume | None:
    """The LV, or None if ``vg`` has no LV of that name."""
    _validate_lv_name(name)
    return report(vg).lv(name)


def _require_lv(vg: str, name: str) -> LogicalVolume:
    lv = get_lv(vg, name)
    if lv is None:
        raise NotFound(f"logical volume {vg}/{name} does not exist")
    return lv


def thin_pool(vg: str, pool: str) -> ThinPool:
    """Size and fill of a thin pool; NotFound if absent, FailedPrecondition if not a thin pool."""
    _validate_lv_name(pool)
    return report(vg).pool(pool)


# ---------------------------------------------------------------- changes


def _tag_args(tags: Iterable[str]) -> list[str]:
    args = []
    for tag in sorted(tags):
        args += ["--addtag", validate_tag(tag)]
    return args


def _positive(size: int) -> str:
    if size <= 0:
        raise InvalidArgument(f"size must be positive, got {size}")
    return f"{size}b"


def create_thin_pool(
    vg: str, name: str, size: int, *, metadata_size: int | None = None, tags: Iterable[str] = ()
) -> ThinPool:
    """Make a thin pool of ``size`` bytes (LVM rounds up to whole extents)."""
    validate_vg_name(vg)
    _validate_lv_name(name)
    args = ["lvcreate", "--yes", "--type", "thin-pool", "-L", _positive(size), "-n", name]
    if metadata_size is not None:
        args += ["--poolmetadatasize", _positive(metadata_size)]
    _lvm(*args, *_tag_args(tags), vg)
    return thin_pool(vg, name)


def create_thin_lv(vg: str, pool: str, name: str, size: int, tags: Iterable[str] = ()) -> LogicalVolume:
    """A thin LV of virtual ``size`` bytes (rounded up to extents) in ``pool``, active.

    ``--wipesignatures y``: a new LV may land on blocks that held an old
    filesystem; LVM would otherwise ask (and, with no terminal, fail).
    """
    validate_vg_name(vg)
    _validate_lv_name(pool)
    _validate_lv_name(name)
    _lvm(
        "lvcreate", "--yes", "--wipesignatures", "y", "--type", "thin", "--thinpool", pool,
        "-V", _positive(size), "-n", name, *_tag_args(tags), vg,
    )  # fmt: skip
    return _require_lv(vg, name)


def create_linear_lv(vg: str, name: str, size: int, tags: Iterable[str] = ()) -> LogicalVolume:
    """A fully allocated LV of ``size`` bytes (rounded up to extents), active, its start zeroed."""
    validate_vg_name(vg)
    _validate_lv_name(name)
    _lvm(
        "lvcreate", "--yes", "--wipesignatures", "y", "--zero", "y", "--type", "linear",
        "-L", _positive(size), "-n", name, *_tag_args(tags), vg,
    )  # fmt: skip
    return _require_lv(vg, name)


def thin_snapshot(
    vg: str, origin: str, name: str, tags: Iterable[str] = (), *, activate: bool = True
) -> LogicalVolume:
    """A thin snapshot of thin LV ``origin`` (`create_thin_snapshot`), as ``lvs`` reports it then."""
    create_thin_snapshot(vg, origin, name, tags, activate=activate)
    return _require_lv(vg, name)


def create_thin_snapshot(
    vg: str, origin: str, name: str, tags: Iterable[str] = (), *, activate: bool = True
) -> None:
    """Make a thin snapshot of thin LV ``origin``: the same size, sharing its blocks.

    LVM gives thin snapshots the activation-skip flag, so a plain ``-ay``
    (also at boot) leaves them inactive.  With ``activate`` the flag is
    cleared (``--setactivationskip n``) and the snapshot is activated now, so
    it behaves like any volume; without, it keeps the flag and stays
    inactive until `activate` (which uses ``-K``).
    """
    validate_vg_name(vg)
    _validate_lv_name(origin)
    _validate_lv_name(name)
    args = ["lvcreate", "--yes", "--snapshot", "-n", name, *_tag_args(tags)]
    if activate:
        args += ["--setactivationskip", "n", "--activate", "y"]
    else:
        args += ["--setactivationskip", "y", "--activate", "n"]
    _lvm(*args, f"{vg}/{origin}")


def remove_lv(vg: str, name: str, *, seen: bool = False) -> None:
    """Remove the LV; a missing LV is success (CSI deletes are idempotent).

    Rather than parse LVM's wording, a failed ``lvremove`` is followed by a
    look: if the LV is gone (removed concurrently, or never there), fine.
    An LV that is still open (mounted) stays and raises FailedPrecondition.
    ``seen``: the caller has just found the LV, so no look comes first.
    """
    validate_vg_name(vg)
    _validate_lv_name(name)
    if not seen and get_lv(vg, name) is None:
        return
    try:
        _lvm("lvremove", "--yes", f"{vg}/{name}")
    except CommandFailed as e:
        if get_lv(vg, name) is None:
            return
        if "in use" in e.stderr or "open" in e.stderr:
            raise FailedPrecondition(f"logical volume {vg}/{name} is in use: {e.message}") from e
        raise


def extend_lv(vg: str, name: str, size: int, *, current: LogicalVolume | None = None) -> LogicalVolume:
    """Grow the LV (thin, linear or a thin pool's data) to at least ``size`` bytes.

    Never shrinks: a ``size`` at or below the current one returns the LV as
    is, since LVM refuses "new size matches" and a shrink would destroy data.
    The filesystem on it is the caller's to grow.  ``current``: the LV as
    the caller has just seen it, so no look comes first.
    """
    lv = current or _require_lv(vg, name)
    if size <= lv.size:
        return lv
    _lvm("lvextend", "-L", _positive(size), f"{vg}/{name}")
    return _require_lv(vg, name)


def activate(vg: str, name: str) -> None:
    """Activate the LV, ignoring the activation-skip flag (``-K``) that thin snapshots carry."""
    validate_vg_name(vg)
    _validate_lv_name(name)
    _lvm("lvchange", "--activate", "y", "--ignoreactivationskip", f"{vg}/{name}")


def deactivate(vg: str, name: str) -> None:
    validate_vg_name(vg)
    _validate_lv_name(name)
    _lvm("lvchange", "--activate", "n", f"{vg}/{name}")


def set_read_ahead(vg: str, name: str, read_ahead: str) -> None:
    """Set the LV's read-ahead: ``auto``, ``none`` or a number of 512-byte sectors.

    Kept in the VG metadata and applied to an active LV at once (the device's
    queue changes; a filesystem on it may stay mounted).  Asking for the
    value the LV already has is success: lvchange exits 5 then, saying
    "Read ahead is already ..." (its messages are read in the C locale).
    """
    validate_vg_name(vg)
    _validate_lv_name(name)
    try:
        _lvm("lvchange", "--readahead", read_ahead, f"{vg}/{name}")
    except CommandFailed as e:
        if "Read ahead is already" not in e.stderr:
            raise


def add_tags(vg: str, name: str, tags: Sequence[str]) -> None:
    validate_vg_name(vg)
    _validate_lv_name(name)
    if tags:
        _lvm("lvchange", *_tag_args(tags), f"{vg}/{name}")


# ---------------------------------------------------------------- thin metadata (changed blocks)
#
# Where a thin volume's data lives is in its pool's metadata: a B-tree from
# each thin device's blocks to the pool's data blocks.  thin-provisioning-
# tools read it: ``thin_dump`` lists one device's mappings (its allocated
# blocks), ``thin_delta`` compares two devices' mappings (blocks mapped in
# one only, or to different data blocks: the changed ones).  They read a
# *metadata snapshot* of a live pool: ``dmsetup message <pool> 0
# reserve_metadata_snap`` commits the pool's metadata and keeps a frozen
# copy until ``release_metadata_snap``.  A pool has at most one, so
# `metadata_snapshot` serialises its users in this process.


@attrs.frozen
class ThinRanges:
    """Ranges of a thin device in units of the pool's data blocks (``block_bytes`` each)."""

    block_bytes: int
    ranges: tuple[tuple[int, int], ...]  # (first block, number of blocks), ascending


_DELTA_CHANGED = frozenset({"different", "left_only", "right_only"})
_pool_locks: dict[tuple[str, str], threading.Lock] = {}
_pool_locks_mutex = threading.Lock()


def _superblock_block_bytes(root: ET.Element) -> int:
    sectors = int(root.get("data_block_size", "0"))
    if sectors <= 0:
        raise ValueError("no data_block_size in the thin metadata's superblock")
    return sectors * 512


def _merged(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for begin, length in sorted(ranges):
        if length <= 0:
            continue
        if out and out[-1][0] + out[-1][1] >= begin:
            last_begin, last_length = out[-1]
            out[-1] = (last_begin, max(last_length, begin + length - last_begin))
        else:
            out.append((begin, length))
    return tuple(out)


def parse_thin_delta(xml: str) -> ThinRanges:
    """The changed blocks in ``thin_delta`` output: ``different``, ``left_only``
    (unmapped since: reads as zeros now) and ``right_only`` ranges, merged."""
    root = ET.fromstring(xml)
    found = [
        (int(el.get("begin", "0")), int(el.get("length", "0")))
        for el in root.iter()
        if el.tag in _DELTA_CHANGED
    ]
    return ThinRanges(_superblock_block_bytes(root), _merged(found))


def parse_thin_dump(xml: str, dev_id: int) -> ThinRanges:
    """The mapped blocks of device ``dev_id`` in ``thin_dump`` output."""
    root = ET.fromstring(xml)
    found: list[tuple[int, int]] = []
    for device in root.iter("device"):
        if int(device.get("dev_id", "-1")) != dev_id:
            continue
        for el in device:
            if el.tag == "range_mapping":
                found.append((int(el.get("origin_begin", "0")), int(el.get("length", "0"))))
            elif el.tag == "single_mapping":
                found.append((int(el.get("origin_block", "0")), 1))
    return ThinRanges(_superblock_block_bytes(root), _merged(found))


def thin_id(vg: str, name: str) -> int:
    """The thin device id of a thin LV in its pool's metadata."""
    validate_vg_name(vg)
    _validate_lv_name(name)
    rows = _rows(_lvm("lvs", *_REPORT, "-o", "lv_name,thin_id", f"{vg}/{name}"), "lv")
    value = rows[0].get("thin_id", "") if rows else ""
    if not value:
        raise FailedPrecondition(f"{vg}/{name} is not a thin volume")
    return int(value)


def _dm_target(name: str) -> str | None:
    """The first target type of device-mapper device ``name``, or None if there is none."""
    try:
        table = run(["dmsetup", "table", name]).stdout.split()
    except CommandFailed:
        return None
    return table[2] if len(table) > 2 else None


def _pool_device(vg: str, pool: str) -> str:
    """The device-mapper name of the pool's thin-pool target (``<vg>-<pool>-tpool``
    while thin volumes are active, ``<vg>-<pool>`` otherwise), activating it if need be."""
    base = f"{_dm_escape(vg)}-{_dm_escape(pool)}"
    for attempt in range(2):
        for name in (f"{base}-tpool", base):
            if _dm_target(name) == "thin-pool":
                return name
        if attempt == 0:
            _lvm("lvchange", "--activate", "y", f"{vg}/{pool}")
    raise FailedPrecondition(f"thin pool {vg}/{pool} has no active thin-pool device")


@contextlib.contextmanager
def metadata_snapshot(vg: str, pool: str) -> Iterator[str]:
    """Hold a metadata snapshot of the pool; yields the metadata device to read it from."""
    validate_vg_name(vg)
    _validate_lv_name(pool)
    with _pool_locks_mutex:
        lock = _pool_locks.setdefault((vg, pool), threading.Lock())
    with lock:
        device = _pool_device(vg, pool)
        try:
            run(["dmsetup", "message", device, "0", "reserve_metadata_snap"])
        except CommandFailed:
            # One left behind by a process that died holding it: release, then take ours.
            run(["dmsetup", "message", device, "0", "release_metadata_snap"])
            run(["dmsetup", "message", device, "0", "reserve_metadata_snap"])
        try:
            yield f"/dev/mapper/{_dm_escape(vg)}-{_dm_escape(pool)}_tmeta"
        finally:
            run(["dmsetup", "message", device, "0", "release_metadata_snap"])


def thin_delta(vg: str, pool: str, base_id: int, target_id: int, timeout: float = 600.0) -> ThinRanges:
    """Blocks whose mapping differs between two thin devices of one pool."""
    with metadata_snapshot(vg, pool) as tmeta:
        out = run(
            ["thin_delta", "-m", "--snap1", str(base_id), "--snap2", str(target_id), tmeta], timeout=timeout
        ).stdout
    return parse_thin_delta(out)


def thin_mappings(vg: str, pool: str, dev_id: int, timeout: float = 600.0) -> ThinRanges:
    """The blocks a thin device has mapped (its allocated data)."""
    with metadata_snapshot(vg, pool) as tmeta:
        out = run(["thin_dump", "-m", "--dev-id", str(dev_id), tmeta], timeout=timeout).stdout
    return parse_thin_dump(out, dev_id)
