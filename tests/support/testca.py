"""A throwaway mesh CA for tests: ECDSA P-256 root, leaves with one SPIFFE URI SAN, and the bad
certificates impersonation tests need (other trust domain, expired, self-signed).

`TestCA` also implements ztunnel's CertificateSource, so a Tunnel can take certificates from it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.spiffe import Identity

PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class Leaf:
    chain_pem: bytes  # leaf first, then the issuer (empty for self-signed)
    key_pem: bytes

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Files for peers that need paths (Envoy): <name>.pem and <name>.key (0600)."""
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        cert.write_bytes(self.chain_pem)
        key.touch(mode=0o600)
        key.write_bytes(self.key_pem)
        return cert, key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class TestCA:
    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "nodemesh test root") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.root_pem = self.cert.public_bytes(PEM)
        self._issued: dict[Identity, Leaf] = {}

    # -- CertificateSource -------------------------------------------------------------------
    def current(self, identity: Identity) -> tuple[bytes, bytes]:
        leaf = self._issued.get(identity)
        if leaf is None:
            leaf = self._issued[identity] = self.leaf(identity.uri)
        return leaf.chain_pem, leaf.key_pem

    def trust_bundle_pem(self) -> bytes:
        return self.root_pem

    def install(self, identity: Identity, leaf: Leaf) -> None:
        """Make `current(identity)` hand out a specific (possibly bad) certificate."""
        self._issued[identity] = leaf

    # -- issuing -----------------------------------------------------------------------------
    def leaf(self, uri: str, *, expired: bool = False, self_signed: bool = False) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        if expired:
            start, end = now - dt.timedelta(days=2), now - dt.timedelta(days=1)
        else:
            start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(hours=24)
        issuer_key = key if self_signed else self.key
        issuer = (x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "self")])
                  if self_signed else self.cert.subject)
        builder = (
            x509.CertificateBuilder()
            .subject_name(issuer if self_signed else x509.Name([]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                           critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
        )
        if not self_signed:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False)
        cert = builder.sign(issuer_key, hashes.SHA256())
        chain = cert.public_bytes(PEM) + (b"" if self_signed else self.root_pem)
        return Leaf(chain, _key_pem(key))


def identity(sa: str, ns: str = "default", td: str = "cluster.local") -> Identity:
    return Identity(td, ns, sa)
