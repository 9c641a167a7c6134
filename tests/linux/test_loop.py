"""Loop devices and block filesystems without root: the ioctl numbers and
struct layouts against the kernel headers, the sysfs reading, the
superblock parsing and the blkid output parsing."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from csi_kit.errors import InvalidArgument
from csi_kit.linux import blockfs, loop
from csi_kit.linux.run import Result

C_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/loop.h>
#include <linux/fs.h>
int main(void) {
    printf("loop_info64 %zu\n", sizeof(struct loop_info64));
    printf("lo_flags %zu\n", offsetof(struct loop_info64, lo_flags));
    printf("loop_config %zu\n", sizeof(struct loop_config));
    printf("config_info %zu\n", offsetof(struct loop_config, info));
    printf("LOOP_CONFIGURE %lu\n", (unsigned long)LOOP_CONFIGURE);
    printf("LOOP_CLR_FD %lu\n", (unsigned long)LOOP_CLR_FD);
    printf("LOOP_SET_CAPACITY %lu\n", (unsigned long)LOOP_SET_CAPACITY);
    printf("LOOP_GET_STATUS64 %lu\n", (unsigned long)LOOP_GET_STATUS64);
    printf("LOOP_SET_STATUS64 %lu\n", (unsigned long)LOOP_SET_STATUS64);
    printf("LOOP_CTL_GET_FREE %lu\n", (unsigned long)LOOP_CTL_GET_FREE);
    printf("LO_FLAGS_AUTOCLEAR %lu\n", (unsigned long)LO_FLAGS_AUTOCLEAR);
    printf("LO_FLAGS_DIRECT_IO %lu\n", (unsigned long)LO_FLAGS_DIRECT_IO);
    printf("LO_FLAGS_READ_ONLY %lu\n", (unsigned long)LO_FLAGS_READ_ONLY);
    printf("BLKGETSIZE64 %lu\n", (unsigned long)BLKGETSIZE64);
    return 0;
}
"""


