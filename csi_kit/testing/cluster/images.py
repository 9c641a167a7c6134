"""The two container images a run needs, built here from the static busybox.

Nothing is pulled: `build_images` writes a docker archive that the cluster
imports with ``ctr``, and pods use ``imagePullPolicy: Never``.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import tarfile

from csi_kit.linux.run import run

__all__ = ["BUSYBOX_IMAGE", "PAUSE_IMAGE", "build_images"]

BUSYBOX_IMAGE = "localhost/csi-kit-e2e/busybox:1"
PAUSE_IMAGE = "localhost/csi-kit-e2e/pause:1"


def _tar_add(tar: tarfile.TarFile, name: str, *, data: bytes | None = None, link: str | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    if link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
    elif data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = len(data), 0o755
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def build_images(busybox: str, out: str) -> None:
    """A docker-archive tarball with `BUSYBOX_IMAGE` and `PAUSE_IMAGE`, one shared layer.

    The layer is the static busybox with a link per applet; the pause image
    just sleeps (as PID 1 it ignores SIGTERM: containerd stops sandboxes with SIGKILL).
    """
    applets = run([busybox, "--list"]).stdout.split()
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.USTAR_FORMAT) as layer:
        for d in ("bin/", "tmp/", "etc/", "data/"):
            _tar_add(layer, d)
        with open(busybox, "rb") as f:
            _tar_add(layer, "bin/busybox", data=f.read())
        for a in applets:
            if a != "busybox" and "/" not in a:
                _tar_add(layer, f"bin/{a}", link="busybox")
    layer_bytes = layer_buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    manifest = []
    with tarfile.open(out, "w") as archive:
        _tar_add(archive, "layer.tar", data=layer_bytes)
        for tag, entry in ((BUSYBOX_IMAGE, None), (PAUSE_IMAGE, ["/bin/sleep", "2147483647"])):
            config = {
                "architecture": arch,
                "os": "linux",
                "config": {"Env": ["PATH=/bin"], "Entrypoint": entry, "Cmd": None if entry else ["sh"]},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }
            raw = json.dumps(config).encode()
            name = hashlib.sha256(raw).hexdigest() + ".json"
            _tar_add(archive, name, data=raw)
            manifest.append({"Config": name, "RepoTags": [tag], "Layers": ["layer.tar"]})
        _tar_add(archive, "manifest.json", data=json.dumps(manifest).encode())
