"""csi_kit.linux.extents on whatever filesystem holds the temporary directory,
plus the extent-comparison logic on made-up FIEMAP extents (no filesystem)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_kit.linux import extents
from csi_kit.linux.extents import Extent

KiB = 1024
MiB = 1024 * KiB
UNWRITTEN = extents.FIEMAP_EXTENT_UNWRITTEN


def _file(path: Path, size: int, writes: list[tuple[int, bytes]]) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    for offset, data in writes:
        os.pwrite(fd, data, offset)
    os.fsync(fd)
    return fd


@pytest.fixture
def fds(tmp_path: Path) -> Iterator[list[int]]:
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], []),
        ([(1, 1)], [(0, 4096)]),
        ([(0, 4096), (4096, 10)], [(0, 8192)]),  # touching after widening: merged
        ([(0, 10), (5000, 10), (20000, 1)], [(0, 8192), (16384, 4096)]),
        ([(0, 4096), (100, 8000)], [(0, 8192)]),  # overlapping input
        ([(32766, 100)], [(28672, 4096)]),  # cut at the limit
        ([(32768, 100)], []),  # wholly past the limit
    ],
)
def test_align_ranges(given: list[tuple[int, int]], expected: list[tuple[int, int]]) -> None:
    assert list(extents.align_ranges(iter(given), 4096, 32768)) == expected


def test_pieces_cut_where_either_mapping_changes() -> None:
    a = iter([Extent(0, 1000 * MiB, 8 * KiB, 0), Extent(16 * KiB, 2000 * MiB, 4 * KiB, 0)])
    b = iter([Extent(4 * KiB, 1000 * MiB + 4 * KiB, 8 * KiB, 0)])
    pieces = [(p.lo, p.hi, p.a is not None, p.b is not None) for p in extents._pieces(a, b, 0, 24 * KiB)]
    assert pieces == [
        (0, 4 * KiB, True, False),
        (4 * KiB, 8 * KiB, True, True),
        (8 * KiB, 12 * KiB, False, True),
        (12 * KiB, 16 * KiB, False, False),
        (16 * KiB, 20 * KiB, True, False),
        (20 * KiB, 24 * KiB, False, False),
    ]


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (None, None, True),
        (Extent(0, 0, 4096, UNWRITTEN), None, True),  # unwritten reads as zeros
        (Extent(0, 8192, 4096, 0), None, False),
        (Extent(0, 8192, 4096, 0), Extent(0, 8192, 4096, 0), True),
        (Extent(0, 8192, 8192, 0), Extent(4096, 12288, 4096, 0), True),  # same block, different cuts
        (Extent(0, 8192, 4096, 0), Extent(0, 12288, 4096, 0), False),
        (Extent(0, 8192, 4096, 0x4), Extent(0, 8192, 4096, 0x4), False),  # delalloc: no address to trust
    ],
)
def test_same_by_mapping(a: Extent | None, b: Extent | None, same: bool) -> None:
    lo = max(e.logical for e in (a, b) if e is not None) if a or b else 0
    assert extents._same(extents._Piece(lo, lo + 4096, a, b)) is same


def test_data_ranges_cover_the_writes(tmp_path: Path, fds: list[int]) -> None:
    fd = _file(tmp_path / "f", 8 * MiB, [(0, b"x" * 4096), (3 * MiB, b"y" * 8192)])
    fds.append(fd)
    found = list(extents.align_ranges(extents.data_ranges(fd, 0, 8 * MiB), 4096, 8 * MiB))
    for offset, size in ((0, 4096), (3 * MiB, 8192)):
        assert any(o <= offset and offset + size <= o + n for o, n in found), found
    # From an offset past the data: nothing (or, without SEEK_DATA support, the tail).
    assert all(o + n > 4 * MiB for o, n in extents.data_ranges(fd, 4 * MiB, 8 * MiB))


def test_changed_by_content_is_exact(tmp_path: Path, fds: list[int]) -> None:
    base = _file(tmp_path / "a", 4 * MiB, [(0, b"a" * 64 * KiB), (2 * MiB, b"a" * 4096)])
    target = _file(
        tmp_path / "b",
        6 * MiB,  # grown: past the base's end counts as zeros there
        [(0, b"a" * 64 * KiB), (8 * KiB, b"b" * 100), (2 * MiB, b"a" * 4096), (5 * MiB, b"c" * 4096)],
    )
    fds += [base, target]
    found = list(extents.changed_ranges(base, target, 0, 6 * MiB, 4096, by_content=True))
    assert found == [(8 * KiB, 4096), (5 * MiB, 4096)]
    # The choice on its own: copies share no extent, so the answer is the same.
    assert list(extents.changed_ranges(base, target, 0, 6 * MiB, 4096)) == found
    # From an offset: from the block holding it.
    assert list(extents.changed_ranges(base, target, 9 * KiB, 6 * MiB, 4096)) == found


def test_a_caller_may_stop_early(tmp_path: Path, fds: list[int]) -> None:
    base = _file(tmp_path / "a", 4 * MiB, [])
    target = _file(tmp_path / "b", 4 * MiB, [(i * 64 * KiB, b"z") for i in range(32)])
    fds += [base, target]
    gen = extents.changed_ranges(base, target, 0, 4 * MiB, 4096)
    assert next(gen) == (0, 4096)
    gen.close()
