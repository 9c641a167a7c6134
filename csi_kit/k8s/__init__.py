"""Kubernetes loops for csi_kit drivers, and the runtime they share.

The runtime -- `api` (the narrow API interface), `lightkube_api` (production
adapter), `informer`, `workqueue`, `leader`, `ratelimit`, `loop`, `metrics`,
`events` -- is reused by every loop; `snapshot` holds the snapshot controller
and snapshotter; `cli` is what `csi-kit serve/controllers` calls.  The loops
reach drivers only through CSI gRPC (`csi_client`), never through csi_kit's
internals, so they work with any CSI driver.  See docs/k8s.md.
"""
