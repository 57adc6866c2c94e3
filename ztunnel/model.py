"""The tunnel's data types: enrolled pods, resolved workloads, the configuration with every
budget, and the counters the budgets trip (`Counters`, read by `Tunnel.stats()`).

Lowest layer of the tunnel modules: outbound, inbound, plaintext and upstream import it; it
imports none of them.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from agent import abi
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity
from ztunnel import hbone, podnet
from ztunnel.events import EventHook
from ztunnel.pool import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_STREAMS, DEFAULT_PREWARM_TTL
from ztunnel.tls import CertificateSource, PeerTrust

if TYPE_CHECKING:
    from ztunnel.session import HboneSession


class Mode(enum.Enum):
    """PeerAuthentication mode for plaintext arriving at a pod."""

    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"


@dataclass(frozen=True)
class TunnelWorkload:
    """What the resolver knows about a destination IP. identity None = not in the mesh."""

    ip: str
    identity: Identity | None = None
    name: str = ""


@dataclass(frozen=True)
class PodSpec:
    """An enrolled local pod: its netns (name under /var/run/netns, or a path), IP and identity."""

    uid: str
    netns: str
    ip: str
    identity: Identity
    name: str = ""
    mode: Mode = Mode.STRICT


Resolver = Callable[[str], TunnelWorkload | None]
OriginalDst = Callable[[socket.socket], tuple[ipaddress.IPv4Address, int]]
ServiceDst = Callable[[socket.socket], "tuple[ipaddress.IPv4Address, int] | None"]
IdentityIds = Callable[[Identity | None], int]


def _no_ids(_: Identity | None) -> int:
    return 0


# Budgets (docs/architecture.md, "Budgets"): each is a TunnelConfig field and an agent setting.
# TLS handshakes not yet finished at the HBONE port, over all pods, and from one source IP: a
# pending handshake holds buffers (~100-300 KiB) before the peer has proved anything.
DEFAULT_MAX_PENDING_HANDSHAKES = 1024
DEFAULT_MAX_PENDING_HANDSHAKES_PER_IP = 64
# Upstream connects to a pod's app in flight for one HBONE connection. As many as a client may
# have streams open (our SETTINGS_MAX_CONCURRENT_STREAMS, 200), so a legitimate burst never trips
# it; a stream reset while its connect runs frees its HTTP/2 slot at once but not this one, so a
# reset flood is held to this many half-open upstream sockets instead of one per reset.
DEFAULT_MAX_UPSTREAM_CONNECTS_PER_CONNECTION = 200
# Pre-warming: keep one spare idle HBONE connection to this many recently used destinations,
# for this long after their last use.
DEFAULT_PREWARM_DESTINATIONS = 64


@dataclass
class TunnelConfig:
    certificates: CertificateSource
    resolver: Resolver
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    identity_id: IdentityIds = _no_ids
    trust: PeerTrust | None = None  # federated trust domains and aliases; None: ours only
    original_dst: OriginalDst = podnet.original_dst
    inbound_original_dst: OriginalDst = podnet.local_address
    service_dst: ServiceDst = podnet.service_dst  # the VIP an outbound destination came from
    outside_mesh: Literal["passthrough", "refuse"] = "passthrough"
    on_event: EventHook | None = None
    hbone_port: int = abi.HBONE_PORT
    outbound_port: int = abi.OUTBOUND_PORT
    inbound_port: int = abi.INBOUND_PORT
    outbound_bind: str = "127.0.0.1"
    # False in data-plane workers: the control process prepared the netns once for all of them.
    prepare_netns: bool = True
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_streams_per_connection: int = DEFAULT_MAX_STREAMS
    settings: hbone.Settings = field(default_factory=hbone.Settings)
    client_settings: hbone.Settings = field(
        default_factory=lambda: hbone.Settings(max_concurrent_streams=DEFAULT_MAX_STREAMS))
    max_pending_handshakes: int = DEFAULT_MAX_PENDING_HANDSHAKES
    max_pending_handshakes_per_ip: int = DEFAULT_MAX_PENDING_HANDSHAKES_PER_IP
    max_upstream_connects_per_connection: int = DEFAULT_MAX_UPSTREAM_CONNECTS_PER_CONNECTION
    prewarm_destinations: int = DEFAULT_PREWARM_DESTINATIONS  # 0: no pre-warming
    prewarm_ttl: float = DEFAULT_PREWARM_TTL


@dataclass
class Counters:
    """Budget trips and refusals the tunnel counts itself (flat; `Tunnel.stats()` reads them,
    prefixed `tunnel_`)."""

    handshakes_pending: int = 0  # gauge
    handshakes_refused_global: int = 0  # max_pending_handshakes reached: socket reset
    handshakes_refused_per_ip: int = 0  # max_pending_handshakes_per_ip reached
    streams_reset_before_connect: int = 0  # no upstream connect: the client reset it first
    streams_refused_going_away: int = 0  # no upstream connect: the connection is going away
    upstreams_closed_stream_gone: int = 0  # connected, but the stream died meanwhile: closed
    upstream_connects_capped: int = 0  # max_upstream_connects_per_connection reached: 503
    upstream_connects: int = 0  # upstream connects to local apps attempted (inbound sides)

    def flat(self, prefix: str) -> dict[str, float]:
        return {prefix + f.name: float(getattr(self, f.name)) for f in fields(self)}


@dataclass
class PodState:
    """A pod as the tunnel holds it: its spec, listeners and accepted HBONE connections."""

    spec: PodSpec
    listeners: list[socket.socket] = field(default_factory=list)
    by_port: dict[int, socket.socket] = field(default_factory=dict)
    sessions: set[HboneSession] = field(default_factory=set)


Spawn = Callable[[Coroutine[Any, Any, None]], None]
