"""The objects of the storage walkthrough (docs/walkthrough.md) and the waits between them.

One `Walk` per namespace: claims, busybox pods that write, read or report
their volume's size into their log, snapshots, and a `cleanup` that deletes
everything and waits until the backend has given back every volume.
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs

from csi_kit.testing.cluster import BUSYBOX_IMAGE, Cluster

GiB = 1 << 30
SNAP = "/apis/snapshot.storage.k8s.io/v1"
GROUP = "/apis/groupsnapshot.storage.k8s.io/v1"


@attrs.frozen
class Flavor:
    """One walkthrough: a deployment (examples/deploy/<backend>) and what its claims ask for."""

    name: str
    backend: str
    storage_class: str
    fstype: str | None = None  # None: the class as shipped
    block: bool = False

    @property
    def fstype_is_ext4(self) -> bool:
        """The loopfile class as shipped formats ext4."""
        return self.backend == "loopfile" and not self.block and self.fstype in (None, "ext4")

    @property
    def grows_in_node(self) -> bool:
        """Filesystem volumes of a block-backed driver need NodeExpandVolume."""
        return self.backend != "hostpath" and not self.block


def parse_quantity(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return int(q[: -len(suffix)]) * factor
    return int(q)


class Walk:
    def __init__(self, cluster: Cluster, flavor: Flavor, namespace: str) -> None:
        self.cluster = cluster
        self.api = cluster.api
        self.flavor = flavor
        self.ns = namespace
        self.api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        self.api.wait(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/default", bool, "default ServiceAccount", 60
        )

    # -- objects -------------------------------------------------------------------

    def claim(
        self,
        name: str,
        size: str = "1Gi",
        source: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        spec: dict[str, Any] = {
            "storageClassName": self.flavor.storage_class,
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": size}},
            "volumeMode": "Block" if self.flavor.block else "Filesystem",
        }
        if source:
            spec["dataSource"] = source
        meta = {"name": name, "namespace": self.ns, "labels": labels or {}}
        self.api.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec})

    def pod(self, name: str, claim: str, script: str, restart: str = "Never") -> None:
        container: dict[str, Any] = {
            "name": "app",
            "image": BUSYBOX_IMAGE,
            "imagePullPolicy": "Never",
            "command": ["sh", "-c", script],
        }
        if self.flavor.block:
            container["volumeDevices"] = [{"name": "data", "devicePath": "/dev/xvda"}]
        else:
            container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
        spec = {
            "hostNetwork": True,
            "dnsPolicy": "Default",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        }
        self.api.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": spec,
            }
        )

    def writer(self, name: str, claim: str, text: str) -> None:
        """Writes `text`, says "written", then reports the volume's size every second."""
        if self.flavor.block:
            script = (
                f"echo {text} | dd of=/dev/xvda 2>/dev/null && sync && echo written; "
                "while true; do echo size $(blockdev --getsize64 /dev/xvda); sleep 1; done"
            )
        else:
            script = (
                f"echo {text} > /data/hello.txt && sync && echo written; "
                "while true; do echo df $(df -k /data | tail -n 1); sleep 1; done"
            )
        self.pod(name, claim, script, restart="Always")

    def reader(self, name: str, claim: str, length: int) -> None:
        if self.flavor.block:
            script = f"dd if=/dev/xvda bs={length} count=1 2>/dev/null"
        else:
            script = "cat /data/hello.txt"
        self.pod(name, claim, script)

    def snapshot(self, name: str, claim: str) -> None:
        self.api.create(
            {
                "apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshot",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": {"source": {"persistentVolumeClaimName": claim}},
            }
        )

    # -- waits ---------------------------------------------------------------------

    def path(self, kind: str, name: str) -> str:
        base = {"pvc": "/api/v1", "pod": "/api/v1", "volumesnapshot": SNAP, "volumegroupsnapshot": GROUP}[
            kind
        ]
        plural = {"pvc": "persistentvolumeclaims", "pod": "pods"}.get(kind, kind + "s")
        return f"{base}/namespaces/{self.ns}/{plural}/{name}"

    def wait_pod(self, name: str, phases: tuple[str, ...] = ("Running",), timeout: float = 120) -> Any:
        def ok(p: Any) -> bool:
            phase = (p or {}).get("status", {}).get("phase")
            if phase == "Failed" and "Failed" not in phases:
                raise AssertionError(f"pod {name} failed: {self.describe(name)}")
            return phase in phases

        return self.api.wait(self.path("pod", name), ok, f"pod {name} {'/'.join(phases)}", timeout)

    def wait_log(self, pod: str, want: str, timeout: float = 60) -> str:
        def has(_: Any) -> bool:
            return want in self.log(pod)

        self.api.wait(self.path("pod", pod), has, f"{want!r} in the log of {pod}", timeout)
        return self.log(pod)

    def log(self, pod: str) -> str:
        try:
            return self.cluster.pod_log(self.ns, pod)
        except Exception:  # not started yet: no log
            return ""

    def read(self, pod: str) -> str:
        """A reader pod's whole output, once it has succeeded."""
        self.wait_pod(pod, ("Succeeded",))
        return self.log(pod)

    def wait_bound(self, claim: str) -> Any:
        return self.api.wait(
            self.path("pvc", claim),
            lambda c: c and c["status"].get("phase") == "Bound",
            f"claim {claim} Bound",
            60,
        )

    def wait_ready(self, kind: str, name: str, timeout: float = 60) -> Any:
        return self.api.wait(
            self.path(kind, name),
            lambda s: s and (s.get("status") or {}).get("readyToUse"),
            f"{kind} {name} readyToUse",
            timeout,
        )

    def describe(self, pod: str) -> str:
        events = self.api.get(f"/api/v1/namespaces/{self.ns}/events")["items"]
        return "; ".join(
            f"{e['involvedObject']['name']}: {e['reason']}: {e.get('message', '')}" for e in events
        )

    def last(self, pod: str, prefix: str) -> list[str]:
        """The fields of the last log line of `pod` that starts with `prefix`."""
        lines = [ln.split() for ln in self.log(pod).splitlines() if ln.startswith(prefix + " ")]
        return lines[-1][1:] if lines else []

    # -- the end -------------------------------------------------------------------

    def volume_handles(self) -> set[str]:
        pvs = self.api.get("/api/v1/persistentvolumes")["items"]
        return {
            pv["spec"]["csi"]["volumeHandle"]
            for pv in pvs
            if pv["spec"].get("claimRef", {}).get("namespace") == self.ns
        }

    def release_retained_contents(self) -> list[str]:
        """Drop the finalizer of this namespace's deleted Retain contents; their names."""
        out = []
        for c in self.api.get(f"{SNAP}/volumesnapshotcontents")["items"]:
            meta = c["metadata"]
            if (
                c["spec"]["volumeSnapshotRef"].get("namespace") == self.ns
                and meta.get("deletionTimestamp")
                and c["spec"]["deletionPolicy"] == "Retain"
            ):
                self.api.patch(
                    f"{SNAP}/volumesnapshotcontents/{meta['name']}", {"metadata": {"finalizers": None}}
                )
                out.append(meta["name"])
        return out

    def cleanup(self, timeout: float = 120) -> None:
        """Delete every object of the namespace, and wait until their PVs and snapshot contents are gone."""
        ns = self.ns
        # In a user's order: pods, groups (their member snapshots go with them), snapshots, claims.
        for path in (
            f"/api/v1/namespaces/{ns}/pods",
            f"{GROUP}/namespaces/{ns}/volumegroupsnapshots",
            f"{SNAP}/namespaces/{ns}/volumesnapshots",
            f"/api/v1/namespaces/{ns}/persistentvolumeclaims",
        ):
            for obj in self.api.get(path)["items"]:
                self.api.delete(f"{path}/{obj['metadata']['name']}")
            if "groupsnapshot" in path and self.api.get(path)["items"]:
                with contextlib.suppress(TimeoutError):
                    self.api.wait(
                        path, lambda lst: not lst["items"], f"the group snapshots of {ns} deleted", 15
                    )
                self.release_retained_contents()
                self.api.wait(
                    path, lambda lst: not lst["items"], f"the group snapshots of {ns} deleted", timeout
                )
        self.api.wait(
            "/api/v1/persistentvolumes",
            lambda lst: (
                not [pv for pv in lst["items"] if pv["spec"].get("claimRef", {}).get("namespace") == ns]
            ),
            f"the PVs of {ns} deleted",
            timeout,
        )
        self.api.wait(
            f"{SNAP}/volumesnapshotcontents",
            lambda lst: (
                not [c for c in lst["items"] if c["spec"]["volumeSnapshotRef"].get("namespace") == ns]
            ),
            f"the snapshot contents of {ns} deleted",
            timeout,
        )
