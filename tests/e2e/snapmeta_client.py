"""A backup application's side of changed-block tracking, for the real-cluster test.

Run inside the cluster's network namespace (the endpoint listens there)::

    python snapmeta_client.py CALLS.json

CALLS.json holds ``{"address": "host:port", "ca": "/path/ca.crt", "calls": [...]}``;
each call is ``{"method": "allocated"|"delta", "token_file": ..., "namespace": ...,
"snapshot_name": ...}`` (allocated) or ``{..., "base_snapshot_id": ...,
"target_snapshot_name": ...}`` (delta), optionally ``"max_results"``.  Tokens
travel in files, never on the command line.  Every call is made on one TLS
channel that trusts only the given CA and checks the address's host against
the certificate.  Prints one JSON list, one entry per call: ``{"ok": true,
"type": "VARIABLE_LENGTH", "capacity": N, "messages": N, "ranges": [[offset,
length], ...]}`` or ``{"ok": false, "code": "PERMISSION_DENIED", "details": ...}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import grpc

from csi_kit._pb import snapshot_metadata_pb2 as kpb
from csi_kit._pb import snapshot_metadata_pb2_grpc as kpbg


def _request(call: dict[str, Any]) -> tuple[str, Any]:
    token = Path(call["token_file"]).read_text().strip()
    common = {
        "security_token": token,
        "namespace": call["namespace"],
        "max_results": call.get("max_results", 0),
    }
    if call["method"] == "allocated":
        return "GetMetadataAllocated", kpb.GetMetadataAllocatedRequest(
            snapshot_name=call["snapshot_name"], **common
        )
    return "GetMetadataDelta", kpb.GetMetadataDeltaRequest(
        base_snapshot_id=call["base_snapshot_id"], target_snapshot_name=call["target_snapshot_name"], **common
    )


def _call(stub: Any, call: dict[str, Any]) -> dict[str, Any]:
    method, request = _request(call)
    try:
        answers = list(getattr(stub, method)(request, timeout=60))
    except grpc.RpcError as e:
        return {"ok": False, "code": e.code().name, "details": e.details()}
    return {
        "ok": True,
        "type": kpb.BlockMetadataType.Name(answers[0].block_metadata_type) if answers else "",
        "capacity": answers[0].volume_capacity_bytes if answers else 0,
        "messages": len(answers),
        "ranges": [[b.byte_offset, b.size_bytes] for a in answers for b in a.block_metadata],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: snapmeta_client.py CALLS.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    creds = grpc.ssl_channel_credentials(root_certificates=Path(spec["ca"]).read_bytes())
    with grpc.secure_channel(spec["address"], creds) as channel:
        # The loop starts its server a moment after the driver registers: wait for it.
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = kpbg.SnapshotMetadataStub(channel)
        print(json.dumps([_call(stub, c) for c in spec["calls"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
