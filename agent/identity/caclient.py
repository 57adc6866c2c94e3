"""Client of Istio's CreateCertificate API (istiod or the embedded CA), grpc.aio over TLS.

Each request generates a fresh ECDSA P-256 key locally (the key never leaves the process), sends
a CSR with only the identity's URI SAN plus metadata.ImpersonatedIdentity (as ztunnel does in
shared mode), and accepts the answer only if the leaf carries exactly that identity, matches the
key, and chains to the trust bundle.

Call metadata is what ztunnel sends to istiod: `authorization: Bearer <token>` and
`clusterid: <cluster id>`. A token file (the projected ServiceAccount token) is read afresh for
every request: the kubelet rewrites it well before it expires.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import grpc
import grpc.aio
from cryptography import x509

from agent.identity import pki
from agent.identity.caerror import CaError
from agent.identity.proto import (
    CREATE_CERTIFICATE_PATH,
    IMPERSONATED_IDENTITY,
    IstioCertificateRequest,
    IstioCertificateResponse,
)
from agent.identity.spiffe import Identity, IdentityError, from_certificate
from agent.identity.workloadcert import DEFAULT_TTL, WorkloadCertificate

log = logging.getLogger(__name__)


class CaClient:
    def __init__(self, address: str, ca_root_pem: str, *, token: str | None = None,
                 token_file: Path | None = None, cluster_id: str | None = None,
                 node_cert_pem: str | None = None, node_key_pem: bytes | None = None,
                 trust_bundle: Sequence[str] | None = None, ttl: timedelta = DEFAULT_TTL,
                 timeout: float = 10.0, server_name: str | None = None) -> None:
        """address: host:port of the CA. ca_root_pem: trust anchor for the CA's TLS certificate.

        token / token_file: bearer credential (a file is re-read for every request).
        cluster_id: sent as `clusterid` metadata, as ztunnel does (istiod picks the cluster's
        node authorizer by it).
        trust_bundle: roots issued workload chains must chain to (default: ca_root_pem).
        server_name: name to verify in the CA's certificate if it differs from address's host.
        """
        if (node_cert_pem is None) != (node_key_pem is None):
            raise ValueError("give both node_cert_pem and node_key_pem, or neither")
        if token is not None and token_file is not None:
            raise ValueError("give a token or a token file, not both")
        self._token_file = token_file
        self._cluster_id = cluster_id
        self.address = address
        self.ttl = ttl
        self.timeout = timeout
        self._token = token
        self._node_cert = (node_cert_pem, node_key_pem)
        self._server_name = server_name
        self._ca_root = ca_root_pem
        self._bundle = self._parse_bundle(trust_bundle or [ca_root_pem])
        self._channel: grpc.aio.Channel | None = None
        self._stale: list[grpc.aio.Channel] = []

    @staticmethod
    def _parse_bundle(pems: Sequence[str]) -> list[x509.Certificate]:
        roots = [c for pem in pems for c in pki.certs_from_pem(pem)]
        if not roots:
            raise ValueError("trust bundle holds no certificates")
        return roots

    def set_trust_bundle(self, trust_bundle: Sequence[str]) -> None:
        self._bundle = self._parse_bundle(trust_bundle)

    def set_ca_roots(self, ca_root_pem: str) -> None:
        """New trust anchors for the CA's own TLS certificate (a root rotation: the CA comes
        back signed by the new root); the next request opens a channel that uses them."""
        self._parse_bundle([ca_root_pem])
        if ca_root_pem != self._ca_root:
            self._ca_root = ca_root_pem
            self._drop_channel()

    def _drop_channel(self) -> None:
        # Closing is a coroutine; stale channels are closed at the next issue() or close().
        if self._channel is not None:
            self._stale.append(self._channel)
            self._channel = None

    async def _close_stale(self) -> None:
        while self._stale:
            await self._stale.pop().close(None)

    def _stub(self) -> grpc.aio.UnaryUnaryMultiCallable[IstioCertificateRequest,
                                                        IstioCertificateResponse]:
        if self._channel is None:
            cert, key = self._node_cert
            creds = grpc.ssl_channel_credentials(
                self._ca_root.encode(), key, cert.encode() if cert is not None else None)
            options: list[tuple[str, str | int]] = [
                # Reconnect promptly after an outage; the certificate manager paces retries.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 5000),
            ]
            if self._server_name:
                options.append(("grpc.ssl_target_name_override", self._server_name))
            self._channel = grpc.aio.secure_channel(self.address, creds, options=options)
        return self._channel.unary_unary(
            CREATE_CERTIFICATE_PATH,
            request_serializer=IstioCertificateRequest.SerializeToString,
            response_deserializer=IstioCertificateResponse.FromString)

    async def issue(self, identity: Identity, ttl: timedelta | None = None) -> WorkloadCertificate:
        await self._close_stale()
        key = pki.generate_key()
        request = IstioCertificateRequest(
            csr=pki.build_csr(identity, key),
            validity_duration=int((ttl or self.ttl).total_seconds()))
        request.metadata.fields[IMPERSONATED_IDENTITY].string_value = identity.uri
        metadata = self._call_metadata()
        try:
            response = await self._stub()(request, timeout=self.timeout, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._drop_channel()  # start the next attempt with a fresh connection
            raise CaError(code.name.lower(), f"CA {self.address} refused a certificate for "
                          f"{identity}: {code.name}: {e.details()}") from e
        return self._accept(identity, key, list(response.cert_chain))

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._token
        if self._token_file is not None:
            try:
                token = self._token_file.read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise CaError("token_unreadable", f"cannot read the CA token file "
                              f"{self._token_file}: {e}") from e
            if not token:
                raise CaError("token_unreadable", f"the CA token file {self._token_file} is "
                              "empty")
        out: list[tuple[str, str]] = []
        if token:
            out.append(("authorization", f"Bearer {token}"))
        if self._cluster_id:
            out.append(("clusterid", self._cluster_id))
        return tuple(out)

    def _accept(self, identity: Identity, key: pki.PrivateKey,
                chain_pems: list[str]) -> WorkloadCertificate:
        def bad(why: str) -> CaError:
            return CaError("invalid_response", f"CA {self.address} answered for {identity} with "
                           f"an unusable chain: {why}")

        if not chain_pems:
            raise bad("empty cert_chain")
        try:
            chain = [c for pem in chain_pems for c in pki.certs_from_pem(pem)]
            got = from_certificate(chain[0])
        except (ValueError, IdentityError) as e:
            raise bad(str(e)) from e
        if got != identity:
            raise bad(f"leaf identity is {got}")
        if chain[0].public_key() != key.public_key():
            raise bad("leaf is not for the key in our CSR")
        try:
            pki.verify_chain(chain, self._bundle)
        except pki.ChainError as e:
            raise bad(str(e)) from e
        cert = WorkloadCertificate.from_pems([pki.cert_to_pem(c) for c in chain], key)
        log.debug("got %s", cert)
        return cert

    async def close(self) -> None:
        self._drop_channel()
        await self._close_stale()

