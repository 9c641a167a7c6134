"""csi_kit.linux.loop on real loop devices: attach/detach through ioctls,
autoclear, capacity refresh, missing /dev nodes, and concurrent attaches
racing for the same free device."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from csi_kit.errors import FailedPrecondition, NotFound
from csi_kit.linux import blockfs, loop

pytestmark = pytest.mark.privileged

MiB = 1 << 20


@pytest.fixture
def images(tmp_path: Path) -> Iterator[Path]:
    """A directory for images; every device still on one of them is detached afterwards."""
    yield tmp_path
    for device in loop.list_devices():
        if device.backing_file.startswith(str(tmp_path) + "/"):
            loop.detach(device)


def _image(directory: Path, name: str, size: int = 8 * MiB) -> str:
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def test_attach_detach_and_capacity(images: Path) -> None:
    image = _image(images, "a.img")
    handle = loop.attach(image, block_size=4096)
    handle.close()  # not autoclear: stays attached
    device = loop.device_for(image)
    assert device is not None and device == loop.loop_device(handle.device.number)
    assert not device.autoclear
    assert blockfs.device_size(device.path) == 8 * MiB
    with open(f"/sys/block/{device.name}/queue/logical_block_size") as f:
        assert f.read().strip() == "4096"
    os.truncate(image, 24 * MiB)
    assert blockfs.device_size(device.path) == 8 * MiB  # until told
    loop.set_capacity(device)
    assert blockfs.device_size(device.path) == 24 * MiB
    assert loop.detach(device)
    assert loop.device_for(image) is None
    assert loop.detach(device)  # already gone: fine
    with pytest.raises(NotFound):
        loop.set_capacity(device)


def test_autoclear_device_goes_with_its_last_user(images: Path) -> None:
    image = _image(images, "a.img")
    with loop.attach(image, autoclear=True) as handle:
        device = loop.device_for(image)
        assert device is not None and device.autoclear and device.number == handle.device.number
        # Someone else holding it keeps it; detach while in use only marks it.
        fd = os.open(handle.path, os.O_RDONLY)
    try:
        assert loop.device_for(image) is not None
        assert loop.detach(device, wait=0.1) is False
    finally:
        os.close(fd)
    assert loop.device_for(image) is None


def test_set_autoclear_on_an_attached_device(images: Path) -> None:
    image = _image(images, "a.img")
    loop.attach(image).close()
    device = loop.device_for(image)
    assert device is not None and not device.autoclear
    fd = os.open(device.path, os.O_RDONLY)
    loop.set_autoclear(device)
    current = loop.device_for(image)
    assert current is not None and current.autoclear
    os.close(fd)  # the last user: detached now
    assert loop.device_for(image) is None


def test_detach_leaves_a_device_that_serves_another_file(images: Path) -> None:
    first = _image(images, "first.img")
    loop.attach(first).close()
    device = loop.device_for(first)
    assert device is not None
    stale = loop.LoopDevice(device.number, str(images / "someone-else.img"))
    assert loop.detach(stale)  # "gone" as far as that file is concerned...
    assert loop.device_for(first) is not None  # ...but the device serving another file is untouched
    loop.detach(device)


def test_concurrent_attaches_each_get_their_own_device(images: Path) -> None:
    paths = [_image(images, f"{i}.img") for i in range(8)]

    def attach(path: str) -> int:
        handle = loop.attach(path)
        handle.close()
        return handle.device.number

    with ThreadPoolExecutor(8) as pool:
        numbers = list(pool.map(attach, paths))
    assert len(set(numbers)) == 8
    for path, number in zip(paths, numbers, strict=True):
        device = loop.device_for(path)
        assert device is not None and device.number == number
        assert loop.detach(device)


def test_a_missing_device_node_is_created(images: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    image = _image(images, "a.img")
    loop.attach(image).close()
    device = loop.device_for(image)
    assert device is not None
    dev = tmp_path_factory.mktemp("dev")
    real = os.stat(device.path).st_rdev
    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "DEV_DIR", str(dev))
    try:
        path = loop.ensure_node(device.number)
        st = os.stat(path)
        assert path == str(dev / device.name)
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == real
        assert loop.ensure_node(device.number) == path  # already there
        os.unlink(path)
        (dev / device.name).write_text("")
        with pytest.raises(FailedPrecondition, match="not the block device"):
            loop.ensure_node(device.number)
    finally:
        mp.undo()
        loop.detach(device)


def test_attach_refuses_what_is_not_a_file(images: Path) -> None:
    with pytest.raises(NotFound):
        loop.attach(str(images / "missing.img"))
    with pytest.raises(FailedPrecondition):
        loop.attach(str(images))
    os.symlink(_image(images, "real.img"), images / "link.img")
    with pytest.raises(Exception, match=r"link\.img: ELOOP"):
        loop.attach(str(images / "link.img"))  # O_NOFOLLOW: never through a symlink
