"""Istio's CA protocol (package istio.v1.auth): typed re-exports of the generated messages.

The service is wired with grpc's generic handlers from these names rather than from protoc's gRPC
plugin output (see build.py for why).
"""

from __future__ import annotations

from agent.identity.caprotocol import IMPERSONATED_IDENTITY
from agent.identity.proto.ca_pb2 import (
    DESCRIPTOR,
    IstioCertificateRequest,
    IstioCertificateResponse,
)

_SERVICE = DESCRIPTOR.services_by_name["IstioCertificateService"]
SERVICE_NAME: str = _SERVICE.full_name  # istio.v1.auth.IstioCertificateService
METHOD_NAME: str = _SERVICE.methods_by_name["CreateCertificate"].name
# The HTTP/2 :path of the RPC, as istiod serves it.
CREATE_CERTIFICATE_PATH = f"/{SERVICE_NAME}/{METHOD_NAME}"


__all__ = [
    "CREATE_CERTIFICATE_PATH",
    "IMPERSONATED_IDENTITY",
    "METHOD_NAME",
    "SERVICE_NAME",
    "IstioCertificateRequest",
    "IstioCertificateResponse",
]
