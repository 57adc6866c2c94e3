"""SPIFFE identities in Istio's form: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"
# Trust domains are DNS-like; namespaces and service accounts are Kubernetes names. Matched with
# fullmatch: `$` alone would also accept a trailing newline.
_TD = re.compile(r"[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?")
_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
# Node agents authenticate to the embedded CA with a client certificate whose only URI SAN is
# spiffe://<td>/nodemesh/node/<node>. It cannot parse as a workload Identity (no ns/sa path), so a
# workload certificate can never pass as a node and the CA never signs a node id from a CSR.
_NODE_PATH = "/nodemesh/node/"


class IdentityError(ValueError):
    """A string or certificate does not carry a valid SPIFFE identity."""


@dataclass(frozen=True, order=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not _TD.fullmatch(self.trust_domain):
            raise IdentityError(f"invalid trust domain {self.trust_domain!r}")
        for what, value in (("namespace", self.namespace),
                            ("service account", self.service_account)):
            if not _NAME.fullmatch(value):
                raise IdentityError(f"invalid {what} {value!r}: want a lowercase Kubernetes name")

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Parse exactly spiffe://<td>/ns/<ns>/sa/<sa>; anything else is an IdentityError."""
        if not uri.startswith(SCHEME):
            raise IdentityError(f"{uri!r} is not a SPIFFE id: must start with {SCHEME}")
        parts = uri[len(SCHEME) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise IdentityError(f"{uri!r}: want spiffe://<trust-domain>/ns/<namespace>/sa/<account>")
        return cls(parts[0], parts[2], parts[4])

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form Istio policies match against: the URI without spiffe://."""
        return self.uri[len(SCHEME) :]

    def __str__(self) -> str:
        return self.uri


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def from_certificate(cert: x509.Certificate) -> Identity:
    """The identity of a certificate: it must carry exactly one URI SAN, a valid SPIFFE id."""
    sans = uri_sans(cert)
    if len(sans) != 1:
        raise IdentityError(f"certificate has {len(sans)} URI SANs, want exactly one SPIFFE id")
    return Identity.parse(sans[0])


def from_der(der: bytes) -> Identity:
    return from_certificate(x509.load_der_x509_certificate(der))


def node_uri(trust_domain: str, node: str) -> str:
    """The URI SAN of a node agent's client certificate for the embedded CA."""
    if not _TD.fullmatch(trust_domain):
        raise IdentityError(f"invalid trust domain {trust_domain!r}")
    if not _NAME.fullmatch(node):
        raise IdentityError(f"invalid node name {node!r}: want a lowercase Kubernetes name")
    return f"{SCHEME}{trust_domain}{_NODE_PATH}{node}"


def node_from_uri(uri: str, trust_domain: str) -> str:
    """The node name in a node URI of trust_domain (see node_uri); IdentityError otherwise."""
    prefix = f"{SCHEME}{trust_domain}{_NODE_PATH}"
    if not uri.startswith(prefix):
        raise IdentityError(f"{uri!r} is not a node id of trust domain {trust_domain}: "
                            f"want {prefix}<node>")
    node = uri[len(prefix) :]
    if not _NAME.fullmatch(node):
        raise IdentityError(f"{uri!r}: invalid node name {node!r}")
    return node
