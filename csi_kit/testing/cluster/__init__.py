"""A real one-node Kubernetes cluster for tests: control plane, kubelet, containerd.

The in-memory fake API and the kubelet simulator agree with csi_kit because
they were written with it; this harness runs the real components instead, so
a driver built on csi_kit can be driven by a real kubelet through real pods::

    with Cluster(binaries_dir()) as cluster:
        cluster.apply_file("examples/deploy/hostpath/rbac.yaml")
        driver = cluster.spawn("driver", ["csi-kit", "serve", ...])
        cluster.api.create({"apiVersion": "v1", "kind": "Pod", ...})

etcd, kube-apiserver, kube-controller-manager, kube-scheduler (v1.36
binaries from ``shared/k8s``, decompressed into the work directory, never
into the repository), containerd with runc and a kubelet run as plain
processes of the harness, in a network and a mount namespace of its own.
`unavailable_reason` tells a test suite why it must skip (not root,
binaries or tools missing).

The package's rule: one module per concern, each importable on its own, and
this file only re-exports what importers use.

- `requirements`: where the binaries are, what the machine must have;
- `node`: the node's fixed name, addresses and ports;
- `netns`: the namespaces, the mounts and cgroups inside, reaching into them;
- `pki`: certificates and kubeconfigs (``openssl``);
- `images`: the busybox and pause images, built locally;
- `components`: each component's command line and configuration;
- `api`: the HTTPS JSON client, object paths, manifests;
- `teardown`: removing every process, mount, loop device and cgroup;
- `cluster`: `Cluster`, which starts the components in order and stops them.
"""

from __future__ import annotations

from csi_kit.testing.cluster.api import ApiClient, ApiError, load_manifests
from csi_kit.testing.cluster.cluster import Cluster, running_cluster
from csi_kit.testing.cluster.images import BUSYBOX_IMAGE
from csi_kit.testing.cluster.node import NODE_IP, NODE_NAME
from csi_kit.testing.cluster.requirements import binaries_dir, unavailable_reason

__all__ = [
    "ApiError",
    "Cluster",
    "ApiClient",
    "binaries_dir",
    "unavailable_reason",
    "running_cluster",
    "load_manifests",
    "BUSYBOX_IMAGE",
    "NODE_IP",
    "NODE_NAME",
]
