"""Where a CreateVolume+DeleteVolume pair's time goes, part by part.

Starts ``csi-kit serve`` (hostPath, default settings; state directory on
tmpfs unless ``--dir`` names another place) with ``CSI_KIT_TIMING`` set, so
that the engine, the store and the gRPC wrapper count the time of each part
of every call (`csi_kit._core.timing`; nothing is counted without it).  One
client sends the pairs; the driver is stopped with SIGTERM and writes its
counters; the table shows each part per pair, and "gRPC, client and
servicer" is what the client measured minus what the handlers measured.

No root needed.  Run::

    .venv/bin/python benchmarks/create_delete_profile.py [--pairs 2000] [--dir /dev/shm]
        [--durability power|process]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from _bench import Client, header, load_average

from csi_kit.testing.driver import driver_process

#: Parts inside a handler, in the order of a call; the rest of a handler is engine code on
#: the event loop (conversion, engine plumbing, futures).
_INSIDE = (
    "validation",
    "lock",
    "hand-off to a worker",
    "store: read",
    "store: write",
    "store: flush",
    "backend",
    "hand-off back to the loop",
    "metrics",
    "logging",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--dir", default="/dev/shm", help="where the state directory goes")
    parser.add_argument("--durability", default="power", choices=["power", "process"])
    args = parser.parse_args()
    header("CreateVolume+DeleteVolume: where a pair's time goes")
    state = tempfile.mkdtemp(dir=args.dir, prefix="csi-kit-bench-profile-")
    counters = os.path.join(state, "timing.json")
    os.environ["CSI_KIT_TIMING"] = counters  # for the child only: this process imports no engine
    try:
        with (
            driver_process(state, extra_args=["--durability", args.durability]) as proc,
            Client(proc.endpoint) as client,
        ):
            del os.environ["CSI_KIT_TIMING"]
            for i in range(100):
                client.delete_volume(client.create_volume(f"warmup-{i}"))
            lat = []
            start = time.perf_counter()
            for i in range(args.pairs):
                t0 = time.perf_counter()
                client.delete_volume(client.create_volume(f"pair-{i}"))
                lat.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - start
        with open(counters) as f:
            parts = json.load(f)
    finally:
        os.environ.pop("CSI_KIT_TIMING", None)
        shutil.rmtree(state, ignore_errors=True)
    # The counters include the warm-up pairs: divide by the pairs the handlers counted.
    calls = parts["handler"]["count"]
    total_pairs = calls / 2
    per_pair = {k: v["ns"] / total_pairs / 1000 for k, v in parts.items()}
    pair_us = elapsed / args.pairs * 1e6
    print(
        f"   {args.pairs} pairs, state on {args.dir}, --durability {args.durability}: "
        f"{args.pairs / elapsed:.0f} pairs/s, mean {pair_us:.0f} us, "
        f"p50 {statistics.median(lat) * 1e6:.0f} us  [load {load_average()}]"
    )
    print(f"   {'part':44s} {'us/pair':>8s} {'share':>6s}")
    inside = 0.0
    for part in _INSIDE:
        us = per_pair.get(part, 0.0)
        inside += us
        print(f"   {part:44s} {us:8.1f} {us / pair_us:6.1%}")
    handler = per_pair["handler"]
    loop_rest = handler - inside
    print(
        f"   {'engine and servicer code on the event loop':44s} {loop_rest:8.1f} {loop_rest / pair_us:6.1%}"
    )
    grpc_part = pair_us - handler
    print(
        f"   {'gRPC, client and servicer (outside handlers)':44s} {grpc_part:8.1f} {grpc_part / pair_us:6.1%}"
    )
    print(f"   {'total (client-measured mean)':44s} {pair_us:8.1f}")
    print(f"   load average now {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
