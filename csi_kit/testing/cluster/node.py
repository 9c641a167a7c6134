"""The node's fixed identity: its name, addresses and ports.

Fixed because nothing else shares the network namespace they live in (see
`csi_kit.testing.cluster.netns`): two clusters on one machine each have
their own copy of these addresses.
"""

from __future__ import annotations

__all__ = [
    "NODE_NAME",
    "NODE_IP",
    "PEER_IP",
    "SERVICE_CIDR",
    "API_PORT",
    "KUBELET_PORT",
    "API_URL",
]

NODE_NAME = "csi-kit-node"
NODE_IP = "10.213.0.2"
PEER_IP = "10.213.0.3"
SERVICE_CIDR = "10.213.128.0/24"
API_PORT = 6443
KUBELET_PORT = 10250
#: The API server as every kubeconfig names it.
API_URL = f"https://{NODE_IP}:{API_PORT}"
