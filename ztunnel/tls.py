"""Mutual TLS 1.3 for HBONE: contexts from in-memory certificates and the SPIFFE identity checks.

Certificates come through `CertificateSource` (the agent's certificate manager implements it).
Python's ssl loads key material only from files, so the PEM is written to an anonymous memfd and
loaded through /proc/self/fd/<n>, which is closed right away: keys never touch a filesystem.

Verification is never disabled. OpenSSL verifies the chain against the trust bundle (client and
server both require a peer certificate); on top of that:
- client: the server's URI SAN must equal the expected destination identity exactly;
- server: the client's SPIFFE trust domain must equal ours (who may connect is policy's job);
  with a `PeerTrust` (federation, aliases) it decides instead, on both sides.
There is no SNI: the server knows which certificate to present from the netns it listens in.
"""

from __future__ import annotations

import hashlib
import ssl
from typing import Protocol

from agent.identity import tlsmem
from agent.identity.spiffe import Identity, IdentityError, from_der

ALPN = "h2"


class CertificateSource(Protocol):
    """Where the tunnel gets workload certificates and the mesh trust bundle."""

    def current(self, identity: Identity) -> tuple[bytes, bytes]:
        """(certificate chain PEM, leaf first; private key PEM) for a local workload identity."""
        ...

    def trust_bundle_pem(self) -> bytes:
        """The mesh root certificates, PEM."""
        ...


class PeerTrust(Protocol):
    """Federated trust domains and aliases (agent.identity.federation.TrustDomains)."""

    def admit(self, identity: Identity, leaf_der: bytes) -> Identity:
        """The identity policy sees for a verified peer; ValueError if it is not trusted."""
        ...


class PeerIdentityError(ConnectionError):
    """The peer's certificate verified but names the wrong identity or trust domain."""


def _base(purpose: ssl.Purpose, chain_pem: bytes, key_pem: bytes, bundle: bytes) -> ssl.SSLContext:
    client = purpose is ssl.Purpose.SERVER_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if client else ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # Names are SPIFFE URIs checked after the handshake; chain verification stays on.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle.decode("ascii"))
    ctx.set_alpn_protocols([ALPN])
    ctx.options |= ssl.OP_NO_TICKET  # no session resumption, as ztunnel
    tlsmem.load_cert_chain(ctx, chain_pem, key_pem)
    return ctx


class Contexts:
    """SSL contexts per local identity, rebuilt when the source hands out a new certificate."""

    def __init__(self, source: CertificateSource) -> None:
        self.source = source
        self._cache: dict[tuple[str, Identity], tuple[bytes, ssl.SSLContext]] = {}

    def _get(self, kind: str, identity: Identity) -> ssl.SSLContext:
        chain, key = self.source.current(identity)
        bundle = self.source.trust_bundle_pem()
        digest = hashlib.sha256(chain + key + bundle).digest()
        hit = self._cache.get((kind, identity))
        if hit is not None and hit[0] == digest:
            return hit[1]
        purpose = ssl.Purpose.SERVER_AUTH if kind == "client" else ssl.Purpose.CLIENT_AUTH
        ctx = _base(purpose, chain, key, bundle)
        self._cache[(kind, identity)] = (digest, ctx)
        return ctx

    def client(self, identity: Identity) -> ssl.SSLContext:
        return self._get("client", identity)

    def server(self, identity: Identity) -> ssl.SSLContext:
        return self._get("server", identity)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
                  trust: PeerTrust | None = None) -> Identity:
    if ssl_object is None:
        raise PeerIdentityError("connection is not TLS")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("peer presented no certificate")
    try:
        got = from_der(der)
    except (IdentityError, ValueError) as exc:
        raise PeerIdentityError(f"peer certificate has no valid SPIFFE identity: {exc}") from exc
    if trust is None:
        return got
    try:
        return trust.admit(got, der)
    except ValueError as exc:
        raise PeerIdentityError(f"peer certificate not trusted: {exc}") from exc


def check_alpn(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> None:
    proto = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
    if proto != ALPN:
        raise PeerIdentityError(
            f"peer did not negotiate ALPN {ALPN!r} (got {proto!r}): not an HBONE peer")


def verify_server(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, expected: Identity,
                  trust: PeerTrust | None = None) -> Identity:
    """Client side: the server must be exactly the destination workload's identity."""
    got = peer_identity(ssl_object, trust)
    if got != expected:
        raise PeerIdentityError(
            f"server certificate identity {got} is not the expected destination identity "
            f"{expected}: the destination address may belong to another workload, or someone "
            "is impersonating it"
        )
    check_alpn(ssl_object)
    return got


def verify_client(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, trust_domain: str,
                  trust: PeerTrust | None = None) -> Identity:
    """Server side: any identity from our trust domain (or, with `trust`, an alias or federated
    domain) may connect; policy decides the rest."""
    got = peer_identity(ssl_object, trust)
    if trust is None and got.trust_domain != trust_domain:
        raise PeerIdentityError(
            f"client certificate identity {got} is in trust domain {got.trust_domain!r}, "
            f"not ours ({trust_domain!r})"
        )
    check_alpn(ssl_object)
    return got


def describe_handshake_error(exc: BaseException) -> str:
    """A log-friendly cause for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        hints = {
            "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our CA (different mesh roots?)",
            "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate expired",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate",
            "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate",
            "CERTIFICATE_VERIFY_FAILED": "the peer's certificate does not verify against our roots",
        }
        return f"TLS error {reason}: {hints.get(str(reason), 'see the peer logs')}"
    if isinstance(exc, ConnectionResetError):
        return ("the peer reset the connection during the TLS handshake: it probably rejected "
                "our certificate (see its logs)")
    return f"{type(exc).__name__}: {exc}"
