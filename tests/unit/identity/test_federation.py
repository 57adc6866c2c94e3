"""Federated trust domains and aliases, checked on real TLS 1.3 handshakes (memory BIOs)."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from support.testca import Leaf, TestCA
from support.tlsbio import handshake

from agent.datapath.identities import ID_OTHER, IdentityTable
from agent.datapath.policymap import PolicyCompiler
from agent.identity.federation import (
    FederationError,
    FederationFiles,
    TrustDomains,
    parse_spiffe_bundle,
    spiffe_bundle,
)
from agent.identity.spiffe import Identity
from agent.policy.authz import parse_authorization_policy
from agent.policy.evaluator import PolicySet, referenced_identities
from ztunnel import tls

SERVER = Identity("cluster.local", "shop", "backend")
PARTNER = Identity("partner.example", "tools", "client")
ALIAS = Identity("old.local", "shop", "frontend")


class Source:
    def __init__(self, leaf: Leaf, roots: bytes) -> None:
        self.leaf, self.roots = leaf, roots

    def current(self, ident: Identity) -> tuple[bytes, bytes]:
        return self.leaf.chain_pem, self.leaf.key_pem

    def trust_bundle_pem(self) -> bytes:
        return self.roots


def connect(client: Leaf, server: Leaf, trust: TrustDomains, client_roots: bytes
            ) -> ssl.SSLObject:
    """A handshake whose server trusts our root plus the federated roots; its SSLObject."""
    server_roots = b"".join(r.encode() for r in trust.own_roots()) + trust.federated_pems().encode()
    c = tls.Contexts(Source(client, client_roots)).client(PARTNER)
    s = tls.Contexts(Source(server, server_roots)).server(SERVER)
    _, srv = handshake(c, s)
    return srv


@pytest.fixture
def cas() -> tuple[TestCA, TestCA]:
    return TestCA("ours"), TestCA("partner")


def trust(ours: TestCA, partner: TestCA | None, aliases: frozenset[str] = frozenset()
          ) -> TrustDomains:
    fed = {} if partner is None else {"partner.example": (partner.cert,)}
    return TrustDomains("cluster.local", lambda: [ours.root_pem.decode()], aliases, fed)


def test_federated_peer_is_admitted_and_keeps_its_identity(cas: tuple[TestCA, TestCA]) -> None:
    ours, partner = cas
    t = trust(ours, partner)
    srv = connect(partner.leaf(PARTNER.uri), ours.leaf(SERVER.uri), t, ours.root_pem)
    assert tls.verify_client(srv, "cluster.local", t) == PARTNER


def test_a_partner_ca_cannot_mint_our_identities(cas: tuple[TestCA, TestCA]) -> None:
    """OpenSSL accepts the chain (the partner root is in the store); the domain binding does
    not: a certificate for cluster.local must be issued by our bundle."""
    ours, partner = cas
    forged = Identity("cluster.local", "shop", "frontend")
    t = trust(ours, partner)
    srv = connect(partner.leaf(forged.uri), ours.leaf(SERVER.uri), t, ours.root_pem)
    with pytest.raises(tls.PeerIdentityError, match=r"not issued by a certificate in the bundle "
                                                    r"of cluster\.local"):
        tls.verify_client(srv, "cluster.local", t)
    # ...nor identities of a third domain it was not federated for.
    srv = connect(partner.leaf("spiffe://third.example/ns/a/sa/b"), ours.leaf(SERVER.uri), t,
                  ours.root_pem)
    with pytest.raises(tls.PeerIdentityError, match=r"neither ours .* nor federated"):
        tls.verify_client(srv, "cluster.local", t)


def test_without_the_bundle_the_handshake_fails(cas: tuple[TestCA, TestCA]) -> None:
    ours, partner = cas
    with pytest.raises(ssl.SSLError):
        connect(partner.leaf(PARTNER.uri), ours.leaf(SERVER.uri), trust(ours, None),
                ours.root_pem)


def test_alias_peers_bind_to_our_roots_and_map_to_our_domain(
        cas: tuple[TestCA, TestCA]) -> None:
    ours, partner = cas
    t = trust(ours, partner, frozenset({"old.local"}))
    srv = connect(ours.leaf(ALIAS.uri), ours.leaf(SERVER.uri), t, ours.root_pem)
    assert tls.verify_client(srv, "cluster.local", t) == Identity("cluster.local", "shop",
                                                                  "frontend")
    srv = connect(partner.leaf(ALIAS.uri), ours.leaf(SERVER.uri), t, ours.root_pem)
    with pytest.raises(tls.PeerIdentityError, match="not issued by"):
        tls.verify_client(srv, "cluster.local", t)
    with pytest.raises(FederationError, match="alias"):
        TrustDomains("cluster.local", lambda: [], frozenset({"cluster.local"}))


def test_spiffe_bundle_round_trip_and_errors(cas: tuple[TestCA, TestCA],
                                             tmp_path: Path) -> None:
    ours, partner = cas
    doc = json.loads(spiffe_bundle([partner.cert]))
    doc["keys"].append({"use": "jwt-svid", "kty": "EC", "kid": "k"})  # skipped
    assert parse_spiffe_bundle(json.dumps(doc).encode(), "b.json") == (partner.cert,)
    for bad, why in [(b"{", "not JSON"), (b"{}", "'keys' list"),
                     (b'{"keys": [{"use": "x509-svid"}]}', r"keys\[0\]\.x5c"),
                     (b'{"keys": [{"use": "x509-svid", "x5c": ["!!"]}]}', r"x5c\[0\]"),
                     (b'{"keys": [{"use": "jwt-svid"}]}', "no x509-svid")]:
        with pytest.raises(FederationError, match=why):
            parse_spiffe_bundle(bad, "b.json")
    leaf = x509.load_pem_x509_certificate(partner.leaf(PARTNER.uri).chain_pem)
    not_ca = json.dumps({"keys": [{"use": "x509-svid", "x5c": [
        base64.b64encode(leaf.public_bytes(Encoding.DER)).decode()]}]})
    with pytest.raises(FederationError, match="not a CA certificate"):
        parse_spiffe_bundle(not_ca.encode(), "b.json")
    # A ConfigMap-style directory: one file per trust domain, re-read on change.
    d = tmp_path / "fed"
    d.mkdir()
    (d / "partner.example.json").write_text(spiffe_bundle([partner.cert]))
    files = FederationFiles([str(d)], "cluster.local")
    assert set(files.bundles) == {"partner.example"} and files.poll() is None
    (d / "partner.example.json").write_text("{broken")
    assert files.poll() is None and files.errors == 1 and set(files.bundles) == {"partner.example"}
    (d / "partner.example.json").unlink()
    assert files.poll() == {}
    (d / "cluster.local.pem").write_text(ours.root_pem.decode())
    with pytest.raises(FederationError, match="our own trust domain"):
        FederationFiles([str(d)], "cluster.local")


POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["partner.example/ns/tools/sa/client", "partner.example/ns/*", "bad"]
"""


def test_policy_principals_of_other_domains_get_identity_ids() -> None:
    policies = PolicySet((parse_authorization_policy(yaml.safe_load(POLICY)),))
    assert referenced_identities(policies) == {PARTNER}
    table = IdentityTable()
    PolicyCompiler(table).compile(policies, [])
    assert table.id_of(PARTNER) != ID_OTHER
    assert table.id_of(Identity("partner.example", "tools", "other")) == ID_OTHER
