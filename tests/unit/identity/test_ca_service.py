"""The embedded CA over real gRPC + TLS on loopback: issuance, authentication, every rejection."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Awaitable, Callable
from datetime import timedelta

import grpc
import grpc.aio
import pytest
from ca_harness import BACKEND, DB, FRONTEND, TD, RunningCa, running_ca
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.identity import pki
from agent.identity.caclient import CaClient
from agent.identity.caerror import CaError
from agent.identity.proto import (
    CREATE_CERTIFICATE_PATH,
    IMPERSONATED_IDENTITY,
    IstioCertificateRequest,
    IstioCertificateResponse,
)
from agent.identity.spiffe import Identity, from_certificate, uri_sans


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())  # type: ignore[arg-type]  # body() is a coroutine


def csr_with(sans: list[x509.GeneralName], key: pki.PrivateKey | None = None) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    csr = builder.sign(key or pki.generate_key(), hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def tampered(csr_pem: str) -> str:
    """Flip a bit in the CSR's signature; the DER stays well-formed."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(
        serialization.Encoding.DER))
    der[-5] ^= 0x01
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


async def raw_call(ca: RunningCa, request: IstioCertificateRequest,
                   token: str | None = "token-n1") -> IstioCertificateResponse:
    creds = grpc.ssl_channel_credentials(ca.root_pem.encode())
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    async with grpc.aio.secure_channel(ca.address, creds) as channel:
        call = channel.unary_unary(
            CREATE_CERTIFICATE_PATH, request_serializer=IstioCertificateRequest.SerializeToString,
            response_deserializer=IstioCertificateResponse.FromString)
        response: IstioCertificateResponse = await call(request, metadata=metadata, timeout=10)
        return response


async def rejected(ca: RunningCa, request: IstioCertificateRequest,
                   token: str | None = "token-n1") -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw_call(ca, request, token)
    return err.value.code(), err.value.details() or ""


def request_for(identity: Identity, ttl: int = 3600, *, key: pki.PrivateKey | None = None,
                impersonate: str | None = None) -> IstioCertificateRequest:
    req = IstioCertificateRequest(csr=pki.build_csr(identity, key or pki.generate_key()),
                                  validity_duration=ttl)
    if impersonate is not None:
        req.metadata.fields[IMPERSONATED_IDENTITY].string_value = impersonate
    return req


def test_issues_workload_certificate_leaf_first_root_last() -> None:
    async def body() -> None:
        async with running_ca() as ca:
            client = ca.client()
            try:
                cert = await client.issue(FRONTEND, timedelta(hours=1))
            finally:
                await client.close()
            chain = [x509.load_pem_x509_certificate(p.encode()) for p in cert.chain]
            root = ca.ca.authority.root
            assert len(chain) == 2
            assert chain[-1] == root
            leaf = chain[0]
            assert uri_sans(leaf) == [FRONTEND.uri]
            assert from_certificate(leaf) == FRONTEND
            leaf.verify_directly_issued_by(root)
            assert pki.verify_chain(chain, [root]) == root
            assert leaf.public_key() == cert.key.public_key()
            assert not leaf.extensions.get_extension_for_class(
                x509.BasicConstraints).value.ca
            lifetime = cert.not_after - cert.not_before
            assert lifetime <= timedelta(hours=1) + pki.CLOCK_SKEW
            assert "PRIVATE" not in repr(cert)
    run(body)


def test_raw_request_without_impersonation_and_default_ttl() -> None:
    async def body() -> None:
        async with running_ca() as ca:
            resp = await raw_call(ca, request_for(BACKEND, ttl=0))
            assert len(resp.cert_chain) == 2
            leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
            assert from_certificate(leaf) == BACKEND
            assert resp.cert_chain[1] == ca.root_pem
    run(body)


