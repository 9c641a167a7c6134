"""What a real cluster needs on this machine, and why it cannot run when it cannot.

`binaries_dir` finds the Kubernetes binaries (xz-compressed, with the
snapshot CRDs in ``crd/``); `unavailable_reason` tells a test suite in one
line why it must skip (not root, binaries or tools missing).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["COMPONENTS", "TOOLS", "binaries_dir", "unavailable_reason"]

#: The Kubernetes binaries, each ``<name>.xz`` in `binaries_dir`.
COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "snapshot-controller")
#: The programs taken from the machine's PATH.
TOOLS = (
    "etcd",
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "ctr",
    "busybox",
    "openssl",
    "nsenter",
    "unshare",
    "ip",
)


def binaries_dir(repo: str | os.PathLike[str] | None = None) -> Path:
    """``$CSI_KIT_K8S_BINARIES``, else ``<repo>/../shared/k8s`` (the repository holding this file)."""
    env = os.environ.get("CSI_KIT_K8S_BINARIES")
    if env:
        return Path(env)
    # csi_kit/testing/cluster/requirements.py: the repository is four levels up.
    root = Path(repo) if repo is not None else Path(__file__).resolve().parents[3]
    return root.parent / "shared" / "k8s"


def unavailable_reason(binaries: Path | None = None) -> str | None:
    """Why a real cluster cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "a real cluster needs root (namespaces, mounts, cgroups)"
    b = binaries or binaries_dir()
    missing = [c for c in COMPONENTS if not (b / f"{c}.xz").is_file()]
    if missing:
        return f"no Kubernetes binaries in {b} ({', '.join(missing)}); set CSI_KIT_K8S_BINARIES"
    tools = [t for t in TOOLS if shutil.which(t) is None]
    if tools:
        return "missing tools: " + ", ".join(tools) + " (Debian: etcd-server containerd runc busybox-static)"
    if not (b / "crd").is_dir():
        return f"no snapshot CRDs in {b / 'crd'}"
    return None
