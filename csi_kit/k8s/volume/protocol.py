"""What the volume loops (provisioner, resizer, attacher, capacity) share.

The PVC access mode → CSI access mode mapping, the claim conditions the
resizer's loops write, and Events.  The CSI calls themselves are
`runtime.csi.CSIClient`'s (one client, one channel for every loop of a
process); the loops take the narrow `*Driver` protocols declared next to
them, so tests can hand them any CSI peer.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

from csi_kit.k8s.objects.resources import EVENT
from csi_kit.k8s.objects.times import rfc3339
from csi_kit.k8s.runtime import api as k
from csi_kit.k8s.runtime.api import ApiError, KubeAPI, Obj
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


# ----------------------------------------------------------------- events


class EventRecorder:
    """Writes core/v1 Events about the objects a loop works on (best effort: never fails a sync).

    Repeats of the same (object, reason, message) within a process bump
    `count` on the event already written instead of creating another, the way
    client-go's recorder aggregates, so a retried failure costs one request per
    retry at most and no unbounded stream of objects.
    """

    def __init__(self, api: KubeAPI, component: str, *, enabled: bool = True) -> None:
        self.api = api
        self.component = component
        self.enabled = enabled
        self._seen: dict[tuple[str, str, str, str], Obj] = {}

    async def event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        if not self.enabled:
            return
        m = obj.get("metadata", {})
        ns = m.get("namespace") or "default"
        key = (k.uid_of(obj), type_, reason, message)
        now = rfc3339()
        try:
            prev = self._seen.get(key)
            if prev is not None:
                patched = await self.api.patch(
                    EVENT,
                    k.name_of(prev),
                    {"count": int(prev.get("count", 1)) + 1, "lastTimestamp": now},
                    ns,
                )
                self._seen[key] = patched
                return
            created = await self.api.create(
                EVENT,
                {
                    "metadata": {
                        "name": f"{m.get('name', 'object')}.{uuid.uuid4().hex[:16]}",
                        "namespace": ns,
                    },
                    "involvedObject": {
                        "kind": obj.get("kind", ""),
                        "apiVersion": obj.get("apiVersion", ""),
                        "name": m.get("name", ""),
                        "namespace": m.get("namespace", ""),
                        "uid": m.get("uid", ""),
                        "resourceVersion": m.get("resourceVersion", ""),
                    },
                    "type": type_,
                    "reason": reason,
                    "message": message,
                    "count": 1,
                    "firstTimestamp": now,
                    "lastTimestamp": now,
                    "source": {"component": self.component},
                    "reportingComponent": self.component,
                },
                ns,
            )
            if len(self._seen) > 4096:
                self._seen.clear()
            self._seen[key] = created
        except ApiError as e:
            log.info("cannot record event %s on %s: %s", reason, k.key_of(obj), e)
