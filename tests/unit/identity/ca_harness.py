"""A real embedded CA on loopback (gRPC over TLS) for the identity tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

from agent.identity import pki
from agent.identity.ca import CertificateAuthority, NodeAuthenticator, WorkloadLocator
from agent.identity.caclient import CaClient
from agent.identity.caserver import CaServer
from agent.identity.spiffe import Identity

TD = "cluster.local"
TOKENS = {"token-n1": "n1", "token-n2": "n2"}
FRONTEND = Identity(TD, "shop", "frontend")
BACKEND = Identity(TD, "shop", "backend")
DB = Identity(TD, "data", "db")  # scheduled on n2 only


class Placement:
    """A mutable WorkloadLocator: node -> identities, as the control-plane state would hold."""

    def __init__(self, placement: Mapping[str, Iterable[Identity]]) -> None:
        self.nodes = {n: set(ids) for n, ids in placement.items()}

    def identities_on_node(self, node: str) -> set[Identity]:
        return set(self.nodes.get(node, ()))


def default_placement() -> Placement:
    return Placement({"n1": {FRONTEND, BACKEND}, "n2": {DB}})


@dataclass
class RunningCa:
    ca: CertificateAuthority
    server: CaServer
    address: str

    @property
    def root_pem(self) -> str:
        return pki.cert_to_pem(self.ca.authority.root)

    def client(self, token: str | None = "token-n1", **kw: object) -> CaClient:
        return CaClient(self.address, self.root_pem, token=token, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def running_ca(*, authority: pki.Authority | None = None, max_ttl: timedelta | None = None,
                     placement: WorkloadLocator | None = None, require_node_cert: bool = False,
                     port: int = 0) -> AsyncIterator[RunningCa]:
    ca = CertificateAuthority(authority or pki.Authority.generate(TD),
                              placement or default_placement(), TD)
    if max_ttl is not None:
        ca.max_ttl = max_ttl
    server = CaServer(ca, NodeAuthenticator(TOKENS, TD), require_node_cert=require_node_cert)
    bound = await server.start(f"127.0.0.1:{port}")
    try:
        yield RunningCa(ca, server, f"127.0.0.1:{bound}")
    finally:
        await server.stop(None)
