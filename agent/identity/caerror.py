"""CaError, apart from the gRPC client so that code handling it need not load grpc."""

from __future__ import annotations


class CaError(Exception):
    """A certificate could not be obtained. `reason` is a short label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
