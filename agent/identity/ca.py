"""The embedded CA: Istio's CreateCertificate API, signing only workloads on the caller's node.

Two layers:
- `CertificateAuthority.sign` is the policy core (no I/O): it validates a CSR against the
  caller's node and returns the PEM chain or raises `CaRejection` with a gRPC status and a message
  naming the cause.
- `CaServer` serves it with grpc.aio over TLS (server certificate issued by the same root for the
  listen address) and authenticates the calling node agent:
  * bearer token (`authorization: Bearer <token>` metadata), tokens mapped to node names; or
  * a node client certificate issued by this CA whose only URI SAN is
    spiffe://<td>/nodemesh/node/<node> (see spiffe.node_uri). grpc's Python API cannot make a
    client certificate optional, so this mode (`require_node_cert=True`) requires one on every
    connection; a bearer token sent alongside must then name the same node; or
  * a Kubernetes ServiceAccount token (`token_auth`, agent/caauth): the caller is the node agent
    whose bound pod runs on a node, and it gets what istiod's node authorizer grants: its own
    identity, or with metadata.ImpersonatedIdentity an identity a pod on its node runs as.

Every refusal is a `CaRejection` with a gRPC status, a message naming the cause and a short reason
label; CaServer counts it (CaMetrics) and writes one audit line (CaAudit).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import grpc
import grpc.aio
import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from google.protobuf import struct_pb2

from agent.identity import pki
from agent.identity.caaudit import CaAudit
from agent.identity.metrics import CaMetrics
from agent.identity.proto import (
    IMPERSONATED_IDENTITY,
    METHOD_NAME,
    SERVICE_NAME,
    IstioCertificateRequest,
    IstioCertificateResponse,
)
from agent.identity.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    Identity,
    IdentityError,
    node_from_uri,
    node_uri,
    uri_sans,
)
from agent.identity.workloadcert import DEFAULT_TTL

log = logging.getLogger(__name__)

MAX_TTL = timedelta(hours=24)
# A workload CSR (one key, one URI SAN) is 0.3-2 KiB; anything far larger is not one.
MAX_CSR_BYTES = 64 * 1024


class WorkloadLocator(Protocol):
    """Where workloads run; the control-plane state implements it."""

    def identities_on_node(self, node: str) -> set[Identity]: ...


class StaticWorkloadLocator:
    """A fixed node -> identities map (tests, and `nodemesh ca serve --workloads FILE`)."""

    def __init__(self, placement: Mapping[str, Iterable[Identity]]) -> None:
        self._placement = {node: set(ids) for node, ids in placement.items()}

    def identities_on_node(self, node: str) -> set[Identity]:
        return set(self._placement.get(node, ()))

    @classmethod
    def from_yaml(cls, path: Path) -> StaticWorkloadLocator:
        """A YAML mapping `node: [spiffe://td/ns/<ns>/sa/<sa>, ...]`."""
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: want a mapping of node name to a list of SPIFFE ids")
        placement: dict[str, list[Identity]] = {}
        for node, ids in doc.items():
            if not isinstance(node, str) or not isinstance(ids, list):
                raise ValueError(f"{path}: entry {node!r} must map a node name to a list")
            try:
                placement[node] = [Identity.parse(str(i)) for i in ids]
            except IdentityError as e:
                raise ValueError(f"{path}: node {node}: {e}") from e
        return cls(placement)


@dataclass
class CaRejection(Exception):  # noqa: N818  # a rejected request, not an error of the CA itself
    """A request the CA refuses; code and message go back to the caller as the gRPC status.
    `reason` is a short label for metrics and the audit log (default: the code's name)."""

    code: grpc.StatusCode
    message: str
    reason: str = ""

    def __post_init__(self) -> None:
        self.reason = self.reason or self.code.name.lower()

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def _invalid(message: str, reason: str = "invalid_csr") -> CaRejection:
    return CaRejection(grpc.StatusCode.INVALID_ARGUMENT, message, reason)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the node it runs on and, for a ServiceAccount-token caller, its
    own workload identity (which istiod would issue it without impersonation)."""

    node: str
    principal: str  # who, for logs and the audit line
    identity: Identity | None = None


class TokenAuthenticator(Protocol):
    """Turns a bearer token into a Caller or raises CaRejection (agent/caauth implements it)."""

    async def authenticate(self, token: str) -> Caller: ...


def _impersonated(metadata: struct_pb2.Struct | None) -> str | None:
    if metadata is None or IMPERSONATED_IDENTITY not in metadata.fields:
        return None
    value = metadata.fields[IMPERSONATED_IDENTITY]
    if value.WhichOneof("kind") != "string_value":
        raise _invalid(f"metadata.{IMPERSONATED_IDENTITY} must be a string SPIFFE id",
                       "invalid_impersonation")
    return value.string_value


@dataclass
class CertificateAuthority:
    """Signs workload CSRs for the identities a node runs. No I/O: see CaServer for the wire."""

    authority: pki.Authority
    locator: WorkloadLocator
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    max_ttl: timedelta = MAX_TTL
    default_ttl: timedelta = DEFAULT_TTL

    def sign(self, node: str, csr_pem: str, ttl_seconds: int = 0,
             metadata: struct_pb2.Struct | None = None, *,
             own_identity: Identity | None = None) -> list[str]:
        """PEM chain (leaf first, root last) for the CSR, or CaRejection saying why not.

        own_identity (ServiceAccount-token callers): as istiod, a request without
        metadata.ImpersonatedIdentity gets only the caller's own identity; with it, the
        identity must run on the caller's node. Without own_identity (token-file and node
        certificate callers) every identity is checked against the node.
        """
        identity, public_key = self._check_csr(csr_pem)
        requested = _impersonated(metadata)
        if requested is not None and requested != identity.uri:
            raise _invalid(f"metadata.{IMPERSONATED_IDENTITY} {requested} does not match the "
                           f"CSR's SAN {identity.uri}", "invalid_impersonation")
        ttl = self._ttl(ttl_seconds)
        if own_identity is not None and requested is None:
            if identity != own_identity:
                raise CaRejection(grpc.StatusCode.PERMISSION_DENIED,
                                  f"without metadata.{IMPERSONATED_IDENTITY} a caller gets only "
                                  f"its own identity {own_identity}; the CSR asks for {identity}",
                                  "not_own_identity")
            return self._issue(identity, public_key, ttl, node)
        try:
            scheduled = self.locator.identities_on_node(node)
        except Exception as e:  # the state store is a separate component; say so to the caller
            log.exception("workload locator failed for node %s", node)
            raise CaRejection(grpc.StatusCode.UNAVAILABLE,
                              f"CA cannot tell which workloads run on node {node} right now: "
                              f"{type(e).__name__}: {e}", "locator_unavailable") from e
        if identity not in scheduled:
            raise CaRejection(grpc.StatusCode.PERMISSION_DENIED,
                              f"identity {identity} is not scheduled on node {node}",
                              "not_on_node")
        return self._issue(identity, public_key, ttl, node)

    def _issue(self, identity: Identity, public_key: pki.PublicKey, ttl: timedelta,
               node: str) -> list[str]:
        leaf = self.authority.issue(public_key, ttl, uris=[identity.uri])
        log.info("issued %s for node %s, serial %x, expires %s", identity, node,
                 leaf.serial_number, leaf.not_valid_after_utc)
        return self.authority.chain_pems(leaf)

    def _check_csr(self, csr_pem: str) -> tuple[Identity, pki.PublicKey]:
        data = csr_pem.encode(errors="replace")
        if len(data) > MAX_CSR_BYTES:
            raise _invalid(f"CSR is {len(data)} bytes; this CA takes at most {MAX_CSR_BYTES}")
        try:
            csr = x509.load_pem_x509_csr(data)
        except (ValueError, x509.InvalidVersion) as e:
            raise _invalid(f"csr is not a PEM certificate request: {e}") from e
        # The parser is lazy: the key, the signature and the extensions may each still turn out
        # malformed or of a kind cryptography does not support.
        try:
            key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as e:
            raise _invalid(f"CSR public key is malformed or of an unsupported type: {e}") from e
        if not pki.acceptable_key(key):
            raise _invalid(f"CSR key is {pki.describe_key(key)}; want ECDSA P-256 or RSA >= 2048")
        try:
            signature_valid = csr.is_signature_valid
        except (ValueError, UnsupportedAlgorithm) as e:
            raise _invalid(f"CSR signature cannot be checked: {e}") from e
        if not signature_valid:
            raise _invalid("CSR signature does not verify against its own public key "
                           "(corrupted or tampered CSR)")
        try:
            sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise _invalid("CSR has 0 URI SANs; want exactly one SPIFFE id") from None
        except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
            raise _invalid(f"CSR extensions are malformed: {e}") from e
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise _invalid(f"CSR has {len(uris)} URI SANs; want exactly one SPIFFE id")
        if len(sans) != 1:
            others = sorted({type(n).__name__ for n in sans} - {"UniformResourceIdentifier"})
            raise _invalid(f"CSR carries {', '.join(others)} SANs; only one URI SAN is allowed")
        try:
            identity = Identity.parse(uris[0])
        except IdentityError as e:
            raise _invalid(f"CSR URI SAN: {e}") from e
        if identity.trust_domain != self.trust_domain:
            raise _invalid(f"identity {identity} is in trust domain {identity.trust_domain}; "
                           f"this CA signs only {self.trust_domain}", "other_trust_domain")
        assert isinstance(key, pki.PublicKey)  # acceptable_key admitted only EC or RSA
        return identity, key

    def _ttl(self, seconds: int) -> timedelta:
        if seconds < 0:
            raise _invalid(f"validity_duration {seconds}s is negative", "invalid_ttl")
        if seconds == 0:
            return min(self.default_ttl, self.max_ttl)
        if seconds > self.max_ttl.total_seconds():
            raise _invalid(f"requested TTL {seconds}s exceeds the CA's maximum of "
                           f"{int(self.max_ttl.total_seconds())}s", "invalid_ttl")
        return timedelta(seconds=seconds)

    def issue_node_certificate(self, node: str, public_key: pki.PublicKey,
                               ttl: timedelta = timedelta(days=365)) -> list[str]:
        """A client certificate a node agent presents to this CA (require_node_cert mode)."""
        leaf = self.authority.issue(public_key, ttl, uris=[node_uri(self.trust_domain, node)],
                                    server=False)
        return self.authority.chain_pems(leaf)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of 'authorization: Bearer <token>' metadata, None without one."""
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        return None
    value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise CaRejection(grpc.StatusCode.UNAUTHENTICATED,
                          "authorization metadata is not of the form 'Bearer <token>'",
                          "malformed_authorization")
    return token.strip()


