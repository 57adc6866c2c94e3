"""Names of Istio's CA protocol that code can use without loading the generated messages
(protobuf): the in-process CA of `nodemesh run` never sees a protobuf message."""

from __future__ import annotations

# Metadata key ztunnel sets when a node agent asks on behalf of a workload.
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
