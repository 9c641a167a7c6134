"""Scratch volumes: hostPath directories whose permissions a StorageClass chooses."""

from __future__ import annotations

import os

import attrs

from csi_kit import BackendContext, CreatedVolume, VolumeRequest
from csi_kit.errors import InvalidArgument
from csi_kit_backends.hostpath import HostPathBackend, HostPathConfig


@attrs.frozen
class ScratchConfig:
    #: Where volumes live; default STATE_DIR/scratch.
    root: str = ""


class ScratchBackend(HostPathBackend):
    # StorageClass parameters this backend accepts; csi_kit rejects any other
    # key with INVALID_ARGUMENT before a call reaches us.
    parameter_keys = frozenset({"mode"})

    def __init__(self, config: ScratchConfig | None, context: BackendContext) -> None:
        root = (config.root if config else "") or os.path.join(context.state_dir, "scratch")
        super().__init__(HostPathConfig(root=root, quota="off"), context)

    def create_volume(self, volume_id: str, request: VolumeRequest) -> CreatedVolume:
        raw = request.parameters.get("mode", "0777")
        try:
            mode = int(raw, 8)
        except ValueError:
            raise InvalidArgument(f"parameter mode={raw!r} is not an octal permission like 0750") from None
        if not 0 <= mode <= 0o7777:
            raise InvalidArgument(f"parameter mode={raw!r} is outside 0000-7777")
        made = super().create_volume(volume_id, request)
        os.chmod(self.volume_path(volume_id), mode)
        return made
