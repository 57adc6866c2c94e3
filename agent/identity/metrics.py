"""Prometheus metrics of workload certificates."""

from __future__ import annotations

import contextlib

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge


class CertificateMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else REGISTRY
        self.expiry = Gauge(
            "nodemesh_certificate_expiry_timestamp_seconds",
            "Unix time at which the current certificate of an identity expires",
            ["identity"], registry=reg)
        self.rotations = Counter(
            "nodemesh_certificate_rotations",
            "Certificates obtained (first issue and renewals)", ["identity"], registry=reg)
        self.failures = Counter(
            "nodemesh_certificate_rotation_failures",
            "Failed certificate requests, by cause (gRPC status or invalid_response)",
            ["identity", "reason"], registry=reg)
        self.in_flight = Gauge(
            "nodemesh_certificate_csrs_in_flight", "CSRs sent and not yet answered",
            registry=reg)

    def forget(self, identity: str) -> None:
        """Drop the per-identity gauge of an identity that left the node (counters stay)."""
        with contextlib.suppress(KeyError):  # it never had a certificate
            self.expiry.remove(identity)


class CaMetrics:
    """The CA service's counters. Without a registry they still count (tests read them)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.issued = Counter("nodemesh_ca_certificates_issued",
                              "Workload certificates the CA signed", registry=registry)
        self.refusals = Counter(
            "nodemesh_ca_csr_refusals",
            "CSRs the CA refused, by gRPC status code and reason", ["code", "reason"],
            registry=registry)
        self.token_reviews = Counter(
            "nodemesh_ca_token_reviews",
            "ServiceAccount token checks (TokenReview or JWKS), by result", ["result"],
            registry=registry)