def test_rejections_have_specific_codes_and_messages() -> None:
    other_td = Identity("other.domain", "shop", "frontend")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases: list[tuple[str, IstioCertificateRequest, str | None, grpc.StatusCode, str]] = [
        ("not on node", request_for(DB), "token-n1", grpc.StatusCode.PERMISSION_DENIED,
         f"identity {DB.uri} is not scheduled on node n1"),
        ("two SANs", IstioCertificateRequest(csr=csr_with([
            x509.UniformResourceIdentifier(FRONTEND.uri),
            x509.UniformResourceIdentifier(BACKEND.uri)])), "token-n1", invalid,
         "CSR has 2 URI SANs; want exactly one SPIFFE id"),
        ("no SAN", IstioCertificateRequest(csr=csr_with([])), "token-n1", invalid,
         "CSR has 0 URI SANs"),
        ("DNS SAN too", IstioCertificateRequest(csr=csr_with([
            x509.UniformResourceIdentifier(FRONTEND.uri), x509.DNSName("x.example")])),
         "token-n1", invalid, "CSR carries DNSName SANs; only one URI SAN is allowed"),
        ("not SPIFFE", IstioCertificateRequest(csr=csr_with([
            x509.UniformResourceIdentifier("https://example.com/x")])), "token-n1", invalid,
         "is not a SPIFFE id"),
        ("bad signature", IstioCertificateRequest(csr=tampered(pki.build_csr(
            FRONTEND, pki.generate_key()))), "token-n1", invalid,
         "CSR signature does not verify"),
        ("garbage CSR", IstioCertificateRequest(csr="hello"), "token-n1", invalid,
         "csr is not a PEM certificate request"),
        ("P-384 key", request_for(FRONTEND, key=ec.generate_private_key(ec.SECP384R1())),
         "token-n1", invalid, "CSR key is ECDSA secp384r1; want ECDSA P-256 or RSA >= 2048"),
        ("RSA 1024", request_for(FRONTEND, key=rsa.generate_private_key(65537, 1024)),
         "token-n1", invalid, "CSR key is RSA 1024"),
        ("TTL too long", request_for(FRONTEND, ttl=24 * 3600 + 1), "token-n1", invalid,
         "requested TTL 86401s exceeds the CA's maximum of 86400s"),
        ("negative TTL", request_for(FRONTEND, ttl=-5), "token-n1", invalid,
         "validity_duration -5s is negative"),
        ("other trust domain", request_for(other_td), "token-n1", invalid,
         f"identity {other_td.uri} is in trust domain other.domain; this CA signs only {TD}"),
        ("impersonation mismatch", request_for(FRONTEND, impersonate=BACKEND.uri), "token-n1",
         invalid, f"ImpersonatedIdentity {BACKEND.uri} does not match the CSR's SAN "
         f"{FRONTEND.uri}"),
        ("bad token", request_for(FRONTEND), "wrong-token", grpc.StatusCode.UNAUTHENTICATED,
         "bearer token is not recognised"),
        ("missing token", request_for(FRONTEND), None, grpc.StatusCode.UNAUTHENTICATED,
         "no caller credentials"),
        ("other node's token", request_for(FRONTEND), "token-n2",
         grpc.StatusCode.PERMISSION_DENIED, f"identity {FRONTEND.uri} is not scheduled on node n2"),
    ]

    async def body() -> None:
        async with running_ca() as ca:
            for name, request, token, code, message in cases:
                got_code, got_message = await rejected(ca, request, token)
                assert (got_code, name) == (code, name)
                assert message in got_message, (name, got_message)
            # The same CA still serves a good request afterwards.
            assert len((await raw_call(ca, request_for(FRONTEND, impersonate=FRONTEND.uri)))
                       .cert_chain) == 2
    run(body)


def test_ttl_limit_is_configurable() -> None:
    async def body() -> None:
        async with running_ca(max_ttl=timedelta(minutes=10)) as ca:
            code, msg = await rejected(ca, request_for(FRONTEND, ttl=601))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "requested TTL 601s exceeds the CA's maximum of 600s" in msg
            resp = await raw_call(ca, request_for(FRONTEND, ttl=600))
            leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
            assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(
                seconds=600) + pki.CLOCK_SKEW
    run(body)


