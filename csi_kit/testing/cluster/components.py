"""How each component is started: its command line and configuration, nothing else.

What runs, all as plain processes of the harness (`Cluster.start` starts
them, in this order): etcd, kube-apiserver, containerd with runc,
kube-controller-manager, kube-scheduler and the kubelet.  The Kubernetes
binaries are the ones `Cluster` decompressed into ``<work>/bin``; etcd and
containerd come from the machine's PATH.  Every path named here is under
the work directory or the namespaces' own tmpfs, never the machine's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from csi_kit.testing.cluster.images import PAUSE_IMAGE
from csi_kit.testing.cluster.node import API_PORT, KUBELET_PORT, NODE_IP, NODE_NAME, SERVICE_CIDR

__all__ = [
    "etcd_argv",
    "apiserver_argv",
    "audit_policy",
    "controller_manager_argv",
    "scheduler_argv",
    "containerd_config",
    "kubelet_config",
    "kubelet_argv",
]


def etcd_argv(work: Path) -> list[str]:
    url = "http://127.0.0.1:2379"
    return [
        "etcd",
        "--name=e2e",
        f"--data-dir={work}/etcd",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        "--listen-peer-urls=http://127.0.0.1:2380",
        "--initial-advertise-peer-urls=http://127.0.0.1:2380",
        "--initial-cluster=e2e=http://127.0.0.1:2380",
        "--log-level=warn",
    ]


def apiserver_argv(work: Path, p: Path, *, audit: bool = False) -> list[str]:
    """The API server, its certificates in `p`; with `audit`, an audit log (`audit_policy`) in ``logs/``."""
    audit_flags = (
        [f"--audit-policy-file={work}/audit-policy.yaml", f"--audit-log-path={work}/logs/audit.log"]
        if audit
        else []
    )
    return [
        str(work / "bin/kube-apiserver"),
        "--etcd-servers=http://127.0.0.1:2379",
        f"--bind-address={NODE_IP}",
        f"--advertise-address={NODE_IP}",
        f"--secure-port={API_PORT}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--authorization-mode=Node,RBAC",
        f"--client-ca-file={p}/ca.crt",
        f"--tls-cert-file={p}/apiserver.crt",
        f"--tls-private-key-file={p}/apiserver.key",
        f"--service-account-key-file={p}/sa.pub",
        f"--service-account-signing-key-file={p}/sa.key",
        "--service-account-issuer=https://kubernetes.default.svc",
        "--api-audiences=https://kubernetes.default.svc",
        f"--kubelet-client-certificate={p}/admin.crt",
        f"--kubelet-client-key={p}/admin.key",
        f"--kubelet-certificate-authority={p}/ca.crt",
        "--kubelet-preferred-address-types=InternalIP",
        "--enable-admission-plugins=NodeRestriction",
        "--allow-privileged=true",
        "--profiling=false",
        "--enable-priority-and-fairness=false",
        "--endpoint-reconciler-type=none",
        *audit_flags,
    ]


def audit_policy() -> dict[str, Any]:
    """Every request at Metadata level (who, which agent, verb, object; no bodies), once it is answered.

    RequestReceived is left out so each request is one line (a watch gets a
    ResponseStarted line when it opens and a ResponseComplete one when it ends).
    """
    return {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [{"level": "Metadata"}],
    }


def controller_manager_argv(work: Path, p: Path) -> list[str]:
    return [
        str(work / "bin/kube-controller-manager"),
        f"--kubeconfig={work / 'admin.kubeconfig'}",
        "--leader-elect=false",
        f"--service-account-private-key-file={p}/sa.key",
        f"--root-ca-file={p}/ca.crt",
        "--use-service-account-credentials=false",
    ]


def scheduler_argv(work: Path) -> list[str]:
    return [
        str(work / "bin/kube-scheduler"),
        f"--kubeconfig={work / 'admin.kubeconfig'}",
        "--leader-elect=false",
    ]


def containerd_config(work: Path) -> str:
    """containerd's TOML: state on the namespace's /run, the CRI plugin with our pause image."""
    return f"""version = 2
root = "{work}/containerd/root"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{work}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{work}/cni/bin"
    conf_dir = "{work}/cni/net.d"
"""


def kubelet_config(work: Path, p: Path, cgroup_root: str) -> dict[str, Any]:
    """The KubeletConfiguration: cgroup v1 under `cgroup_root`, serving certificate from `p`."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroup_root,
        "protectKernelDefaults": True,
        "address": NODE_IP,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzPort": 0,
        "tlsCertFile": f"{p}/kubelet-serving.crt",
        "tlsPrivateKeyFile": f"{p}/kubelet-serving.key",
        "authentication": {
            "x509": {"clientCAFile": f"{p}/ca.crt"},
            "webhook": {"enabled": True},
            "anonymous": {"enabled": False},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{work}/containerd.sock",
        "resolvConf": f"{work}/resolv.conf",
        "failSwapOn": False,
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # The volume stats the kubelet reports (and asks the driver for): every 10 s, not every minute.
        "volumeStatsAggPeriod": "10s",
        "syncFrequency": "10s",
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
    }


def kubelet_argv(work: Path, kubelet_root: Path) -> list[str]:
    """The kubelet, reading ``<work>/kubelet.yaml`` (`kubelet_config`)."""
    return [
        str(work / "bin/kubelet"),
        f"--config={work}/kubelet.yaml",
        f"--kubeconfig={work}/kubelet.kubeconfig",
        f"--root-dir={kubelet_root}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={NODE_IP}",
        "--v=2",
    ]
