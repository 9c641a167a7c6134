"""Shared pieces of the hostPath privileged tests: the driver handle, test
data of every kind a volume holds, and fingerprints to compare trees."""

from __future__ import annotations

import hashlib
import os
import stat

from helpers import Csi


class HostPath:
    """A hostPath driver, its client, its root and a scratch directory for targets."""

    def __init__(self, csi: Csi, state: str, root: str, targets: str) -> None:
        self.csi = csi
        self.state = state
        self.root = root
        self.targets = targets

    def volume_dir(self, volume_id: str) -> str:
        return os.path.join(self.root, "volumes", volume_id)

    def snapshot_dir(self, snapshot_id: str) -> str:
        return os.path.join(self.root, "snapshots", snapshot_id)


def fill(directory: str, seed: int = 0) -> None:
    """Data of every kind a volume holds: files, a subdirectory, a symlink, a
    sparse file, an empty file, odd modes."""
    rnd = hashlib.sha256(str(seed).encode()).digest()
    os.makedirs(os.path.join(directory, "sub", "deeper"), exist_ok=True)
    with open(os.path.join(directory, "random.bin"), "wb") as f:
        f.write(os.urandom(300 * 1024) + rnd)
    with open(os.path.join(directory, "sub", "deeper", "text.txt"), "w") as f:
        f.write(f"seed {seed}\n" * 1000)
    with open(os.path.join(directory, "sparse.img"), "wb") as f:
        f.truncate(16 << 20)
        f.seek(4 << 20)
        f.write(os.urandom(512 << 10))
    open(os.path.join(directory, "empty"), "w").close()
    os.chmod(os.path.join(directory, "sub", "deeper", "text.txt"), 0o640)
    os.symlink("sub/deeper/text.txt", os.path.join(directory, "link"))


def digest(directory: str) -> dict[str, tuple[str, int, str]]:
    """Every entry below ``directory``: kind, permission bits and content hash (or link target)."""
    out: dict[str, tuple[str, int, str]] = {}
    for base, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, directory)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                out[rel] = ("file", stat.S_IMODE(st.st_mode), h.hexdigest())
    return out


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512
