"""The snapshot-metadata service's TLS files, and the key pair reloaded when they change.

The serving certificate and key are files (a mounted Secret, renewed by
cert-manager or by hand): `CertificateReloader` looks at them at every TLS
handshake (one ``stat`` each) and loads a changed pair for the following
connections, as upstream's certificate watcher does; a pair that does not
load (half-written, key and certificate that do not match) is refused with
one warning and the last good pair keeps serving.  Connections already open
keep the certificate they were made with.  No Kubernetes here: files, ``ssl``
and gRPC's credentials only.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from typing import Any

import attrs
import grpc

log = logging.getLogger(__name__)


@attrs.frozen
class TLSFiles:
    """The serving certificate (chain) and key, and the CA bundle advertised in spec.caCert."""

    cert: str
    key: str
    ca: str = ""


def _no_password() -> str:
    raise ValueError("the key is encrypted (the service needs an unencrypted key)")


#: (device, inode, size, mtime) of the certificate and of the key: a changed pair changes one of them.
_Fingerprint = tuple[tuple[int, int, int, int], tuple[int, int, int, int]]


class CertificateReloader:
    """The serving key pair for gRPC, re-read whenever its files change.

    `fetch` is gRPC's certificate-configuration fetcher: gRPC calls it (from
    its own threads) at the start of every TLS handshake.  It costs two
    ``stat`` calls; when the files changed it loads them, checks with the
    ``ssl`` module that the key matches the certificate, and hands gRPC the
    new pair for this and later connections.  A pair that does not load is
    logged once and the pair in use stays; the next change is tried again.
    """

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._serving: _Fingerprint | None = None
        self._refused: _Fingerprint | None = None
        #: Pairs loaded so far (1 after construction).
        self.loads = 0
        try:
            fp = self._fingerprint()
        except OSError as e:
            raise ValueError(f"TLS certificate {files.cert} with key {files.key}: {e.strerror}") from None
        self.initial = self._load(fp)
        self._serving = fp

    def _fingerprint(self) -> _Fingerprint:
        c, k = os.stat(self.files.cert), os.stat(self.files.key)
        return (
            (c.st_dev, c.st_ino, c.st_size, c.st_mtime_ns),
            (k.st_dev, k.st_ino, k.st_size, k.st_mtime_ns),
        )

    def _load(self, fp: _Fingerprint) -> Any:
        """The pair as a gRPC configuration; ValueError (one line) when it is unusable."""
        try:
            with open(self.files.cert, "rb") as f:
                cert = f.read()
            with open(self.files.key, "rb") as f:
                key = f.read()
            # Parses both PEM files and checks that the key belongs to the certificate; an
            # encrypted key fails here instead of OpenSSL prompting on a terminal.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                self.files.cert, self.files.key, password=_no_password
            )
            if self._fingerprint() != fp:
                raise ValueError("the files changed while they were read")
        except ssl.SSLError as e:  # before OSError, its base class
            raise ValueError(
                f"TLS certificate {self.files.cert} with key {self.files.key}: {e.reason or e}"
            ) from None
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise ValueError(
                f"TLS certificate {self.files.cert} with key {self.files.key}: {reason or e}"
            ) from None
        self.loads += 1
        return grpc.ssl_server_certificate_configuration([(key, cert)])

    def fetch(self) -> Any:
        """A new configuration when the files changed into a usable pair, else None (keep the current one)."""
        with self._lock:
            try:
                fp = self._fingerprint()
            except OSError as e:
                if self._refused is None:
                    log.warning("snapshot-metadata: TLS files unreadable, serving the last pair: %s", e)
                self._refused = self._serving  # quiet until the files change again
                return None
            if fp in (self._serving, self._refused):
                return None
            try:
                config = self._load(fp)
            except ValueError as e:
                self._refused = fp
                log.warning("snapshot-metadata: not reloading: %s; serving the last good pair", e)
                return None
            self._serving, self._refused = fp, None
            log.info("snapshot-metadata: loaded the renewed TLS certificate %s", self.files.cert)
            return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch)
