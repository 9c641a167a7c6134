"""Parsing of real ``lvm`` JSON reports, and the CSI id <-> LV name mapping.

The reports below were recorded inside the VM harness (Debian 12 lvm2
2.03.16, kernel 6.1 cloud) with exactly the options `csi_kit.linux.lvm` uses:
a thin pool, a thin LV with tags and 20 MiB written, a linear LV, a thin
snapshot left with LVM's activation-skip flag and one activated without it.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_kit.errors import FailedPrecondition, InvalidArgument, NotFound
from csi_kit.linux import lvm

LVS_JSON = """\
  {
      "report": [
          {
              "lv": [
                  {"lv_name":"csi-v-pvc-1", "vg_name":"csikit-rec", "lv_uuid":"gPQ4GZ-Av0v-28GJ-uAAk-YO1h-4Dfj-OhSTVu", "lv_size":"104857600", "lv_attr":"Vwi-a-tz--", "segtype":"thin", "pool_lv":"pool", "origin":"", "lv_tags":"csi-kit.name=pvc_2F1,csi-kit.owner", "data_percent":"20.00", "metadata_percent":"", "lv_metadata_size":""},
                  {"lv_name":"lin", "vg_name":"csikit-rec", "lv_uuid":"Lqrz9V-eANU-G3M8-B9eb-bdM0-IaMZ-F2du9f", "lv_size":"67108864", "lv_attr":"-wi-a-----", "segtype":"linear", "pool_lv":"", "origin":"", "lv_tags":"", "data_percent":"", "metadata_percent":"", "lv_metadata_size":""},
                  {"lv_name":"pool", "vg_name":"csikit-rec", "lv_uuid":"BkOpfW-Nfzj-DAfM-34my-9TBd-zxQS-eifiGA", "lv_size":"1073741824", "lv_attr":"twi-aotz--", "segtype":"thin-pool", "pool_lv":"", "origin":"", "lv_tags":"csi-kit.pool", "data_percent":"1.95", "metadata_percent":"11.23", "lv_metadata_size":"4194304"},
                  {"lv_name":"snap-act", "vg_name":"csikit-rec", "lv_uuid":"BJLWV4-vQet-b5gR-pfIS-MNT2-zAbD-FIGGNy", "lv_size":"104857600", "lv_attr":"Vwi-a-tz--", "segtype":"thin", "pool_lv":"pool", "origin":"csi-v-pvc-1", "lv_tags":"csi-kit.owner", "data_percent":"20.00", "metadata_percent":"", "lv_metadata_size":""},
                  {"lv_name":"snap-skip", "vg_name":"csikit-rec", "lv_uuid":"8TJGZI-982c-M2t6-uyZk-3SWu-TQ2R-bXGbEy", "lv_size":"104857600", "lv_attr":"Vwi---tz-k", "segtype":"thin", "pool_lv":"pool", "origin":"csi-v-pvc-1", "lv_tags":"", "data_percent":"", "metadata_percent":"", "lv_metadata_size":""}
              ]
          }
      ]
  }
"""  # noqa: E501

VGS_JSON = """\
  {
      "report": [
          {
              "vg": [
                  {"vg_name":"csikit-rec", "vg_uuid":"eWxjoB-Hv79-eHvj-I7NC-2Wck-BOLY-Tdo0l1", "vg_size":"8585740288", "vg_free":"7436500992", "vg_extent_size":"4194304", "vg_extent_count":"2047", "vg_free_count":"1773", "vg_tags":"", "lv_count":"5", "pv_count":"1"}
              ]
          }
      ]
  }
"""  # noqa: E501

# `lvs` on a missing VG still prints a (empty) report on stdout and exits 5.
LVS_MISSING_VG_STDOUT = """\
  {
      "report": [
          {
              "lv": [
              ]
          }
      ]
  }
