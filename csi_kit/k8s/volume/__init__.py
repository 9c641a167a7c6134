"""The volume loops: what upstream's external-provisioner, -attacher, -resizer and friends do.

Rule of the package: every name on the API objects is upstream's, byte for
byte, and defined once in `protocol` (annotations, finalizers, class
parameter keys, secret templates), so these loops and the upstream sidecars
can take over each other's objects on a live cluster.  It imports `objects`
and `runtime`, never the snapshot loops.

- `protocol` -- the PV/PVC/StorageClass/VolumeAttachment protocol, no I/O;
- `base` -- `VolumeLoop`, what every loop here holds (API, driver, secrets, polling);
- `provisioner` -- claims → CreateVolume → PVs and back, with `datasource`
  (restore and clone sources, their protection finalizers) and `pv` (the PV it writes);
- `attacher`, `resizer` (+ `modifier`, VolumeAttributesClass changes), `capacity`
  (CSIStorageCapacity), `health` (volume conditions as Events);
- `registration`, `liveness` -- the node-side kubelet registration and `/healthz`.
"""
