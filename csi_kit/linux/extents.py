"""Where a file holds data, and where two files differ: for changed-block tracking.

Two questions about image files, answered without reading data where the
filesystem can tell:

* `data_ranges` -- which byte ranges of a file hold data, from
  ``lseek(SEEK_DATA / SEEK_HOLE)``.  Holes, and on most filesystems
  unwritten (preallocated) extents, are not data: they read as zeros.
* `changed_ranges` -- which byte ranges differ between two files.  Two files
  made from each other by reflink (FICLONE) share physical extents; the
  FS_IOC_FIEMAP ioctl maps each file's logical ranges to physical ones, and
  a range mapped to the same physical blocks in both files holds the same
  bytes.  So, when the pair shares any extent, ranges whose mappings differ
  are reported as changed without reading them (a range rewritten with the
  same bytes counts as changed: a superset is allowed, a missed change is
  not, and shared blocks are never written in place).  When the pair shares
  nothing (an ext4 root without reflinks, a copy made without FICLONE,
  a filesystem without FIEMAP), the data of both files is compared block by
  block, reading only ranges where one of them holds data.

Every range is aligned outward to the caller's block size and adjacent ranges
are merged, so the answers are in ascending order and never overlap.  Both
functions are generators that read as they go: a caller may stop early.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from csi_kit.errors import Internal

__all__ = ["Extent", "fiemap", "data_ranges", "changed_ranges", "align_ranges", "shares_extents"]

#: _IOWR('f', 11, struct fiemap)
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000
#: Flags after which an extent's physical address says nothing we can compare:
#: UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE, DATA_TAIL.
_OPAQUE = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400

_HEADER = struct.Struct(
    "=QQIIII"
)  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, reserved64[2], flags, reserved[3]
_BATCH = 2048  # extents per ioctl (112 KiB of buffer)
_READ = 1 << 20  # bytes per read when comparing content

#: errno values meaning "this filesystem cannot map extents".
_NO_FIEMAP = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EINVAL})


class Extent(NamedTuple):
    """One FIEMAP extent: ``length`` bytes at ``logical`` stored at ``physical``."""

    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length

    @property
    def zeros(self) -> bool:
        """Reads as zeros (an unwritten extent)."""
        return bool(self.flags & FIEMAP_EXTENT_UNWRITTEN)

    @property
    def comparable(self) -> bool:
        return not self.flags & _OPAQUE


def fiemap(fd: int, start: int, end: int, *, sync: bool = True) -> Iterator[Extent]:
    """The extents of the open file ``fd`` that overlap [start, end), in order.

    ``sync`` flushes the file's dirty data first, so that delayed
    allocations have physical addresses.  Raises OSError (EOPNOTSUPP and the
    like) where the filesystem has no FIEMAP.
    """
    pos = start
    flags = FIEMAP_FLAG_SYNC if sync else 0
    while pos < end:
        buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
        _HEADER.pack_into(buf, 0, pos, end - pos, flags, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        flags = 0  # one sync is enough
        mapped = _HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            return
        last = None
        body = memoryview(buf)[_HEADER.size : _HEADER.size + mapped * _EXTENT.size]
        for logical, physical, length, _r1, _r2, eflags, _a, _b, _c in _EXTENT.iter_unpack(body):
            last = Extent(logical, physical, length, eflags)
            if logical + length > pos:
                yield last
        if last is None or last.flags & FIEMAP_EXTENT_LAST or last.end <= pos:
            return
        pos = last.end


def data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of every data range of ``fd`` overlapping [start, end)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


def align_ranges(ranges: Iterable[tuple[int, int]], block: int, limit: int) -> Iterator[tuple[int, int]]:
    """Ranges widened to whole ``block``s (cut at ``limit``), adjacent ones merged.

    The input must be in ascending order of offset; the output is too, with no
    two ranges touching.
    """
    cur_start = cur_end = -1
    for offset, length in ranges:
        lo = offset - offset % block
        hi = min(-(-(offset + length) // block) * block, limit)
        if hi <= lo:
            continue
        if cur_end >= lo:
            cur_end = max(cur_end, hi)
            continue
        if cur_end > cur_start:
            yield cur_start, cur_end - cur_start
        cur_start, cur_end = lo, hi
    if cur_end > cur_start:
        yield cur_start, cur_end - cur_start


class _Piece(NamedTuple):
    lo: int
    hi: int
    a: Extent | None
    b: Extent | None


def _covering(extents: Iterator[Extent]) -> Iterator[Extent | None]:
    """Helper state for `_pieces`: the next extent, or None when there are no more."""
    yield from extents
    while True:
        yield None


def _pieces(a: Iterator[Extent], b: Iterator[Extent], start: int, end: int) -> Iterator[_Piece]:
    """[start, end) cut where either file's mapping changes; each piece names the
    extent covering it in each file (None: a hole)."""
    next_a, next_b = _covering(a), _covering(b)
    ea, eb = next(next_a), next(next_b)
    pos = start
    while pos < end:
        while ea is not None and ea.end <= pos:
            ea = next(next_a)
        while eb is not None and eb.end <= pos:
            eb = next(next_b)
        hi = end
        cov_a = cov_b = None
        for e in (ea, eb):
            if e is None:
                continue
            hi = min(hi, e.end if e.logical <= pos else e.logical)
        if ea is not None and ea.logical <= pos:
            cov_a = ea
        if eb is not None and eb.logical <= pos:
            cov_b = eb
        yield _Piece(pos, hi, cov_a, cov_b)
        pos = hi


def _zeros(e: Extent | None) -> bool:
    return e is None or e.zeros


def _same(p: _Piece) -> bool:
    """The piece holds the same bytes in both files, by their mappings alone."""
    if _zeros(p.a) and _zeros(p.b):
        return True
    a, b = p.a, p.b
    if a is None or b is None or a.zeros or b.zeros or not (a.comparable and b.comparable):
        return False
    return a.physical - a.logical == b.physical - b.logical


def shares_extents(base_fd: int, target_fd: int, start: int, end: int) -> bool:
    """Whether the two files share at least one physical data extent in [start, end)."""
    for p in _pieces(fiemap(base_fd, start, end), fiemap(target_fd, start, end), start, end):
        if p.a is not None and p.b is not None and not (p.a.zeros or p.b.zeros) and _same(p):
            return True
    return False


def _differing_blocks(
    base_fd: int, target_fd: int, lo: int, hi: int, block: int
) -> Iterator[tuple[int, int]]:
    """Blocks of [lo, hi) whose bytes differ (read from both files; past EOF reads as zeros)."""
    pos = lo - lo % block
    while pos < hi:
        n = min(_READ, -(-(hi - pos) // block) * block)
        a = os.pread(base_fd, n, pos)
        b = os.pread(target_fd, n, pos)
        if len(a) < n:
            a = a.ljust(n, b"\0")
        if len(b) < n:
            b = b.ljust(n, b"\0")
        if a != b:
            va, vb = memoryview(a), memoryview(b)
            for off in range(0, n, block):
                if va[off : off + block] != vb[off : off + block]:
                    yield pos + off, block
        pos += n


def _union(a: Iterator[tuple[int, int]], b: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Two ascending range lists merged into one ascending list (overlaps allowed)."""
    pending_a, pending_b = next(a, None), next(b, None)
    while pending_a is not None or pending_b is not None:
        if pending_b is None or (pending_a is not None and pending_a[0] <= pending_b[0]):
            assert pending_a is not None
            yield pending_a
            pending_a = next(a, None)
        else:
            yield pending_b
            pending_b = next(b, None)


