"""The mesh trust bundle as a file the operator (or a ConfigMap mount) rewrites, re-read on change.

The file holds one or more PEM root certificates. Rotating the root without downtime relies on
it holding old and new roots at once (docs/install.md, "Rotating the root"): agents trust both
while certificates from either are live, and a root that leaves the file stops being trusted
(certificates chaining to it are renewed at once).

A file that does not parse keeps the last good bundle: a half-written or broken bundle must
never empty the trust store (that would refuse every peer) or add garbage to it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from agent.identity import pki

log = logging.getLogger(__name__)


class TrustBundleError(ValueError):
    """The bundle file cannot be used; the message names the file and the cause."""


def read_pem_bundle(path: Path) -> tuple[str, ...]:
    """The root certificates in path, each as its own PEM; at least one, all CA certificates."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TrustBundleError(f"{path}: cannot read the trust bundle: {e.strerror or e}") from e
    try:
        certs = pki.certs_from_pem(data)
    except ValueError as e:
        raise TrustBundleError(f"{path}: not a PEM bundle of certificates: {e}") from e
    # The parser skips a block it cannot complete (a file caught mid-write): count them.
    blocks = data.count(b"-----BEGIN ")
    if blocks != len(certs):
        raise TrustBundleError(f"{path}: {blocks} PEM blocks but {len(certs)} complete "
                               "certificates (truncated, or a block that is not a certificate)")
    for i, cert in enumerate(certs, start=1):
        if not pki.is_ca(cert):
            raise TrustBundleError(f"{path}: certificate {i} ({cert.subject.rfc4514_string()}) "
                                   "is not a CA certificate (basicConstraints CA:TRUE)")
    return tuple(dict.fromkeys(pki.cert_to_pem(c) for c in certs))


class TrustBundleFile:
    """Polls a PEM bundle file; `poll()` answers the new bundle when its content changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bundle = read_pem_bundle(path)  # the first read must succeed: fail closed at start
        self._digest = self._hash()
        self.errors = 0  # rejected rewrites (a metric)

    def _hash(self) -> bytes:
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return b""

    def poll(self) -> tuple[str, ...] | None:
        digest = self._hash()
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            bundle = read_pem_bundle(self.path)
        except TrustBundleError as e:
            self.errors += 1
            log.error("%s; keeping the last good trust bundle (%d root(s))", e, len(self.bundle))
            return None
        if bundle == self.bundle:
            return None
        self.bundle = bundle
        return bundle
