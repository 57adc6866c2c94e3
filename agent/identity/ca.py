"""The embedded CA: Istio's CreateCertificate API, signing only workloads on the caller's node.

Two layers:
- `CertificateAuthority.sign` is the policy core (no I/O): it validates a CSR against the
  caller's node and returns the PEM chain or raises `CaRejection` with a gRPC status and a message
  naming the cause.
- `CaServer` (agent/identity/caserver.py, the only part that imports grpc) serves it with
  grpc.aio over TLS (server certificate issued by the same root for the
  listen address) and authenticates the calling node agent:
  * bearer token (`authorization: Bearer <token>` metadata), tokens mapped to node names; or
  * a node client certificate issued by this CA whose only URI SAN is
    spiffe://<td>/nodemesh/node/<node> (see spiffe.node_uri). grpc's Python API cannot make a
    client certificate optional, so this mode (`require_node_cert=True`) requires one on every
    connection; a bearer token sent alongside must then name the same node; or
  * a Kubernetes ServiceAccount token (`token_auth`, agent/caauth): the caller is the node agent
    whose bound pod runs on a node, and it gets what istiod's node authorizer grants: its own
    identity, or with metadata.ImpersonatedIdentity an identity a pod on its node runs as.

Every refusal is a `CaRejection` with a gRPC status (`Status`), a message naming the cause and a
short reason label; CaServer counts it (CaMetrics) and writes one audit line (CaAudit).
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from agent.identity import pki
from agent.identity.caprotocol import IMPERSONATED_IDENTITY
from agent.identity.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    Identity,
    IdentityError,
    node_from_uri,
    node_uri,
    uri_sans,
)
from agent.identity.workloadcert import DEFAULT_TTL

if TYPE_CHECKING:  # the in-process CA gets no protobuf metadata; protobuf loads only to serve
    from google.protobuf import struct_pb2

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


class Status(enum.Enum):
    """The gRPC status codes the CA answers with (same names and numbers as grpc.StatusCode);
    defined here so the in-process CA of `nodemesh run` does not load grpc (~20 MiB)."""

    INVALID_ARGUMENT = 3
    PERMISSION_DENIED = 7
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


@dataclass
class CaRejection(Exception):  # noqa: N818  # a rejected request, not an error of the CA itself
    """A request the CA refuses; code and message go back to the caller as the gRPC status.
    `reason` is a short label for metrics and the audit log (default: the code's name)."""

    code: Status
    message: str
    reason: str = ""

    def __post_init__(self) -> None:
        self.reason = self.reason or self.code.name.lower()

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def _invalid(message: str, reason: str = "invalid_csr") -> CaRejection:
    return CaRejection(Status.INVALID_ARGUMENT, message, reason)


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
                raise CaRejection(Status.PERMISSION_DENIED,
                                f"without metadata.{IMPERSONATED_IDENTITY} a caller gets only "
                                f"its own identity {own_identity}; the CSR asks for {identity}",
                                "not_own_identity")
            return self._issue(identity, public_key, ttl, node)
        try:
            scheduled = self.locator.identities_on_node(node)
        except Exception as e:  # the state store is a separate component; say so to the caller
            log.exception("workload locator failed for node %s", node)
            raise CaRejection(Status.UNAVAILABLE,
                            f"CA cannot tell which workloads run on node {node} right now: "
                            f"{type(e).__name__}: {e}", "locator_unavailable") from e
        if identity not in scheduled:
            raise CaRejection(Status.PERMISSION_DENIED,
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
        raise CaRejection(Status.UNAUTHENTICATED,
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
            raise CaRejection(Status.UNAUTHENTICATED,
                            f"bearer token is for node {token_node} but the client certificate "
                            f"is for node {cert_node}")
        node = cert_node or token_node
        if node is None:
            raise CaRejection(Status.UNAUTHENTICATED,
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
            raise CaRejection(Status.UNAUTHENTICATED,
                            "bearer token is not recognised (not in the CA's token file)")
        return node

    def _node_from_cert(self, pem: bytes) -> str:
        cert = x509.load_pem_x509_certificate(pem)
        sans = uri_sans(cert)
        if len(sans) != 1:
            raise CaRejection(Status.UNAUTHENTICATED,
                            f"client certificate has {len(sans)} URI SANs; want one node id")
        try:
            return node_from_uri(sans[0], self.trust_domain)
        except IdentityError as e:
            raise CaRejection(Status.UNAUTHENTICATED,
                            f"client certificate is not a node certificate: {e}") from e
