"""X.509 building blocks shared by the embedded CA and the CA client.

Keys are ECDSA P-256. Workload and node certificates have an empty subject and a critical SAN
extension (RFC 5280 requires the SAN to be critical when the subject is empty), like Istio's.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.spiffe import Identity

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
# Issued certificates start a little in the past so a peer whose clock is slightly behind does
# not reject a certificate that was just issued.
CLOCK_SKEW = timedelta(seconds=60)
ROOT_TTL = timedelta(days=3650)


class ChainError(ValueError):
    """A certificate chain does not verify; the message says which link failed and why."""


def now() -> datetime:
    return datetime.now(UTC)


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def key_from_pem(data: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported private key type {type(key).__name__}: want ECDSA or RSA")
    return key


def cert_to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def certs_from_pem(text: str | bytes) -> list[x509.Certificate]:
    data = text.encode() if isinstance(text, str) else text
    certs = x509.load_pem_x509_certificates(data)  # raises ValueError on garbage or none
    return certs


def describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


def acceptable_key(key: object) -> bool:
    """The key types the CA signs for: ECDSA P-256, or RSA of at least 2048 bits."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return isinstance(key.curve, ec.SECP256R1)
    return isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048


def build_csr(identity: Identity, key: PrivateKey) -> str:
    """A PEM CSR carrying only the identity's URI SAN (empty subject), as ztunnel sends."""
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)])
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(san, critical=True)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class Authority:
    """A signing certificate and key, plus the chain from it up to the root (signer first)."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def signer(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1]

    @classmethod
    def generate(cls, trust_domain: str, ttl: timedelta = ROOT_TTL) -> Authority:
        key = generate_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                          x509.NameAttribute(NameOID.COMMON_NAME, "nodemesh root CA")])
        start = now() - CLOCK_SKEW
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(start + ttl)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        return cls((cert,), key)

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes) -> Authority:
        """Load a signing certificate (optionally followed by its chain to the root) and its key."""
        chain = tuple(certs_from_pem(chain_pem))
        key = key_from_pem(key_pem)
        signer = chain[0]
        if signer.public_key() != key.public_key():
            raise ValueError("CA key does not match the CA certificate's public key "
                             "(certificate and key files from different CAs?)")
        try:
            bc = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise ValueError("CA certificate lacks basicConstraints CA:TRUE; it cannot sign")
        verify_chain(list(chain), [chain[-1]])
        return cls(chain, key)

    def issue(self, public_key: PublicKey, ttl: timedelta, *, uris: Sequence[str] = (),
              dns: Iterable[str] = (), ips: Iterable[str] = (), server: bool = True,
              client: bool = True) -> x509.Certificate:
        """An end-entity certificate; never outlives the signer."""
        start = now()
        not_after = min(start + ttl, self.signer.not_valid_after_utc)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usages = [oid for oid, on in ((ExtendedKeyUsageOID.SERVER_AUTH, server),
                                      (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if on]
        rsa_key = isinstance(public_key, rsa.RSAPublicKey)
        ski = self.signer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([])).issuer_name(self.signer.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(start - CLOCK_SKEW).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName(names), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=rsa_key,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                               critical=False)
                .sign(self.key, hashes.SHA256()))

    def chain_pems(self, leaf: x509.Certificate) -> list[str]:
        """leaf, then the signer's chain: leaf first, root last."""
        return [cert_to_pem(leaf)] + [cert_to_pem(c) for c in self.chain]


def verify_chain(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate],
                 at: datetime | None = None) -> x509.Certificate:
    """Check that chain[0] is issued along chain up to one of roots, all valid at `at`.

    chain may or may not end with the root itself. Returns the trust anchor used.
    """
    when = at or now()
    if not chain:
        raise ChainError("empty certificate chain")
    for cert in chain:
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise ChainError(f"certificate serial {cert.serial_number:x} is not valid now "
                             f"(valid {cert.not_valid_before_utc} to {cert.not_valid_after_utc})")
    for child, parent in itertools.pairwise(chain):
        _check_issued(child, parent)
    last = chain[-1]
    for root in roots:
        if last == root:
            return root
        if last.issuer == root.subject:
            try:
                _check_issued(last, root)
            except ChainError:
                continue
            return root
    raise ChainError(f"chain ends at {last.issuer.rfc4514_string() or 'an unnamed issuer'}, "
                     "which is not in the trust bundle (issued by a different CA?)")


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_issued(child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        bc = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ChainError(f"issuer {parent.subject.rfc4514_string()} is not a CA certificate")
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise ChainError(f"certificate serial {child.serial_number:x} is not signed by "
                         f"{parent.subject.rfc4514_string()}: {e or type(e).__name__}") from e
