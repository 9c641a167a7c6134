"""What the conformance suite needs to know about the driver under test.

One frozen value, built from command-line options (`csi-kit sanity`, or the
`--csi-*` pytest options) or returned by a backend author's own
`csi_sanity_config` fixture.  Everything the suite sends that is driver
specific (parameters, secrets, sizes, access type) comes from here, so the
same tests run against any CSI endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import yaml

__all__ = ["SanityConfig", "load_yaml_map", "load_secrets"]

MiB = 1024 * 1024

#: The RPCs that carry a `secrets` field.  A secrets file may give one flat
#: map (sent to every one of them) or a map per RPC name; the csi-sanity
#: spelling (`CreateVolumeSecret`, ...) is accepted too.
SECRET_RPCS = (
    "CreateVolume",
    "DeleteVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "ValidateVolumeCapabilities",
    "ControllerExpandVolume",
    "ControllerModifyVolume",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ListSnapshots",
    "GetSnapshot",
    "NodeStageVolume",
    "NodePublishVolume",
    "NodeExpandVolume",
    "CreateVolumeGroupSnapshot",
    "DeleteVolumeGroupSnapshot",
    "GetVolumeGroupSnapshot",
)


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{what}: expected a mapping of strings, got {type(value).__name__}")
    return {str(k): str(v) for k, v in value.items()}


def load_yaml_map(path: str) -> dict[str, str]:
    """Read a YAML file holding one flat string→string map (volume parameters)."""
    with open(path, encoding="utf-8") as f:
        return _str_map(yaml.safe_load(f), path)


def load_secrets(path: str) -> dict[str, dict[str, str]]:
    """Read a secrets YAML file into a map per RPC name.

    Accepted shapes: a flat map (the same secrets for every RPC); a map whose
    keys are RPC names (`CreateVolume: {...}`); or csi-sanity's keys
    (`CreateVolumeSecret: {...}`).  The key `default` applies to RPCs without
    their own entry.
    """
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping")
    per_rpc: dict[str, dict[str, str]] = {}
    nested = any(isinstance(v, Mapping) for v in data.values())
    if not nested:
        flat = _str_map(data, path)
        return {rpc: dict(flat) for rpc in SECRET_RPCS}
    default = _str_map(data.get("default"), f"{path}: default")
    for rpc in SECRET_RPCS:
        value = data.get(rpc, data.get(rpc + "Secret"))
        per_rpc[rpc] = _str_map(value, f"{path}: {rpc}") if value is not None else dict(default)
    return per_rpc


def _check_access_type(_inst: object, _attr: object, value: str) -> None:
    if value not in ("mount", "block"):
        raise ValueError(f"access_type must be 'mount' or 'block', not {value!r}")


def _positive(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attr.name} must be positive, not {value}")


@attrs.frozen(kw_only=True)
class SanityConfig:
    """The driver under test and how to exercise it.

    `endpoint` is a gRPC target (`unix:///path/csi.sock` or `host:port`);
    `controller_endpoint` defaults to it.  `mount_dir` and `staging_dir` are
    parents under which the suite makes one fresh directory per test (a
    private temporary directory when unset).  `volume_size` is what the suite
    asks for; `expand_size` the size it expands to (twice `volume_size` when
    unset).  `modify_parameters` are mutable parameters that make a valid
    ControllerModifyVolume for the driver (the tests needing a valid change
    skip without them).  `driver_roots` are directories the driver keeps its data in, if
    known: loop devices backed by files there count as the run's own when the
    suite checks that nothing leaked, and the node-path attacks aim targets
    at them.  `allow_host_namespace` lets those attacks run in the machine's
    initial mount namespace (by default they skip there: a faulty driver's
    unmounts would reach the machine); set it only on a disposable node.
    """

    endpoint: str
    controller_endpoint: str | None = None
    mount_dir: str | None = None
    staging_dir: str | None = None
    volume_size: int = attrs.field(default=64 * MiB, validator=_positive)
    expand_size: int | None = None
    parameters: Mapping[str, str] = attrs.field(factory=dict, converter=dict)
    snapshot_parameters: Mapping[str, str] = attrs.field(factory=dict, converter=dict)
    modify_parameters: Mapping[str, str] = attrs.field(factory=dict, converter=dict)
    secrets: Mapping[str, Mapping[str, str]] = attrs.field(factory=dict, converter=dict)
    access_type: str = attrs.field(default="mount", validator=_check_access_type)
    fs_type: str = ""
    idempotency_repeats: int = attrs.field(default=10, validator=_positive)
    concurrency: int = attrs.field(default=8, validator=_positive)
    rpc_timeout: float = 120.0
    connect_timeout: float = 30.0
    hypothesis_examples: int = attrs.field(default=15, validator=_positive)
    hypothesis_steps: int = attrs.field(default=25, validator=_positive)
    driver_roots: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    allow_host_namespace: bool = False

    @property
    def target_expand_size(self) -> int:
        """The size the expansion tests ask for."""
        return self.expand_size if self.expand_size else 2 * self.volume_size

    def secrets_for(self, rpc: str) -> dict[str, str]:
        """Secrets to send with `rpc` (empty when none were configured)."""
        return dict(self.secrets.get(rpc, self.secrets.get("default", {})))
