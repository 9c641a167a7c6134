"""The text log escapes control characters in the message and every field, so
a caller-chosen name cannot forge a record, hide in a NUL or repaint a
terminal (issue #11, finding 8).  JSON escapes by itself."""

from __future__ import annotations

import json
import logging
import re
import sys

import grpc
import pytest
from helpers import Csi, create_req, expect, short_dir

from csi_kit._pb import csi_pb2 as pb
from csi_kit.log import JsonFormatter, TextFormatter, escape_text
from csi_kit.testing.driver import driver_process

#: Every record of the text log starts with its timestamp; anything else at
#: the start of a line would be a forged or broken record.
RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
HOSTILE = "vol\nFAKE ERROR line\r\x1b[2J\x00\x85\u2028end"


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("csi_kit.rpc", logging.WARNING, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def _raw_controls(text: str) -> list[str]:
    return [ch for ch in text if ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or ch in "\u2028\u2029"]


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("a\nb", "a\\nb"),
        ("a\rb", "a\\rb"),
        ("a\tb", "a\\tb"),
        ("a\x00b", "a\\x00b"),
        ("a\x1b[31mb", "a\\x1b[31mb"),
        ("a\x7fb", "a\\x7fb"),
        ("a\x85b", "a\\x85b"),
        ("a\u2028b", "a\\u2028b"),
        ("plain ünïcode", "plain ünïcode"),
    ],
)
def test_escape_text(raw: str, escaped: str) -> None:
    assert escape_text(raw) == escaped


def test_message_and_every_field_are_escaped_onto_one_line() -> None:
    line = TextFormatter().format(
        _record("CreateVolume %s", HOSTILE, object_name=HOSTILE, error=f"name {HOSTILE!s} is bad")
    )
    assert _raw_controls(line) == []
    assert "\n" not in line
    assert "vol\\nFAKE ERROR line\\r\\x1b[2J\\x00\\x85\\u2028end" in line
    assert line.count("FAKE ERROR line") == 3


def test_a_value_cannot_forge_a_field() -> None:
    line = TextFormatter().format(_record("CreateVolume OK", object_name="x status=OK", volume_id="v1"))
    assert 'object_name="x status=OK"' in line
    assert " volume_id=v1" in line
    quoted = TextFormatter().format(_record("m", error='say "hi"'))
    assert 'error="say \\"hi\\""' in quoted


def test_a_traceback_keeps_its_lines_but_none_can_pass_for_a_record() -> None:
    try:
        raise ValueError("boom\n2026-01-01 00:00:00,000 ERROR csi_kit.rpc: forged\x00")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = TextFormatter().format(record)
    first, *rest = text.split("\n")
    assert RECORD_START.match(first)
    assert rest and all(line.startswith("    ") for line in rest)
    assert "Traceback" in rest[0]
    assert "\x00" not in text and "forged\\x00" in text


def test_an_exc_text_cached_by_another_formatter_is_escaped_too() -> None:
    try:
        raise ValueError("one\ntwo")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    logging.Formatter().format(record)  # caches record.exc_text, unindented
    assert record.exc_text
    text = TextFormatter().format(record)
    assert all(line.startswith("    ") for line in text.split("\n")[1:])


def test_json_keeps_the_value_and_escapes_it() -> None:
    line = JsonFormatter().format(_record("CreateVolume %s", "OK", object_name=HOSTILE))
    assert "\n" not in line and "\x00" not in line
    assert json.loads(line)["object_name"] == HOSTILE


def test_hostile_names_in_the_driver_process_log() -> None:
    """A name with a newline is legal (the spec bans other controls only) and
    is logged escaped; a NUL name is rejected and its rejection is logged
    escaped too.  No line of the real log starts with forged text."""
    newline_name = "vol\nFAKE ERROR line"
    with short_dir() as state:
        with driver_process(state) as proc:
            with Csi(proc.endpoint) as csi:
                made = csi.controller.CreateVolume(create_req(newline_name), timeout=30).volume
                expect(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    csi.controller.CreateVolume,
                    create_req("nul\x00FAKE"),
                    "NUL",
                )
                csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=made.volume_id), timeout=30)
            assert proc.stop() == 0
        with open(proc.log_path, "rb") as f:
            data = f.read()
    assert b"\x00" not in data
    text = data.decode()
    lines = text.splitlines()
    # A record, a traceback line, or the banner `csi-kit serve` prints itself.
    assert all(RECORD_START.match(line) or line.startswith(("    ", "csi-kit: ")) for line in lines), text
    created = [line for line in lines if "CreateVolume OK" in line]
    assert len(created) == 1 and 'object_name="vol\\nFAKE ERROR line"' in created[0]
    rejected = [line for line in lines if "CreateVolume INVALID_ARGUMENT" in line]
    assert len(rejected) == 1 and "object_name=nul\\x00FAKE" in rejected[0]
    assert not [line for line in lines if line.startswith("FAKE")]
