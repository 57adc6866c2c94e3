"""Loading certificates into SSLContext from memory (memfd), without files."""

from __future__ import annotations

import os
import ssl
from datetime import timedelta

import pytest

from agent.identity import pki, tlsmem
from agent.identity.spiffe import Identity
from agent.identity.workloadcert import WorkloadCertificate

ID = Identity("cluster.local", "ns1", "sa1")


def issued() -> tuple[pki.Authority, WorkloadCertificate]:
    authority = pki.Authority.generate("cluster.local")
    key = pki.generate_key()
    leaf = authority.issue(key.public_key(), timedelta(minutes=5), uris=[ID.uri])
    return authority, WorkloadCertificate.from_pems(authority.chain_pems(leaf), key)


def test_loads_chain_and_key_and_closes_its_descriptors() -> None:
    _, cert = issued()
    before = set(os.listdir("/proc/self/fd"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.load_into(ctx)
    assert set(os.listdir("/proc/self/fd")) == before
    assert cert.chain_pem().count(b"BEGIN CERTIFICATE") == 1  # self-signed root not sent
    assert cert.chain_pem() == cert.chain[0].encode()


def test_mismatched_key_is_refused_by_openssl() -> None:
    _, cert = issued()
    before = set(os.listdir("/proc/self/fd"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ssl.SSLError):
        tlsmem.load_cert_chain(ctx, cert.chain_pem(), pki.key_to_pem(pki.generate_key()))
    assert set(os.listdir("/proc/self/fd")) == before


def test_workload_certificate_checks_key_and_identity() -> None:
    authority, cert = issued()
    with pytest.raises(ValueError, match="does not carry the public key"):
        WorkloadCertificate.from_pems(cert.chain, pki.generate_key())
    assert cert.identity == ID
    assert cert.root_pem == pki.cert_to_pem(authority.root)
    assert "BEGIN" not in repr(cert)
    assert ID.uri in repr(cert)
