"""Changed-block tracking through the real components: the snapshot-metadata loop
(upstream's external-snapshot-metadata) serving a backup application over TLS.

A loopfile raw block claim is written at known 4 KiB blocks by one pod,
snapshotted, written at more blocks by a second pod, snapshotted again.  A
backup client -- a ServiceAccount of the test namespace allowed to ``get
volumesnapshots``, its token from the TokenRequest API for the audience the
SnapshotMetadataService object names -- reads the object's address and CA and
calls the loop's endpoint from inside the cluster's network namespace
(`snapmeta_client.py`): GetMetadataDelta between the two snapshots names the
second pod's blocks, GetMetadataAllocated of the second snapshot names all of
them.  The real kube-apiserver answers the loop's TokenReview (a token for
another audience: UNAUTHENTICATED) and SubjectAccessReview (a ServiceAccount
without the grant: PERMISSION_DENIED).  The serving certificate is signed by
the cluster's CA, which the SnapshotMetadataService object carries.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DEPLOY, Deployments, timed
from e2e_walk import SNAP, Flavor, Walk

from csi_kit.linux.run import run
from csi_kit.testing.cluster import NODE_IP, Cluster, load_manifests

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

FLAVOR = Flavor("loopfile snapshot-metadata", "loopfile", "csi-kit-loopfile", block=True)
CONTROLLERS = "snapshot,provisioner,resizer,capacity,registration,liveness,snapshot-metadata"
DRIVER = "loopfile.csi-kit.io"
SMS = f"/apis/cbt.storage.k8s.io/v1beta1/snapshotmetadataservices/{DRIVER}"
CRD = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/snapshotmetadataservices.cbt.storage.k8s.io"
PORT = 50051
BLOCK = 4096
GRANULARITY = 64 * 1024  # what the conformance suite allows a VARIABLE_LENGTH answer beyond the writes
CLIENT = Path(__file__).with_name("snapmeta_client.py")
# Blocks (in 4 KiB units: first, count) each pod writes with random data.
FIRST = [(0, 1), (256, 2), (1280, 1)]
SECOND = [(257, 1), (768, 1), (10240, 4)]  # 257 overwrites one block of the first pod's pair


def _serving_certificate(cluster: Cluster) -> tuple[Path, Path]:
    """A certificate for the node's address signed by the cluster's CA: (cert, key)."""
    d = cluster.work / "snapshot-metadata-tls"
    d.mkdir(exist_ok=True)
    cert, key, csr = d / "tls.crt", d / "tls.key", d / "tls.csr"
    if cert.exists():
        return cert, key
    run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", "/CN=csi-kit-snapshot-metadata",
         "-addext", f"subjectAltName=IP:{NODE_IP}"])  # fmt: skip
    run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(cluster.pki / "ca.crt"),
         "-CAkey", str(cluster.pki / "ca.key"), "-CAcreateserial", "-days", "1",
         "-copy_extensions", "copy", "-out", str(cert)])  # fmt: skip
    return cert, key


@pytest.fixture
def walk(cluster: Cluster, deployments: Deployments) -> Iterator[Walk]:
    cert, key = _serving_certificate(cluster)
    deployments.get(
        "loopfile",
        CONTROLLERS,
        extra_env={
            "CSI_KIT_SNAPSHOT_METADATA_ADDRESS": f"{NODE_IP}:{PORT}",
            "CSI_KIT_SNAPSHOT_METADATA_TLS_CERT": str(cert),
            "CSI_KIT_SNAPSHOT_METADATA_TLS_KEY": str(key),
        },
        extra_manifests=("rbac-snapshot-metadata.yaml", "snapshotmetadataservice-crd.yaml"),
    )
    cluster.api.wait(
        CRD,
        lambda c: any(x["type"] == "Established" and x["status"] == "True"
                      for x in ((c or {}).get("status") or {}).get("conditions", [])),
        "the SnapshotMetadataService CRD established",
        30,
    )  # fmt: skip
    # The sample object, pointed at the node's endpoint and carrying the cluster's CA.
    (sms,) = [d for d in load_manifests(DEPLOY / "loopfile" / "snapshotmetadataservice.yaml")
              if d["kind"] == "SnapshotMetadataService"]  # fmt: skip
    sms["spec"]["address"] = f"{NODE_IP}:{PORT}"
    sms["spec"]["caCert"] = base64.b64encode((cluster.pki / "ca.crt").read_bytes()).decode()
    cluster.api.apply(sms)
    w = Walk(cluster, FLAVOR, "e2e-snapmeta")
    try:
        yield w
    finally:
        w.cleanup()
        cluster.api.delete(SMS)


def _write(w: Walk, pod: str, blocks: list[tuple[int, int]]) -> None:
    """A pod that writes random data at `blocks` of the claim's device, flushed, then exits."""
    dd = "; ".join(
        f"dd if=/dev/urandom of=/dev/xvda bs={BLOCK} seek={first} count={n} conv=notrunc,fsync 2>/dev/null"
        for first, n in blocks
    )
    w.pod(pod, "data", f"set -e; {dd}; sync; echo written")
    w.wait_pod(pod, ("Succeeded",))
    assert "written" in w.log(pod)


