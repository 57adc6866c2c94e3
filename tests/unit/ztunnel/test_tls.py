"""mTLS contexts built from in-memory PEM and the SPIFFE identity checks, over memory BIOs (no
sockets): a real TLS 1.3 handshake between two SSLObjects."""

from __future__ import annotations

import ssl

import pytest
from support.testca import Leaf, TestCA, identity
from support.tlsbio import handshake

from agent.identity.spiffe import Identity
from ztunnel import tls

A, B = identity("a"), identity("b")


class Source:
    """A CertificateSource with a fixed leaf per identity."""

    def __init__(self, ca: TestCA, leaves: dict[Identity, Leaf]) -> None:
        self.ca, self.leaves = ca, leaves

    def current(self, ident: Identity) -> tuple[bytes, bytes]:
        leaf = self.leaves[ident]
        return leaf.chain_pem, leaf.key_pem

    def trust_bundle_pem(self) -> bytes:
        return self.ca.root_pem


def contexts(ca: TestCA, **leaves: Leaf) -> tls.Contexts:
    return tls.Contexts(Source(ca, {identity(k): v for k, v in leaves.items()}))


def test_mutual_tls13_with_exact_identities() -> None:
    ca = TestCA()
    ctx = contexts(ca, a=ca.leaf(A.uri), b=ca.leaf(B.uri))
    client, server = handshake(ctx.client(A), ctx.server(B))
    assert client.version() == "TLSv1.3" and server.version() == "TLSv1.3"
    assert client.selected_alpn_protocol() == "h2"
    assert client.server_hostname is None  # no SNI
    assert tls.verify_server(client, B) == B
    assert tls.verify_client(server, "cluster.local") == A
    with pytest.raises(tls.PeerIdentityError, match=r"not the expected destination identity"):
        tls.verify_server(client, identity("c"))
    with pytest.raises(tls.PeerIdentityError, match=r"trust domain 'cluster\.local', not ours"):
        tls.verify_client(server, "other.domain")


def test_contexts_are_cached_until_the_certificate_changes() -> None:
    ca = TestCA()
    source = Source(ca, {A: ca.leaf(A.uri)})
    ctx = tls.Contexts(source)
    first = ctx.client(A)
    assert ctx.client(A) is first
    source.leaves[A] = ca.leaf(A.uri)  # rotation
    assert ctx.client(A) is not first


@pytest.mark.parametrize(("bad", "message"), [
    ("expired", "certificate has expired"),
    ("self_signed", "self-signed certificate"),
])
def test_server_refuses_unverifiable_client_certificates(bad: str, message: str) -> None:
    ca = TestCA()
    ctx = contexts(ca, a=ca.leaf(A.uri, **{bad: True}), b=ca.leaf(B.uri))
    with pytest.raises(ssl.SSLCertVerificationError) as err:
        handshake(ctx.client(A), ctx.server(B))
    assert message in tls.describe_handshake_error(err.value)


def test_client_refuses_a_server_from_another_ca() -> None:
    ca, rogue = TestCA(), TestCA("rogue")
    client_ctx = contexts(ca, a=ca.leaf(A.uri)).client(A)
    server_ctx = tls.Contexts(Source(rogue, {B: rogue.leaf(B.uri)})).server(B)
    with pytest.raises(ssl.SSLCertVerificationError,
                       match=r"self-signed certificate in certificate chain"):
        handshake(client_ctx, server_ctx)


def test_other_trust_domain_from_the_same_ca_verifies_but_is_refused_by_policy() -> None:
    ca = TestCA()
    ctx = contexts(ca, a=ca.leaf("spiffe://other.domain/ns/default/sa/a"), b=ca.leaf(B.uri))
    _, server = handshake(ctx.client(A), ctx.server(B))
    with pytest.raises(tls.PeerIdentityError, match=r"trust domain 'other\.domain'"):
        tls.verify_client(server, "cluster.local")
