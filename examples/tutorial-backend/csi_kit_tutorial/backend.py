"""Directory volumes: each volume is a directory under one root, bind-mounted at the target."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import attrs

from csi_kit import Backend, BackendContext, CreatedVolume, PublishRequest, VolumeRequest
from csi_kit.errors import InvalidArgument
from csi_kit.linux import mounts


@attrs.frozen
class DirConfig:
    """Options of `csi-kit serve --backend-option KEY=VALUE`, converted to these types."""

    #: Where the volumes live; empty means STATE_DIR/dirs.
    root: str = ""
    #: Permissions of a new volume's directory, in octal (e.g. 750).
    mode: str = "0777"


class DirBackend(Backend):
    """Volumes are directories under one root."""

    # StorageClass parameters this backend accepts; any other key is refused
    # with INVALID_ARGUMENT before a call reaches the backend.
    parameter_keys = frozenset({"mode"})

    def __init__(self, config: DirConfig | None, context: BackendContext) -> None:
        super().__init__(config, context)
        config = config or DirConfig()
        self.root = config.root or os.path.join(context.state_dir, "dirs")
        self.default_mode = config.mode

    def start(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    def protected_paths(self) -> Sequence[str]:
        return (self.root,)  # no target or staging path may lie in here

    def path(self, volume_id: str) -> str:
        return os.path.join(self.root, volume_id)  # safe: every id is one path component

    # -- controller ------------------------------------------------------------

    def create_volume(self, volume_id: str, request: VolumeRequest) -> CreatedVolume:
        raw = request.parameters.get("mode", self.default_mode)
        try:
            mode = int(raw, 8)
        except ValueError:
            raise InvalidArgument(f"mode {raw!r} is not an octal permission like 0750") from None
        os.makedirs(self.path(volume_id), exist_ok=True)  # a retry after a crash finds it made
        os.chmod(self.path(volume_id), mode & 0o7777)
        return CreatedVolume(request.capacity_bytes)

    def delete_volume(self, volume_id: str) -> None:
        shutil.rmtree(self.path(volume_id), ignore_errors=True)  # succeeds when already gone

    def volume_exists(self, volume_id: str) -> bool:
        return os.path.isdir(self.path(volume_id))  # unknown ids get NOT_FOUND

    # -- node ------------------------------------------------------------------

    def node_publish(self, request: PublishRequest) -> None:
        mounts.bind_mount(self.path(request.volume_id), request.target_path, readonly=request.readonly)

    def node_unpublish(self, volume_id: str, target_path: str) -> None:
        mounts.unmount(target_path)
