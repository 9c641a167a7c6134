"""What the volume loops (provisioner, resizer, attacher, capacity) share.

The PVC access mode → CSI access mode mapping and the claim conditions the
resizer's loops write (Events go through `runtime.events`).  The CSI calls themselves are
`runtime.csi.CSIClient`'s (one client, one channel for every loop of a
process); the loops take the narrow `*Driver` protocols declared next to
them, so tests can hand them any CSI peer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from csi_kit.k8s.objects.times import rfc3339
from csi_kit.k8s.runtime.api import Obj
from csi_kit.k8s.runtime.csi import Capability

log = logging.getLogger(__name__)


# --------------------------------------------------------------- access modes


def capabilities_for(
    access_modes: list[str],
    *,
    block: bool,
    fs_type: str,
    mount_flags: list[str],
    single_node_multi_writer: bool,
) -> list[Capability]:
    """PVC access modes → CSI capabilities, as external-provisioner maps them.

    With the driver's SINGLE_NODE_MULTI_WRITER capability, ReadWriteOnce means
    SINGLE_NODE_MULTI_WRITER and ReadWriteOncePod SINGLE_NODE_SINGLE_WRITER;
    without it both mean SINGLE_NODE_WRITER.
    """
    if not access_modes:
        raise ValueError("the claim has no access modes")
    modes: list[str] = []
    for am in access_modes:
        if am == "ReadWriteOnce":
            m = "SINGLE_NODE_MULTI_WRITER" if single_node_multi_writer else "SINGLE_NODE_WRITER"
        elif am == "ReadWriteOncePod":
            m = "SINGLE_NODE_SINGLE_WRITER" if single_node_multi_writer else "SINGLE_NODE_WRITER"
        elif am == "ReadOnlyMany":
            m = "MULTI_NODE_READER_ONLY"
        elif am == "ReadWriteMany":
            m = "MULTI_NODE_MULTI_WRITER"
        else:
            raise ValueError(f"unknown access mode {am!r}")
        if m not in modes:
            modes.append(m)
    return [
        Capability(
            m, block=block, fs_type="" if block else fs_type, mount_flags=() if block else tuple(mount_flags)
        )
        for m in modes
    ]


# ------------------------------------------------------- claim conditions


def claim_condition(type_: str, message: str = "") -> dict[str, Any]:
    """A PVC condition of `type_` with status True, as the resizer's loops write them."""
    c: dict[str, Any] = {"type": type_, "status": "True", "lastTransitionTime": rfc3339()}
    if message:
        c["message"] = message
    return c


def has_claim_condition(pvc: Obj, type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True"
        for c in (pvc.get("status") or {}).get("conditions") or []
    )


def merge_claim_conditions(
    pvc: Obj, new: Iterable[dict[str, Any]], kinds: Iterable[str], *, keep_old: bool = False
) -> list[dict[str, Any]]:
    """The claim's conditions with `new` merged in by type (upstream's Merge*ConditionsOfPVC).

    Conditions whose type is not one of `kinds` (another loop's) stay; old
    conditions of `kinds` stay only with `keep_old`; a new condition
    replaces an old one of its type.
    """
    mine = set(kinds)
    by_type = {c["type"]: c for c in new}
    out: list[dict[str, Any]] = []
    for c in (pvc.get("status") or {}).get("conditions") or []:
        t = c.get("type")
        if t not in mine:
            out.append(c)
        elif t in by_type:
            out.append(by_type.pop(t))
        elif keep_old:
            out.append(c)
    return out + list(by_type.values())