def _by_content(base_fd: int, target_fd: int, start: int, end: int, block: int) -> Iterator[tuple[int, int]]:
    regions = align_ranges(
        _union(data_ranges(base_fd, start, end), data_ranges(target_fd, start, end)), block, end
    )
    for lo, length in regions:
        yield from _differing_blocks(base_fd, target_fd, lo, lo + length, block)


def _by_extents(base_fd: int, target_fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    for p in _pieces(fiemap(base_fd, start, end), fiemap(target_fd, start, end), start, end):
        if not _same(p):
            yield p.lo, p.hi - p.lo


def changed_ranges(
    base_fd: int, target_fd: int, start: int, end: int, block: int, *, by_content: bool | None = None
) -> Iterator[tuple[int, int]]:
    """Ranges of [start, end) whose bytes may differ between the two files,
    aligned to ``block`` and merged.

    ``by_content`` None chooses: by extents when the files share an extent,
    by content otherwise (and where the filesystem has no FIEMAP); True or
    False forces one way.
    """
    start -= start % block
    if by_content is None:
        try:
            by_content = not shares_extents(base_fd, target_fd, start, end)
        except OSError as e:
            if e.errno not in _NO_FIEMAP:
                raise Internal(f"FIEMAP failed: {os.strerror(e.errno or 0)}") from e
            by_content = True
    if by_content:
        yield from align_ranges(_by_content(base_fd, target_fd, start, end, block), block, end)
    else:
        yield from align_ranges(_by_extents(base_fd, target_fd, start, end), block, end)
