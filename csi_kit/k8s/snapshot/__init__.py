"""The volume-snapshot loops: what upstream's snapshot-controller and csi-snapshotter do.

Rule of the package: every name on the API objects is upstream's, byte for
byte, and defined once in `protocol` (finalizers, annotations, content and
member names, class parameters, secret templates), so these loops and the
upstream ones can take over each other's objects on a live cluster.  It
imports `objects` and `runtime`, never the volume loops.

- `protocol` -- the object protocol, no I/O;
- `writes` -- the write rules every loop follows (one `Writer` per kind);
- `controller` / `snapshotter` -- single snapshots (the common controller,
  and the sidecar that calls the driver);
- `group_controller` / `group_snapshotter` -- the same pair for volume group
  snapshots; `content_loop` holds what both snapshotters share;
- `metadata` (+ `tls`) -- the SnapshotMetadata service for backup
  applications (external-snapshot-metadata).
"""
