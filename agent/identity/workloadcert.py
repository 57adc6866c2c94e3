"""A workload's certificate: identity, PEM chain (leaf first, root last) and private key."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509

from agent.identity import pki, tlsmem
from agent.identity.spiffe import Identity, from_certificate

DEFAULT_TTL = timedelta(hours=24)  # Istio's default workload certificate lifetime


@dataclass(frozen=True, repr=False)
class WorkloadCertificate:
    identity: Identity
    chain: tuple[str, ...]  # PEM certificates, leaf first, root last
    key: pki.PrivateKey = field(repr=False)  # never in reprs or logs
    leaf: x509.Certificate = field(repr=False, compare=False)

    @classmethod
    def from_pems(cls, chain: Sequence[str], key: pki.PrivateKey) -> WorkloadCertificate:
        """Build from PEMs; the leaf's SAN must be a SPIFFE id and match the key."""
        if not chain:
            raise ValueError("empty certificate chain")
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        if leaf.public_key() != key.public_key():
            raise ValueError("leaf certificate does not carry the public key of this private key")
        return cls(from_certificate(leaf), tuple(chain), key, leaf)

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    def valid_at(self, when: datetime) -> bool:
        return self.not_before <= when < self.not_after

    @property
    def root_pem(self) -> str:
        return self.chain[-1]

    def chain_pem(self) -> bytes:
        """What a TLS endpoint presents: the leaf and intermediates, without a self-signed root."""
        certs = list(self.chain)
        if len(certs) > 1:
            root = x509.load_pem_x509_certificate(certs[-1].encode())
            if root.issuer == root.subject:
                certs = certs[:-1]
        return "".join(certs).encode()

    def key_pem(self) -> bytes:
        return pki.key_to_pem(self.key)

    def load_into(self, ctx: ssl.SSLContext) -> None:
        """Install this certificate and key as ctx's own (from memory, nothing on disk)."""
        tlsmem.load_cert_chain(ctx, self.chain_pem(), self.key_pem())

    def __str__(self) -> str:
        return f"{self.identity} serial {self.serial:x} valid until {self.not_after}"

    def __repr__(self) -> str:  # the key (and the bulky PEMs) never show up in logs
        return f"<WorkloadCertificate {self}>"