def test_node_client_certificate_authentication() -> None:
    async def body() -> None:
        async with running_ca(require_node_cert=True) as ca:
            node_key = pki.generate_key()
            node_chain = ca.ca.issue_node_certificate("n2", node_key.public_key())
            client = CaClient(ca.address, ca.root_pem, node_cert_pem=node_chain[0],
                              node_key_pem=pki.key_to_pem(node_key))
            try:
                cert = await client.issue(DB, timedelta(minutes=5))
                assert cert.identity == DB
                with pytest.raises(CaError) as err:
                    await client.issue(FRONTEND, timedelta(minutes=5))
                assert err.value.reason == "permission_denied"
                assert f"identity {FRONTEND.uri} is not scheduled on node n2" in str(err.value)
            finally:
                await client.close()

            # A workload certificate from the same CA is not a node credential.
            wl = CaClient(ca.address, ca.root_pem, node_cert_pem=cert.chain[0],
                          node_key_pem=cert.key_pem())
            try:
                with pytest.raises(CaError) as err:
                    await wl.issue(DB, timedelta(minutes=5))
                assert err.value.reason == "unauthenticated"
                assert "client certificate is not a node certificate" in str(err.value)
            finally:
                await wl.close()

            # A token for another node next to the certificate is refused.
            mixed = CaClient(ca.address, ca.root_pem, token="token-n1",
                             node_cert_pem=node_chain[0], node_key_pem=pki.key_to_pem(node_key))
            try:
                with pytest.raises(CaError) as err:
                    await mixed.issue(DB, timedelta(minutes=5))
                assert "bearer token is for node n1 but the client certificate is for node n2" \
                    in str(err.value)
            finally:
                await mixed.close()
    run(body)


def test_client_rejects_chain_outside_its_trust_bundle() -> None:
    async def body() -> None:
        stranger = pki.cert_to_pem(pki.Authority.generate(TD).root)
        async with running_ca() as ca:
            client = ca.client(trust_bundle=[stranger])
            try:
                with pytest.raises(CaError) as err:
                    await client.issue(FRONTEND, timedelta(minutes=5))
            finally:
                await client.close()
            assert err.value.reason == "invalid_response"
            assert "not in the trust bundle" in str(err.value)
    run(body)


def test_client_refuses_ca_with_untrusted_tls_certificate() -> None:
    async def body() -> None:
        async with running_ca() as ca:
            stranger = pki.cert_to_pem(pki.Authority.generate(TD).root)
            client = CaClient(ca.address, stranger, token="token-n1", timeout=5)
            try:
                with pytest.raises(CaError) as err:
                    await client.issue(FRONTEND, timedelta(minutes=5))
            finally:
                await client.close()
            assert err.value.reason == "unavailable"
    run(body)


def test_issued_certificates_do_mutual_tls_from_memory() -> None:
    """Two workload certificates loaded via memfd complete a real TLS 1.3 handshake."""

    async def body() -> None:
        async with running_ca() as ca:
            client = ca.client()
            try:
                fe = await client.issue(FRONTEND, timedelta(minutes=5))
                be = await client.issue(BACKEND, timedelta(minutes=5))
            finally:
                await client.close()
            server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            server_ctx.verify_mode = ssl.CERT_REQUIRED
            server_ctx.load_verify_locations(cadata=be.root_pem)
            be.load_into(server_ctx)
            client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            client_ctx.check_hostname = False  # SPIFFE: the identity is checked from the SAN
            client_ctx.load_verify_locations(cadata=fe.root_pem)
            fe.load_into(client_ctx)

            seen: list[Identity] = []

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                seen.append(from_certificate(x509.load_der_x509_certificate(peer)))
                writer.write(await reader.readexactly(4))
                await writer.drain()
                writer.close()

            server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
            port = server.sockets[0].getsockname()[1]
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
                peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.close()
                await writer.wait_closed()
            finally:
                server.close()
                await server.wait_closed()
            assert from_certificate(x509.load_der_x509_certificate(peer)) == BACKEND
            assert seen == [FRONTEND]
    run(body)



class BrokenLocator:
    def identities_on_node(self, node: str) -> set[Identity]:
        raise ConnectionError(f"state store for {node} is down")


def test_locator_failure_is_unavailable_not_a_crash() -> None:
    async def body() -> None:
        async with running_ca(placement=BrokenLocator()) as ca:
            code, msg = await rejected(ca, request_for(FRONTEND))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert "cannot tell which workloads run on node n1" in msg
            assert "state store for n1 is down" in msg
    run(body)
