"""README's "Writing a backend" example, run exactly as printed: it joins ids
into paths and bind-mounts them, which is safe only because no malformed id
reaches it (issue #11, finding 7: this backend bind-mounted `..`, `/` and an
absolute path).  Mount calls are recorded instead of made, so nothing here
touches the machine's mounts."""

from __future__ import annotations

import os
import re
import types
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from helpers import Csi, expect, mount_cap, short_dir

from csi_kit._pb import csi_pb2 as pb
from csi_kit.backend import Backend, BackendContext
from csi_kit.linux import mounts
from csi_kit.testing.driver import running_driver

README = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))), "README.md"
)
HOSTILE = ["..", ".", "/", "/etc", "../../etc", "a/b", "x\nb", "x" * 129]


def readme_example() -> types.ModuleType:
    with open(README) as f:
        text = f.read()
    section = text[text.index("## Writing a backend") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "no python block in README's 'Writing a backend'"
    module = types.ModuleType("readme_backend")
    exec(compile(code.group(1), README, "exec"), module.__dict__)
    return module


class Env:
    def __init__(self, csi: Csi, backend: Any, paths: str, calls: list[tuple[str, tuple[Any, ...]]]) -> None:
        self.csi, self.backend, self.paths, self.calls = csi, backend, paths, calls


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    calls: list[tuple[str, tuple[Any, ...]]] = []
    monkeypatch.setattr(mounts, "bind_mount", lambda *a, **kw: calls.append(("bind_mount", a)))
    monkeypatch.setattr(mounts, "unmount", lambda *a, **kw: calls.append(("unmount", a)))
    example = readme_example()
    assert issubclass(example.MyBackend, Backend)
    with short_dir() as state, short_dir() as paths:
        backend = example.MyBackend(None, BackendContext("mine.csi-kit.io", "node-1", state))
        with running_driver(state, backend_object=backend) as ep, Csi(ep) as csi:
            yield Env(csi, backend, paths, calls)


def test_the_example_serves_volumes(env: Env) -> None:
    vol = env.csi.create("readme-vol")
    assert os.path.isdir(os.path.join(env.backend.root, vol.volume_id))
    assert list(env.backend.protected_paths()) == [env.backend.root]
    env.csi.delete(vol.volume_id)
    assert not os.path.exists(os.path.join(env.backend.root, vol.volume_id))


@pytest.mark.parametrize("bad", HOSTILE)
def test_the_example_never_sees_a_malformed_id(env: Env, bad: str) -> None:
    target = os.path.join(env.paths, "target")
    publish = pb.NodePublishVolumeRequest(volume_id=bad, target_path=target, volume_capability=mount_cap())
    unpublish = pb.NodeUnpublishVolumeRequest(volume_id=bad, target_path=target)
    expect(grpc.StatusCode.INVALID_ARGUMENT, env.csi.node.NodePublishVolume, publish, "volume_id")
    expect(grpc.StatusCode.INVALID_ARGUMENT, env.csi.node.NodeUnpublishVolume, unpublish, "volume_id")
    delete = pb.DeleteVolumeRequest(volume_id=bad)
    expect(grpc.StatusCode.INVALID_ARGUMENT, env.csi.controller.DeleteVolume, delete, "volume_id")
    assert env.calls == []
    assert os.path.isdir(env.backend.root)


def test_an_unknown_volume_is_not_found_and_not_mounted(env: Env) -> None:
    publish = pb.NodePublishVolumeRequest(
        volume_id="some-vol-id", target_path=os.path.join(env.paths, "target"), volume_capability=mount_cap()
    )
    expect(grpc.StatusCode.NOT_FOUND, env.csi.node.NodePublishVolume, publish, "some-vol-id")
    assert env.calls == []
