"""Kubernetes object helpers with no I/O: the bottom layer of `csi_kit.k8s`.

Rule: nothing here talks to an API server, a driver or the clock's future --
pure functions over the JSON dicts the API sends (metadata accessors,
quantities, RFC 3339 times, finalizer patches, label selectors, DNS-1123
names, `${...}` templates).  Every loop uses these; each exists once.
"""
