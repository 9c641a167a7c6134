"""Every Kubernetes loop csi_kit can run, listed once: the registry both CLIs read.

One `Entry` per loop: its name as `--controllers` spells it, the factory
that builds it (each loop module's `build(ctx)`, see `runtime/context.py`),
whether `all` includes it, and the options it adds.  `csi-kit serve
--controllers ...` and `csi-kit controllers` both parse their options, check
the `--controllers` list and build the loops from here (`k8s/cli.py`), so a
new loop is one line below plus its module's factory.

Groups name several loops at once: `snapshot` (both halves; pick one when the
other runs elsewhere, e.g. the cluster already has the upstream
snapshot-controller), `group-snapshot`, and `all`.  Volume group snapshots are
opt-in, as upstream's --enable-volume-group-snapshots, because they need the
group CRDs; the health monitor and snapshot-metadata are opt-in as upstream.

Rule: the wiring layer; it imports every loop family, nothing imports it but
`k8s/cli.py`.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from csi_kit.k8s.runtime.context import LoopContext, Planned
from csi_kit.k8s.runtime.options import env as _env
from csi_kit.k8s.runtime.options import env_bool as _env_bool
from csi_kit.k8s.snapshot import controller as snapshot_controller
from csi_kit.k8s.snapshot import group_controller, group_snapshotter, metadata, snapshotter
from csi_kit.k8s.volume import attacher, capacity, health, liveness, provisioner, registration, resizer
from csi_kit.k8s.volume.registration import KUBELET_REGISTRY

Factory = Callable[[LoopContext], Awaitable[list[Planned]]]
Options = Callable[[Any], None]


def _provisioner_options(g: Any) -> None:
    g.add_argument("--volume-name-prefix", default=_env("volume-name-prefix", "pvc"))
    g.add_argument("--volume-name-uuid-length", type=int, default=int(_env("volume-name-uuid-length", -1)))
    g.add_argument("--default-fstype", default=_env("default-fstype", ""))
    g.add_argument(
        "--immediate-binding",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("immediate-binding", True),
        help="per-node provisioners race for Immediate-mode claims (else they only take scheduled ones)",
    )
    g.add_argument(
        "--cross-namespace-data-sources",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("cross-namespace-data-sources", False),
        help="allow dataSourceRef in another namespace when a ReferenceGrant permits it",
    )


def _capacity_options(g: Any) -> None:
    g.add_argument("--capacity-poll-interval", type=float, default=float(_env("capacity-poll-interval", 60)))
    g.add_argument("--capacity-namespace", default=_env("capacity-namespace", None))
    g.add_argument(
        "--capacity-for-immediate-binding",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("capacity-for-immediate-binding", False),
        help="publish CSIStorageCapacity for Immediate-binding classes too "
        "(by default only WaitForFirstConsumer classes get them, as upstream)",
    )


def _registration_options(g: Any) -> None:
    g.add_argument(
        "--kubelet-registration-path",
        default=_env("kubelet-registration-path", None),
        help="the CSI socket path as the kubelet sees it (default: the driver's socket path)",
    )
    g.add_argument("--plugin-registry-dir", default=_env("plugin-registry-dir", KUBELET_REGISTRY))


def _liveness_options(g: Any) -> None:
    g.add_argument("--health-port", type=int, default=int(_env("health-port", 9808)))
    g.add_argument("--health-address", default=_env("health-address", "0.0.0.0"))
    g.add_argument("--probe-timeout", type=float, default=float(_env("probe-timeout", 1.0)))


@attrs.frozen
class Entry:
    """One loop: its `--controllers` name, factory, membership of `all`, option adder."""

    name: str
    build: Factory
    in_all: bool = True
    add_options: Options | None = None


# In the order they are built: registration before liveness (its state is a liveness check).
LOOPS: tuple[Entry, ...] = (
    Entry("snapshot-controller", snapshot_controller.build),
    Entry("snapshotter", snapshotter.build),
    Entry("group-snapshot-controller", group_controller.build, in_all=False),
    Entry("group-snapshotter", group_snapshotter.build, in_all=False),
    Entry("snapshot-metadata", metadata.build, in_all=False, add_options=metadata.add_options),
    Entry("health-monitor", health.build, in_all=False, add_options=health.add_options),
    Entry("provisioner", provisioner.build, add_options=_provisioner_options),
    Entry("resizer", resizer.build),
    Entry("attacher", attacher.build),
    Entry("capacity", capacity.build, add_options=_capacity_options),
    Entry("registration", registration.build, add_options=_registration_options),
    Entry("liveness", liveness.build, add_options=_liveness_options),
)

BY_NAME = {e.name: e for e in LOOPS}

# What each name accepted by --controllers runs.
CONTROLLERS: dict[str, tuple[str, ...]] = {
    "snapshot": ("snapshot-controller", "snapshotter"),
    "group-snapshot": ("group-snapshot-controller", "group-snapshotter"),
    **{e.name: (e.name,) for e in LOOPS},
    "all": tuple(e.name for e in LOOPS if e.in_all),
}


def add_options(g: Any) -> None:
    """Every loop's own options, added to the argument group `g` (each adder once)."""
    seen: set[Options] = set()
    for e in LOOPS:
        if e.add_options is not None and e.add_options not in seen:
            seen.add(e.add_options)
            e.add_options(g)


def expand(controllers: str) -> tuple[set[str], frozenset[str]]:
    """A --controllers value → (the loops it selects, the names as given); ValueError for an unknown one."""
    out: set[str] = set()
    named: set[str] = set()
    for item in controllers.split(","):
        item = item.strip()
        if not item or item == "none":
            continue
        if item not in CONTROLLERS:
            raise ValueError(f"unknown controller {item!r}; choose from {', '.join(sorted(CONTROLLERS))}")
        named.add(item)
        out.update(CONTROLLERS[item])
    return out, frozenset(named)


async def build(ctx: LoopContext, wanted: set[str]) -> list[Planned]:
    """The plans of the `wanted` loops, in registry order."""
    plans: list[Planned] = []
    for e in LOOPS:
        if e.name in wanted:
            plans.extend(await e.build(ctx))
    return plans