def _snapshot(w: Walk, name: str) -> str:
    """Take VolumeSnapshot `name` of the claim; its CSI handle once ready."""
    w.snapshot(name, "data")
    snap = w.wait_ready("volumesnapshot", name)
    content = w.api.get(f"{SNAP}/volumesnapshotcontents/{snap['status']['boundVolumeSnapshotContentName']}")
    return str(content["status"]["snapshotHandle"])


def _service_account(w: Walk, name: str, *, may_get_snapshots: bool) -> None:
    w.api.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": w.ns}})
    if not may_get_snapshots:
        return
    rbac = "rbac.authorization.k8s.io/v1"
    w.api.apply({
        "apiVersion": rbac, "kind": "Role", "metadata": {"name": name, "namespace": w.ns},
        "rules": [{"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshots"],
                   "verbs": ["get"]}],
    })  # fmt: skip
    w.api.apply({
        "apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": name, "namespace": w.ns},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": w.ns}],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
    })  # fmt: skip


def _token(w: Walk, account: str, audience: str, label: str) -> Path:
    """A TokenRequest token of `account` for `audience`, in a file (tokens never go on a command line)."""
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": [audience], "expirationSeconds": 600},
    }
    answer = w.api.request("POST", f"/api/v1/namespaces/{w.ns}/serviceaccounts/{account}/token", request)
    path = w.cluster.work / f"snapmeta-token.{label}"
    path.write_text(answer["status"]["token"])
    path.chmod(0o600)
    return path


def _call(w: Walk, service: dict[str, Any], calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the backup client inside the cluster's network namespace; its answers."""
    ca = w.cluster.work / "snapshot-metadata-ca.crt"
    ca.write_bytes(base64.b64decode(service["spec"]["caCert"]))
    spec = w.cluster.work / "snapmeta-calls.json"
    spec.write_text(json.dumps({"address": service["spec"]["address"], "ca": str(ca), "calls": calls}))
    out = w.cluster.run([sys.executable, str(CLIENT), str(spec)], timeout=120)
    answers: list[dict[str, Any]] = json.loads(out.stdout)
    return answers


def _covered(ranges: list[list[int]]) -> set[int]:
    """The 4 KiB blocks the ranges touch."""
    return {b for offset, length in ranges for b in range(offset // BLOCK, -(-(offset + length) // BLOCK))}


def _blocks(writes: list[tuple[int, int]]) -> set[int]:
    return {b for first, count in writes for b in range(first, first + count)}


def _near(covered: set[int], written: set[int]) -> set[int]:
    """Blocks of `covered` farther than the granularity from every written block."""
    reach = GRANULARITY // BLOCK
    return {b for b in covered if not any(abs(b - x) < reach for x in written)}


def test_a_backup_client_reads_the_changed_blocks(walk: Walk) -> None:
    w = walk
    w.claim("data", size="64Mi")
    _write(w, "first", FIRST)
    base = _snapshot(w, "before")
    _write(w, "second", SECOND)
    _snapshot(w, "after")
    _service_account(w, "backup", may_get_snapshots=True)
    _service_account(w, "nosy", may_get_snapshots=False)
    service = w.api.get(SMS)  # what a backup application starts from
    audience = service["spec"]["audience"]
    good = str(_token(w, "backup", audience, "good"))
    nosy_token = str(_token(w, "nosy", audience, "nosy"))
    api_token = str(_token(w, "backup", "https://kubernetes.default.svc", "api"))  # the API server's audience
    calls: list[dict[str, Any]] = [
        {"method": "delta", "token_file": good, "namespace": w.ns, "base_snapshot_id": base,
         "target_snapshot_name": "after"},
        {"method": "allocated", "token_file": good, "namespace": w.ns, "snapshot_name": "after"},
        {"method": "delta", "token_file": good, "namespace": w.ns, "base_snapshot_id": base,
         "target_snapshot_name": "after", "max_results": 1},
        {"method": "allocated", "token_file": nosy_token, "namespace": w.ns,
         "snapshot_name": "after"},
        {"method": "allocated", "token_file": api_token,
         "namespace": w.ns, "snapshot_name": "after"},
    ]  # fmt: skip
    with timed("snapshot-metadata: delta, allocated and refusals over TLS", FLAVOR.name):
        delta, allocated, paged, nosy, elsewhere = _call(w, service, calls)
    assert delta["ok"], delta
    assert delta["type"] == "VARIABLE_LENGTH" and delta["capacity"] == 64 << 20
    changed = _covered(delta["ranges"])
    assert _blocks(SECOND) <= changed, f"the delta misses written blocks: {delta['ranges']}"
    assert not _near(changed, _blocks(SECOND)), f"the delta names blocks nobody wrote: {delta['ranges']}"
    assert 0 not in changed and 1280 not in changed, "blocks written before the base are not changes"
    assert allocated["ok"], allocated
    held = _covered(allocated["ranges"])
    assert _blocks(FIRST) | _blocks(SECOND) <= held
    assert not _near(held, _blocks(FIRST) | _blocks(SECOND)), allocated["ranges"]
    assert paged["ok"] and paged["messages"] == len(paged["ranges"]) and paged["ranges"] == delta["ranges"]
    assert (nosy["ok"], nosy.get("code")) == (False, "PERMISSION_DENIED"), nosy
    assert "system:serviceaccount:e2e-snapmeta:nosy" in nosy["details"]
    assert (elsewhere["ok"], elsewhere.get("code")) == (False, "UNAUTHENTICATED"), elsewhere
