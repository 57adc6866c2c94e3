"""Certificates at run time: the embedded CA in process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from agent.identity import pki
from agent.identity.ca import CertificateAuthority, WorkloadLocator
from agent.identity.spiffe import Identity
from agent.identity.workloadcert import WorkloadCertificate


def load_or_create_authority(cert: Path, key: Path, trust_domain: str) -> pki.Authority:
    """The embedded CA's root: loaded from files, or generated and written (key 0600)."""
    if cert.exists() and key.exists():
        return pki.Authority.from_pem(cert.read_bytes(), key.read_bytes())
    if cert.exists() or key.exists():
        raise FileNotFoundError(f"CA root: one of {cert} and {key} exists but not the other")
    auth = pki.Authority.generate(trust_domain)
    cert.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pki.key_to_pem(auth.key))
    cert.write_text("".join(pki.cert_to_pem(c) for c in auth.chain), encoding="ascii")
    return auth


@dataclass
class InProcessCa:
    """The manager's certificate source backed by the embedded CA, without a network hop.

    The CA still applies every check it applies on the wire (node placement, SAN, key, TTL).
    """

    ca: CertificateAuthority
    node: str
    ttl: timedelta

    async def issue(self, identity: Identity) -> WorkloadCertificate:
        key = pki.generate_key()
        chain = self.ca.sign(self.node, pki.build_csr(identity, key), int(self.ttl.total_seconds()))
        return WorkloadCertificate.from_pems(chain, key)


def embedded_ca(
    authority: pki.Authority, locator: WorkloadLocator, trust_domain: str, ttl: timedelta
) -> CertificateAuthority:
    return CertificateAuthority(
        authority, locator, trust_domain, max_ttl=max(ttl, timedelta(hours=24)), default_ttl=ttl
    )

