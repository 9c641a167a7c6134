"""The volume-snapshot loops: `controller` (what upstream's snapshot-controller does)
and `sidecar` (what upstream's csi-snapshotter does), over the shared `protocol`."""
