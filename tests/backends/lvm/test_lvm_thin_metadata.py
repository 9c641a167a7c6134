"""Parsing thin-provisioning-tools' XML (thin_delta, thin_dump) and turning
pool blocks into byte ranges, without LVM: the real tools run in tests/backends/lvm."""

from __future__ import annotations

import pytest

from csi_kit.linux import lvm
from csi_kit_backends.lvm.backend import LvmBackend

DELTA = """<superblock uuid="" time="2" transaction="3" data_block_size="128" nr_data_blocks="0">
  <diff left="2" right="3">
    <same begin="0" length="80"/>
    <left_only begin="80" length="16"/>
    <same begin="96" length="4"/>
    <different begin="100" length="3"/>
    <right_only begin="103" length="2"/>
    <same begin="105" length="215"/>
    <right_only begin="800" length="32"/>
  </diff>
</superblock>
"""

DUMP = """<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="16384">
  <device dev_id="1" mapped_blocks="5" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
    <single_mapping origin_block="3" data_block="9" time="1"/>
    <single_mapping origin_block="10" data_block="12" time="1"/>
  </device>
  <device dev_id="2" mapped_blocks="1" transaction="1" creation_time="1" snap_time="1">
    <single_mapping origin_block="500" data_block="13" time="1"/>
  </device>
</superblock>
"""


def test_delta_keeps_every_kind_of_change_merged() -> None:
    found = lvm.parse_thin_delta(DELTA)
    assert found.block_bytes == 64 * 1024
    # left_only (discarded since) counts: it reads differently now.  Adjacent kinds merge.
    assert found.ranges == ((80, 16), (100, 5), (800, 32))


def test_delta_with_nothing_changed() -> None:
    xml = '<superblock data_block_size="128"><diff left="1" right="2"><same begin="0" length="9"/></diff>'
    xml += "</superblock>"
    assert lvm.parse_thin_delta(xml).ranges == ()


def test_dump_maps_one_device_merged() -> None:
    one = lvm.parse_thin_dump(DUMP, 1)
    assert one.ranges == ((0, 4), (10, 1))
    assert lvm.parse_thin_dump(DUMP, 2).ranges == ((500, 1),)
    assert lvm.parse_thin_dump(DUMP, 7).ranges == ()


def test_superblock_without_block_size_is_refused() -> None:
    with pytest.raises(ValueError, match="data_block_size"):
        lvm.parse_thin_delta("<superblock><diff/></superblock>")


def test_byte_ranges_are_cut_at_the_snapshot_size() -> None:
    found = lvm.ThinRanges(64 * 1024, ((0, 2), (15, 4)))
    out = list(LvmBackend._byte_ranges(lambda: found, 16 * 64 * 1024))
    assert [(r.offset, r.length) for r in out] == [(0, 128 * 1024), (15 * 64 * 1024, 64 * 1024)]


def test_thin_tools_run_only_when_the_answer_is_read() -> None:
    calls: list[int] = []

    def read() -> lvm.ThinRanges:
        calls.append(1)
        return lvm.ThinRanges(4096, ())

    ranges = LvmBackend._byte_ranges(read, 1 << 20)
    assert calls == []
    assert list(ranges) == [] and calls == [1]