"""


def by_name() -> dict[str, lvm.LogicalVolume]:
    return {lv.name: lv for lv in lvm.parse_lvs(LVS_JSON)}


def test_thin_lv_fields() -> None:
    lv = by_name()["csi-v-pvc-1"]
    assert lv.vg == "csikit-rec"
    assert lv.uuid == "gPQ4GZ-Av0v-28GJ-uAAk-YO1h-4Dfj-OhSTVu"
    assert lv.size == 100 * 1024 * 1024
    assert lv.is_thin and not lv.is_thin_pool
    assert lv.pool == "pool"
    assert lv.origin is None
    assert lv.tags == frozenset({"csi-kit.name=pvc_2F1", "csi-kit.owner"})
    assert lv.data_percent == 20.0
    assert lv.metadata_percent is None
    assert lv.active and not lv.skips_activation
    assert lv.device_path == "/dev/mapper/csikit--rec-csi--v--pvc--1"


def test_linear_lv_has_no_pool_origin_or_percentages() -> None:
    lv = by_name()["lin"]
    assert lv.segtype == "linear"
    assert (lv.pool, lv.origin, lv.data_percent, lv.metadata_percent) == (None, None, None, None)
    assert lv.tags == frozenset()
    assert lv.size == 64 << 20


def test_snapshots_origin_and_activation_skip_flag() -> None:
    lvs = by_name()
    skip, act = lvs["snap-skip"], lvs["snap-act"]
    assert skip.origin == act.origin == "csi-v-pvc-1"
    assert skip.skips_activation and not skip.active
    assert skip.data_percent is None  # inactive thin LVs report no fill
    assert act.active and not act.skips_activation


def test_thin_pool_figures() -> None:
    rows = lvm._rows(LVS_JSON, "lv")
    pool = lvm._thin_pool_from(next(r for r in rows if r["lv_name"] == "pool"))
    assert pool.size == 1 << 30
    assert pool.metadata_size == 4 << 20
    assert (pool.data_percent, pool.metadata_percent) == (1.95, 11.23)
    assert pool.used_bytes == int((1 << 30) * 0.0195)
    assert pool.tags == frozenset({"csi-kit.pool"})


def test_vgs() -> None:
    (vg,) = lvm.parse_vgs(VGS_JSON)
    assert vg.vg == "csikit-rec"
    assert vg.size == 8585740288 and vg.free == 7436500992
    assert vg.extent_size == 4 << 20
    assert vg.extent_count * vg.extent_size == vg.size
    assert vg.free_count * vg.extent_size == vg.free
    assert (vg.lv_count, vg.pv_count) == (5, 1)


def test_empty_report_and_garbage() -> None:
    assert lvm.parse_lvs(LVS_MISSING_VG_STDOUT) == []
    with pytest.raises(ValueError, match="not JSON"):
        lvm.parse_lvs('  Volume group "x" not found\n')


@pytest.mark.parametrize(
    ("csi_id", "name"),
    [
        ("pvc-1", "csi-v-pvc-1"),
        ("pvc/1", "csi-v-pvc_2F1"),
        ("a_b", "csi-v-a_5Fb"),
        ("x y", "csi-v-x_20y"),
        ("é", "csi-v-_C3_A9"),
        ("_tdata", "csi-v-_5Ftdata"),
    ],
)
def test_name_mapping_examples(csi_id: str, name: str) -> None:
    assert lvm.lv_name_for(csi_id, "csi-v-", "vg0") == name
    assert lvm.csi_id_from_lv_name(name, "csi-v-") == csi_id


@given(st.text(min_size=1, max_size=8))  # 8 chars of 4 UTF-8 bytes, escaped, still fit
def test_name_mapping_roundtrips_and_obeys_lvm_rules(csi_id: str) -> None:
    name = lvm.lv_name_for(csi_id, "csi-v-", "vg0")
    assert lvm.csi_id_from_lv_name(name, "csi-v-") == csi_id
    assert all(c.isascii() and (c.isalnum() or c in "+_.-") for c in name)
    assert not any(part in name for part in lvm._RESERVED_PARTS)


def test_names_that_are_not_ours_map_to_none() -> None:
    for name in ("pool", "csi-s-x", "csi-v-", "csi-v-_zz", "csi-v-_41", "csi-v-_C3", "csi-v-a_2"):
        assert lvm.csi_id_from_lv_name(name, "csi-v-") is None, name


def test_too_long_for_device_mapper() -> None:
    fits = 127 - len("vg0-") - len("csi--v--")
    assert lvm.lv_name_for("a" * fits, "csi-v-", "vg0")
    with pytest.raises(InvalidArgument, match="too long"):
        lvm.lv_name_for("a" * (fits + 1), "csi-v-", "vg0")
    with pytest.raises(InvalidArgument, match="too long"):
        lvm.lv_name_for("-" * 60, "csi-v-", "vg0")  # hyphens count twice in the dm name


def test_validation() -> None:
    for bad in ("-vg", "a b", "", ".", "ä"):
        with pytest.raises(InvalidArgument):
            lvm.validate_vg_name(bad)
    for bad_tag in ("-x", "a b", "", "a,b"):
        with pytest.raises(InvalidArgument):
            lvm.validate_tag(bad_tag)
    assert lvm.validate_tag("csi-kit.name=pvc_2F1") == "csi-kit.name=pvc_2F1"
    with pytest.raises(ValueError):
        lvm.lv_name_for("x", "csi_v_", "vg0")
    for reserved in ("snapshot1", "pvmove0", "a_tdata", "x_rimage_0"):
        with pytest.raises(InvalidArgument):
            lvm.get_lv("vg0", reserved)  # rejected before any lvm call


def test_one_report_answers_every_question_of_an_operation() -> None:
    report = lvm.VgReport.parse("csikit-rec", LVS_JSON)
    vol = report.lv("csi-v-pvc-1")
    assert vol is not None and vol.is_thin and vol.pool == "pool" and "csi-kit.owner" in vol.tags
    assert report.lv("nosuch") is None
    pool = report.pool("pool")
    assert pool.size == 1073741824 and pool.data_percent == 1.95 and pool.metadata_percent == 11.23
    with pytest.raises(FailedPrecondition, match="linear LV, not a thin pool"):
        report.pool("lin")
    with pytest.raises(NotFound, match="does not exist"):
        report.pool("nosuch")
    assert lvm.VgReport.parse("csikit-rec", LVS_MISSING_VG_STDOUT).rows == {}
