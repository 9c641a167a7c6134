"""The Kubernetes runtime every loop stands on.

Rule of the package: it knows how to reach the API server and a CSI driver,
never what a PV or a snapshot means (that is the loop families' protocol
modules) -- so it imports only `objects`, and both families build on it.

- `api` -- the narrow KubeAPI interface the loops are written against, and
  `lightkube` its production adapter (a User-Agent per sender);
- `clients` -- one process's API access: a budget (token buckets from
  `ratelimit`) and a User-Agent per loop, the shared informers, one Events path;
- `informer` -- list+watch caches, one per resource for the whole process
  (`InformerFactory`), each loop with its own handlers; `workqueue` -- keys
  with backoff; `controller` -- the `Loop` base that joins the two;
- `events` -- the one Events recorder (queued, aggregated, never delaying a write);
- `leader` -- Lease election; `csi` -- the one CSI client; `context` -- what
  a loop factory is given; `metrics`, `options` (environment defaults).
"""