def _token_digest(token: str) -> bytes:
    # Look tokens up by digest so the dict lookup does not compare secrets byte by byte.
    return hashlib.sha256(token.encode()).digest()


@dataclass
class NodeAuthenticator:
    """Maps a caller to a node name from its bearer token or node client certificate."""

    tokens: Mapping[str, str] = field(default_factory=dict)  # token -> node
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    def __post_init__(self) -> None:
        self._by_digest = {_token_digest(t): n for t, n in self.tokens.items()}

    @staticmethod
    def load_tokens(path: Path) -> dict[str, str]:
        """A YAML mapping `token: node-name`."""
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
            raise ValueError(f"{path}: want a YAML mapping of token (string) to node name")
        return dict(doc)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]],
                     peer_cert_pem: bytes | None) -> str:
        cert_node = self._node_from_cert(peer_cert_pem) if peer_cert_pem else None
        token_node = self._node_from_token(metadata)
        if cert_node and token_node and cert_node != token_node:
            raise CaRejection(grpc.StatusCode.UNAUTHENTICATED,
                              f"bearer token is for node {token_node} but the client certificate "
                              f"is for node {cert_node}")
        node = cert_node or token_node
        if node is None:
            raise CaRejection(grpc.StatusCode.UNAUTHENTICATED,
                              "no caller credentials: send 'authorization: Bearer <token>' "
                              "metadata or a node client certificate")
        return node

    def knows(self, token: str) -> bool:
        """Is this one of the token file's tokens?"""
        return _token_digest(token) in self._by_digest

    def _node_from_token(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        token = bearer_token(metadata)
        if token is None:
            return None
        node = self._by_digest.get(_token_digest(token))
        if node is None:
            raise CaRejection(grpc.StatusCode.UNAUTHENTICATED,
                              "bearer token is not recognised (not in the CA's token file)")
        return node

    def _node_from_cert(self, pem: bytes) -> str:
        cert = x509.load_pem_x509_certificate(pem)
        sans = uri_sans(cert)
        if len(sans) != 1:
            raise CaRejection(grpc.StatusCode.UNAUTHENTICATED,
                              f"client certificate has {len(sans)} URI SANs; want one node id")
        try:
            return node_from_uri(sans[0], self.trust_domain)
        except IdentityError as e:
            raise CaRejection(grpc.StatusCode.UNAUTHENTICATED,
                              f"client certificate is not a node certificate: {e}") from e


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
            await context.abort(r.code, r.message)
            raise AssertionError("unreachable: abort raises") from None
        self.metrics.issued.inc()
        return IstioCertificateResponse(cert_chain=chain)

    async def _authenticate(self, metadata: list[tuple[str, str | bytes]],
                            peer_pem: bytes | None) -> Caller:
        cluster = next((v for k, v in metadata if k.lower() == "clusterid"), None)
        if self.cluster_id and cluster is not None:
            cluster = cluster if isinstance(cluster, str) else cluster.decode(errors="replace")
            if cluster != self.cluster_id:
                raise CaRejection(grpc.StatusCode.UNAUTHENTICATED,
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
                raise CaRejection(grpc.StatusCode.UNAUTHENTICATED,
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
