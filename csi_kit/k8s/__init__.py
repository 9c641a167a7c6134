"""Kubernetes loops for csi_kit drivers, laid out in layers (import-linter checks them).

- `objects`: pure helpers over Kubernetes objects; no I/O.
- `runtime`: what every loop stands on -- the API interface and its adapter,
  informers, work queues, Lease election, budgets (`clients`), Events, the one
  CSI client (`csi`), the `Loop` base and what a loop factory is given
  (`context`).
- `volume` and `snapshot`: the two loop families, which never import each
  other; each loop module ends with its factory, `build(ctx)`.
- `registry` (every loop, its factory and options, listed once) and `cli`
  (what `csi-kit serve/controllers` call): the wiring, on top.

The loops reach drivers only through CSI gRPC (`runtime.csi.CSIClient`), never
through csi_kit's internals, so they work with any CSI driver.  See
docs/k8s.md and docs/k8s-volume-loops.md.
"""
