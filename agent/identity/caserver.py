"""`CaServer`: the embedded CA (agent/identity/ca.py) served with grpc.aio over TLS.

Kept apart from ca.py so that only processes serving the CA over the network load grpc; the
running node agent signs in process. See ca.py for how callers are authenticated.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from datetime import timedelta

import grpc
import grpc.aio
from google.protobuf import struct_pb2

from agent.identity import pki
from agent.identity.ca import (
    Caller,
    CaRejection,
    CertificateAuthority,
    NodeAuthenticator,
    Status,
    TokenAuthenticator,
    _impersonated,
    bearer_token,
)
from agent.identity.caaudit import CaAudit
from agent.identity.metrics import CaMetrics
from agent.identity.proto import (
    METHOD_NAME,
    SERVICE_NAME,
    IstioCertificateRequest,
    IstioCertificateResponse,
)

log = logging.getLogger(__name__)


class CaServer:
    """CertificateAuthority + caller authentication served over gRPC/TLS.

    A bearer token that is not in the token file goes to `token_auth` when one is configured
    (a Kubernetes ServiceAccount token); node certificates and token-file tokens name a node.
    """

    def __init__(self, ca: CertificateAuthority, auth: NodeAuthenticator, *,
                 require_node_cert: bool = False,
                 server_names: Iterable[str] = (),
                 token_auth: TokenAuthenticator | None = None,
                 metrics: CaMetrics | None = None,
                 audit: CaAudit | None = None,
                 cluster_id: str | None = None) -> None:
        """cluster_id: the cluster whose nodes this CA authorizes; a caller that names another
        in its `clusterid` metadata (as ztunnel sends) is refused, as istiod refuses a cluster
        it has no node authorizer for."""
        self.ca = ca
        self.auth = auth
        self.require_node_cert = require_node_cert
        self.server_names = tuple(server_names)
        self.token_auth = token_auth
        self.metrics = metrics or CaMetrics()
        self.audit = audit
        self.cluster_id = cluster_id
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    def _server_credentials(self, host: str) -> grpc.ServerCredentials:
        dns, ips = _names_for(host, self.server_names)
        key = pki.generate_key()
        cert = self.ca.authority.issue(key.public_key(), timedelta(days=365), dns=dns, ips=ips,
                                       client=False)
        chain = "".join(self.ca.authority.chain_pems(cert)[:-1]).encode()  # root omitted
        root = pki.cert_to_pem(self.ca.authority.root).encode()
        return grpc.ssl_server_credentials(
            [(pki.key_to_pem(key), chain)],
            root_certificates=root if self.require_node_cert else None,
            require_client_auth=self.require_node_cert)

    async def start(self, listen: str) -> int:
        """Listen on host:port (port 0 picks one); returns the bound port."""
        host, _, port_s = listen.rpartition(":")
        host = host.strip("[]")
        if not host or not (port_s.isascii() and port_s.isdigit()):  # not "٨٠٨٠"
            raise ValueError(f"listen address {listen!r}: want host:port")
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            self._create_certificate,
            request_deserializer=IstioCertificateRequest.FromString,
            response_serializer=IstioCertificateResponse.SerializeToString)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, {METHOD_NAME: handler}),))
        self.port = server.add_secure_port(listen, self._server_credentials(host))
        if self.port == 0:
            raise OSError(f"could not listen on {listen} (address in use or not local?)")
        await server.start()
        self._server = server
        log.info("CA for %s listening on %s:%d", self.ca.trust_domain, host, self.port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _create_certificate(
            self, request: IstioCertificateRequest,
            context: grpc.aio.ServicerContext[IstioCertificateRequest, IstioCertificateResponse],
    ) -> IstioCertificateResponse:
        caller: Caller | None = None
        md = request.metadata if request.HasField("metadata") else None
        try:
            peer = context.auth_context().get("x509_pem_cert")
            peer_pem = next(iter(peer), None) if peer else None
            metadata = [(m[0], m[1]) for m in (context.invocation_metadata() or ())]
            caller = await self._authenticate(metadata, peer_pem)
            chain = self.ca.sign(caller.node, request.csr, request.validity_duration, md,
                                 own_identity=caller.identity)
        except CaRejection as r:
            self.metrics.refusals.labels(r.code.name, r.reason).inc()
            requested = _requested_identity(md)
            log.warning("CSR refused (%s, %s): %s", context.peer(),
                        caller.principal if caller else "unauthenticated", r)
            if self.audit is not None:
                self.audit.refusal(code=r.code.name, reason=r.reason, message=r.message,
                                   peer=context.peer(),
                                   caller=caller.principal if caller else None,
                                   node=caller.node if caller else None, requested=requested)
            await context.abort(grpc.StatusCode[r.code.name], r.message)
            raise AssertionError("unreachable: abort raises") from None
        self.metrics.issued.inc()
        return IstioCertificateResponse(cert_chain=chain)

    async def _authenticate(self, metadata: list[tuple[str, str | bytes]],
                            peer_pem: bytes | None) -> Caller:
        cluster = next((v for k, v in metadata if k.lower() == "clusterid"), None)
        if self.cluster_id and cluster is not None:
            cluster = cluster if isinstance(cluster, str) else cluster.decode(errors="replace")
            if cluster != self.cluster_id:
                raise CaRejection(Status.UNAUTHENTICATED,
                                f"caller is in cluster {cluster[:64]!r}; this CA authorizes the "
                                f"nodes of cluster {self.cluster_id!r}", "other_cluster")
        token = bearer_token(metadata)
        if self.token_auth is None or token is None or self.auth.knows(token):
            node = self.auth.authenticate(metadata, peer_pem)
            return Caller(node, f"node {node}")
        caller = await self.token_auth.authenticate(token)
        if peer_pem is not None:  # require_node_cert: both credentials must agree
            cert_node = self.auth.authenticate((), peer_pem)
            if cert_node != caller.node:
                raise CaRejection(Status.UNAUTHENTICATED,
                                f"ServiceAccount token is for node {caller.node} but the client "
                                f"certificate is for node {cert_node}", "credentials_disagree")
        return caller




def _requested_identity(md: struct_pb2.Struct | None) -> str | None:
    try:
        return _impersonated(md)
    except CaRejection:
        return None


def _names_for(host: str, extra: Iterable[str]) -> tuple[list[str], list[str]]:
    """DNS and IP SANs for the CA's server certificate: the listen host plus extra names.

    A wildcard listen address (0.0.0.0, ::) is not a name clients dial, so localhost and the
    loopback addresses are used for it; give the routable names with server_names.
    """
    names = [host, *extra]
    if host in ("0.0.0.0", "::", ""):
        names = ["localhost", "127.0.0.1", "::1", *extra]
    dns: list[str] = []
    ips: list[str] = []
    for name in dict.fromkeys(names):
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.append(name)
    return dns, ips
