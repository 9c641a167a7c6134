"""Test kit for csi_kit and for drivers built on it.

- `csi_kit.testing.driver`: start a real driver (thread or process) on a unix socket.
- `csi_kit.testing.sanity`: the conformance suite (``csi-kit sanity``), also a
  pytest plugin through the ``pytest11`` entry point (`csi_kit.testing.pytest_plugin`).
- `csi_kit.testing.fsimage`: a loop-mounted XFS/ext4 filesystem for tests.
- `csi_kit.testing.fake_k8s`: an in-memory Kubernetes API with real semantics.
"""
