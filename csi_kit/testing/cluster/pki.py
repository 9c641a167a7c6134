"""The cluster's certificates and kubeconfigs, made with ``openssl``.

`make_pki` writes, into one directory: a CA; serving certificates for the
API server and the kubelet; client certificates for the admin
(``system:masters``) and the kubelet (``system:nodes``); the service-account
signing key.  All EC P-256, valid 7 days, never leaving the work directory.
`write_kubeconfig` makes a kubeconfig from a client certificate or a token.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from csi_kit.linux.run import run
from csi_kit.testing.cluster.node import API_URL, NODE_IP, NODE_NAME, SERVICE_CIDR

__all__ = ["make_pki", "write_kubeconfig"]

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def make_pki(p: Path, work: Path) -> None:
    """Every key and certificate in `p`; ``admin.kubeconfig`` and ``kubelet.kubeconfig`` in `work`."""
    run(
        [
            "openssl",
            "req",
            "-x509",
            *_EC,
            "-keyout",
            f"{p}/ca.key",
            "-out",
            f"{p}/ca.crt",
            "-days",
            "7",
            "-subj",
            "/CN=csi-kit-e2e-ca",
        ]
    )
    san = f"subjectAltName=IP:{NODE_IP},IP:127.0.0.1,IP:{SERVICE_CIDR.split('/')[0][:-1]}1,DNS:kubernetes"
    certs = {  # file: (subject, extension)
        "apiserver": ("/CN=kube-apiserver", san),
        "kubelet-serving": (f"/CN=system:node:{NODE_NAME}", f"subjectAltName=IP:{NODE_IP}"),
        "admin": ("/O=system:masters/CN=csi-kit-e2e-admin", None),
        "kubelet": (f"/O=system:nodes/CN=system:node:{NODE_NAME}", None),
    }
    for name, (subj, ext) in certs.items():
        run(
            [
                "openssl",
                "req",
                "-new",
                *_EC,
                "-keyout",
                f"{p}/{name}.key",
                "-out",
                f"{p}/{name}.csr",
                "-subj",
                subj,
                *(["-addext", ext] if ext else []),
            ]
        )
        run(
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                f"{p}/{name}.csr",
                "-CA",
                f"{p}/ca.crt",
                "-CAkey",
                f"{p}/ca.key",
                "-CAcreateserial",
                "-days",
                "7",
                "-copy_extensions",
                "copy",
                "-out",
                f"{p}/{name}.crt",
            ]
        )
    run(
        [
            "openssl",
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            f"{p}/sa.key",
        ]
    )
    run(["openssl", "pkey", "-in", f"{p}/sa.key", "-pubout", "-out", f"{p}/sa.pub"])
    write_kubeconfig(work / "admin.kubeconfig", p / "ca.crt", cert=p / "admin.crt", key=p / "admin.key")
    write_kubeconfig(work / "kubelet.kubeconfig", p / "ca.crt", cert=p / "kubelet.crt", key=p / "kubelet.key")


def write_kubeconfig(
    path: Path,
    ca: Path,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
) -> Path:
    """A kubeconfig (mode 0600) for the cluster's API server with a token or a client certificate."""
    user: dict[str, str] = (
        {"token": token} if token else {"client-certificate": str(cert), "client-key": str(key)}
    )
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": API_URL, "certificate-authority": str(ca)}}],
        "users": [{"name": "e2e", "user": user}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
        "current-context": "e2e",
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path
