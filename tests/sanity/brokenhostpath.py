"""The real hostPath backend, subclassed to break it, served by the real
csi_kit driver while a command (the conformance suite) runs.

    python brokenhostpath.py --kind KIND --state DIR -- COMMAND ...

serves `unix://DIR/csi.sock` in this process, runs COMMAND, relays its
output and exits with its status.  test_catches_faults.py runs the whole line
under `unshare -m --propagation private`, so the broken node side can touch
no mount of the machine.
"""

from __future__ import annotations

import argparse
import os
import sys

import attrs

from csi_kit.backend import BackendContext
from csi_kit.linux.run import run
from csi_kit.testing.driver import running_driver
from csi_kit.types import CreatedVolume, PublishRequest, Snapshot, VolumeRequest
from csi_kit_backends.hostpath.backend import HostPathBackend


class EmptyRestore(HostPathBackend):
    """Restores a snapshot as an empty volume: data loss."""

    def restore_snapshot(self, volume_id: str, request: VolumeRequest, snapshot: Snapshot) -> CreatedVolume:
        return self.create_volume(volume_id, request)


class IgnoreReadonly(HostPathBackend):
    """Publishes read-write when asked for read-only.  (A backend can no
    longer leave a target behind: the framework makes and removes targets.)"""

    def node_publish(self, request: PublishRequest) -> None:
        super().node_publish(attrs.evolve(request, readonly=False))


KINDS: dict[str, type[HostPathBackend]] = {"empty-restore": EmptyRestore, "ignore-readonly": IgnoreReadonly}


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", required=True, choices=sorted(KINDS))
    ap.add_argument("--state", required=True)
    ns = ap.parse_args(argv[:cut])
    os.makedirs(ns.state, exist_ok=True)
    backend = KINDS[ns.kind](None, BackendContext("hostpath.csi-kit.io", "node-1", ns.state))
    with running_driver(ns.state, backend_object=backend):
        result = run(argv[cut + 1 :], check=False, timeout=3600)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.stdout.flush()
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