@pytest.fixture(scope="module")
def kernel_abi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/linux/loop.h").exists():
        pytest.skip("needs a C compiler and the Linux UAPI headers")
    d = tmp_path_factory.mktemp("abi")
    (d / "probe.c").write_text(C_PROBE)
    subprocess.run([cc, "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_structs_and_ioctl_numbers_match_the_kernel_headers(kernel_abi: dict[str, int]) -> None:
    assert loop.LOOP_INFO64.size == kernel_abi["loop_info64"]
    assert loop.LOOP_CONFIG.size == kernel_abi["loop_config"]
    assert kernel_abi["config_info"] == 8
    flags_offset = struct.calcsize("=" + loop.LOOP_INFO64.format.lstrip("=")[: loop._INFO_FLAGS_INDEX])
    assert flags_offset == kernel_abi["lo_flags"]
    assert kernel_abi["LOOP_CONFIGURE"] == loop.LOOP_CONFIGURE
    assert kernel_abi["LOOP_CLR_FD"] == loop.LOOP_CLR_FD
    assert kernel_abi["LOOP_SET_CAPACITY"] == loop.LOOP_SET_CAPACITY
    assert kernel_abi["LOOP_GET_STATUS64"] == loop.LOOP_GET_STATUS64
    assert kernel_abi["LOOP_SET_STATUS64"] == loop.LOOP_SET_STATUS64
    assert kernel_abi["LOOP_CTL_GET_FREE"] == loop.LOOP_CTL_GET_FREE
    assert kernel_abi["LO_FLAGS_AUTOCLEAR"] == loop.LO_FLAGS_AUTOCLEAR
    assert kernel_abi["LO_FLAGS_DIRECT_IO"] == loop.LO_FLAGS_DIRECT_IO
    assert kernel_abi["LO_FLAGS_READ_ONLY"] == loop.LO_FLAGS_READ_ONLY
    assert kernel_abi["BLKGETSIZE64"] == blockfs.BLKGETSIZE64


def _fake_loop(
    sys_block: Path, n: int, backing: str | None, *, autoclear: bool = False, dio: bool = False
) -> None:
    d = sys_block / f"loop{n}"
    (d / "loop").mkdir(parents=True) if backing is not None else d.mkdir(parents=True)
    (d / "dev").write_text(f"7:{n}\n")
    (d / "ro").write_text("0\n")
    if backing is not None:
        (d / "loop" / "backing_file").write_text(backing + "\n")
        (d / "loop" / "autoclear").write_text("1\n" if autoclear else "0\n")
        (d / "loop" / "dio").write_text("1\n" if dio else "0\n")


def test_devices_are_read_from_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys_block = tmp_path / "sys"
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.img").touch()
    (images / "link.img").symlink_to(images / "a.img")
    _fake_loop(sys_block, 10, str(images / "a.img"), autoclear=True, dio=True)
    _fake_loop(sys_block, 2, str(images / "b.img") + " (deleted)")
    _fake_loop(sys_block, 3, None)  # unbound
    _fake_loop(sys_block, 11, str(images / "a.img"))
    (sys_block / "sda").mkdir()
    (sys_block / "loopback").mkdir()  # not loopN
    monkeypatch.setattr(loop, "SYS_BLOCK", str(sys_block))

    devices = loop.list_devices()
    assert [d.number for d in devices] == [2, 10, 11]
    assert devices[0] == loop.LoopDevice(2, str(images / "b.img"), deleted=True)
    assert devices[1].autoclear and devices[1].direct_io and devices[1].path == "/dev/loop10"
    # Matched through symlinks; the lowest number first; deleted only on request.
    assert [d.number for d in loop.devices_of(str(images / "link.img"))] == [10, 11]
    assert loop.device_for(str(images / "a.img")) == devices[1]
    assert loop.device_for(str(images / "b.img")) is None
    assert loop.device_for(str(images / "b.img"), include_deleted=True) == devices[0]
    assert loop.loop_device(3) is None


def test_ensure_node_refuses_a_wrong_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "SYS_BLOCK", str(tmp_path / "sys"))
    monkeypatch.setattr(loop, "DEV_DIR", str(tmp_path))
    (tmp_path / "loop5").write_text("not a device")
    with pytest.raises(Exception, match="not the block device 7:5"):
        loop.ensure_node(5)


def _ext4_superblock(blocks: int, log_block: int, *, bit64: bool) -> bytes:
    sb = bytearray(2048)
    struct.pack_into("<I", sb, 1024 + 4, blocks & 0xFFFFFFFF)
    struct.pack_into("<I", sb, 1024 + 24, log_block)
    struct.pack_into("<H", sb, 1024 + 56, 0xEF53)
    struct.pack_into("<I", sb, 1024 + 96, 0x80 if bit64 else 0)
    struct.pack_into("<I", sb, 1024 + 0x150, blocks >> 32)
    return bytes(sb)


def test_filesystem_size_from_the_superblock(tmp_path: Path) -> None:
    ext = tmp_path / "ext4"
    ext.write_bytes(_ext4_superblock(25600, 2, bit64=False))  # 4 KiB blocks
    assert blockfs.filesystem_size(str(ext), "ext4") == 25600 * 4096
    assert blockfs.filesystem_size(str(ext), "xfs") is None
    big = tmp_path / "big"
    big.write_bytes(_ext4_superblock((1 << 32) + 5, 2, bit64=True))
    assert blockfs.filesystem_size(str(big), "ext4") == ((1 << 32) + 5) * 4096
    xfs = tmp_path / "xfs"
    xfs.write_bytes(b"XFSB" + struct.pack(">IQ", 4096, 76800) + bytes(1000))
    assert blockfs.filesystem_size(str(xfs), "xfs") == 76800 * 4096
    assert blockfs.filesystem_size(str(xfs), "ext4") is None
    with pytest.raises(InvalidArgument):
        blockfs.filesystem_size(str(xfs), "btrfs")
    assert blockfs.device_size(str(xfs)) == 1016  # a regular file: its size


@pytest.mark.parametrize(
    ("code", "stdout", "expected"),
    [
        (2, "", None),
        (
            0,
            "DEVNAME=/dev/loop1\nUUID=x\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\n",
            ("ext4", "filesystem"),
        ),
        (0, "DEVNAME=/dev/loop1\nPTUUID=y\nPTTYPE=gpt\n", ("gpt", "partition table")),
        (0, "TYPE=LVM2_member\nUSAGE=raid\n", ("LVM2_member", "raid")),
    ],
)
def test_probe_reads_blkid_export_output(
    monkeypatch: pytest.MonkeyPatch, code: int, stdout: str, expected: tuple[str, str] | None
) -> None:
    seen: list[list[str]] = []

    def fake_run(argv: list[str], **kw: object) -> Result:
        seen.append(argv)
        return Result(tuple(argv), code, stdout, "")

    monkeypatch.setattr(blockfs, "run", fake_run)
    sig = blockfs.probe("/dev/loop1")
    assert (None if sig is None else (sig.type, sig.usage)) == expected
    assert seen == [["blkid", "-p", "-o", "export", "--", "/dev/loop1"]]


def test_probe_refuses_an_ambivalent_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blockfs, "run", lambda argv, **kw: Result(tuple(argv), 8, "", "ambivalent result"))
    with pytest.raises(Exception, match="ambivalent"):
        blockfs.probe("/dev/loop1")


def test_min_size_and_supported_types() -> None:
    assert blockfs.min_size("xfs") == 300 << 20
    assert blockfs.min_size("ext4") == 1 << 20
    with pytest.raises(InvalidArgument):
        blockfs.min_size("ntfs")
