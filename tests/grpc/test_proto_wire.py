"""proto/csi.proto must be wire-identical to the published CSI v1.12.0 schema.

Both files are compiled with protoc (from the pinned grpcio-tools) and their
descriptors compared one by one: every message, field (name, number, type,
label, type name, oneof, options such as csi_secret / alpha_field), enum and
value, service and method, and extension.  The file name and source info are
the only things allowed to differ.  Skips when ../shared/spec/csi.proto is absent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from google.protobuf import descriptor_pb2

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OURS = os.path.join(REPO, "proto", "csi.proto")
SPEC = os.path.join(os.path.dirname(REPO), "shared", "spec", "csi.proto")


def _compile(path: str) -> descriptor_pb2.FileDescriptorProto:
    import grpc_tools
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, os.path.join(tmp, "csi.proto"))
        out = os.path.join(tmp, "set.pb")
        rc = protoc.main(["protoc", f"-I{tmp}", f"-I{include}", f"--descriptor_set_out={out}", "csi.proto"])
        assert rc == 0, f"protoc failed on {path}"
        fds = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as f:
            fds.ParseFromString(f.read())
    (file,) = fds.file
    file.ClearField("source_code_info")
    return file


@pytest.fixture(scope="module")
def pair() -> tuple[descriptor_pb2.FileDescriptorProto, descriptor_pb2.FileDescriptorProto]:
    if not os.path.exists(SPEC):
        pytest.skip(f"the published schema is not present at {SPEC}")
    return _compile(OURS), _compile(SPEC)


def _messages(
    prefix: str, msgs: Iterator[descriptor_pb2.DescriptorProto] | list[descriptor_pb2.DescriptorProto]
) -> dict[str, descriptor_pb2.DescriptorProto]:
    out = {}
    for m in msgs:
        name = f"{prefix}.{m.name}"
        out[name] = m
        out.update(_messages(name, list(m.nested_type)))
    return out


def _enums(file: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.EnumDescriptorProto]:
    out = {f".{e.name}": e for e in file.enum_type}
    for name, m in _messages("", list(file.message_type)).items():
        for e in m.enum_type:
            out[f"{name}.{e.name}"] = e
    return out


def test_file_level_facts(pair):
    ours, spec = pair
    assert ours.package == spec.package == "csi.v1"
    assert ours.syntax == spec.syntax
    assert sorted(ours.dependency) == sorted(spec.dependency)
    assert ours.options == spec.options


def test_every_message_and_field(pair):
    ours, spec = pair
    a, b = _messages("", list(ours.message_type)), _messages("", list(spec.message_type))
    assert sorted(a) == sorted(b), "message sets differ"
    assert len(a) > 100
    for name in b:
        mine, theirs = descriptor_pb2.DescriptorProto(), descriptor_pb2.DescriptorProto()
        mine.CopyFrom(a[name])
        theirs.CopyFrom(b[name])
        # nested types are compared on their own entries
        for m in (mine, theirs):
            m.ClearField("nested_type")
            m.ClearField("enum_type")
        assert mine == theirs, f"message {name} differs on the wire"


def test_every_enum_and_value(pair):
    ours, spec = pair
    a, b = _enums(ours), _enums(spec)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name] == b[name], f"enum {name} differs"


def test_every_service_and_method(pair):
    ours, spec = pair
    assert [s.name for s in ours.service] == [s.name for s in spec.service]
    for mine, theirs in zip(ours.service, spec.service, strict=True):
        assert mine == theirs, f"service {theirs.name} differs"


def test_extensions(pair):
    ours, spec = pair
    assert list(ours.extension) == list(spec.extension)


def test_whole_file_identical_but_for_name(pair):
    ours, spec = pair
    a, b = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    a.CopyFrom(ours)
    b.CopyFrom(spec)
    a.ClearField("name")
    b.ClearField("name")
    assert a == b


def test_generated_module_is_built_from_our_schema():
    from csi_kit._pb import csi_pb2

    generated = descriptor_pb2.FileDescriptorProto()
    csi_pb2.DESCRIPTOR.CopyToProto(generated)
    ours = _compile(OURS)
    for f in (generated, ours):
        f.ClearField("name")
        _strip_json_names(f)
    assert generated == ours


def _strip_json_names(file: descriptor_pb2.FileDescriptorProto) -> None:
    """json_name is derived data that CopyToProto leaves out; it is not a wire fact."""
    for msg in _messages("", list(file.message_type)).values():
        for field in msg.field:
            field.ClearField("json_name")
    for ext in file.extension:
        ext.ClearField("json_name")


def test_secret_fields_are_marked():
    from csi_kit._grpc.redact import is_secret
    from csi_kit._pb import csi_pb2

    req = csi_pb2.CreateVolumeRequest.DESCRIPTOR
    assert is_secret(req.fields_by_name["secrets"])
    assert not is_secret(req.fields_by_name["name"])
