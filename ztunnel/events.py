"""Per-connection events for telemetry: one on open and one on close of every proxied connection,
and one for every refusal (a refused connection never opens, so it only has the close).

The event vocabulary is Istio's: `response` is the response flag that flow records, metrics and
logs use as is (see docs/telemetry.md), and `cause` is a verdict-name token saying which check
refused the connection. `reason` is the human explanation for logs and tests; it is free text and
never used as a label.
"""

from __future__ import annotations

import copy
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from agent.identity.spiffe import Identity
from ztunnel.lograte import RepeatLimiter

log = logging.getLogger(__name__)
log.addFilter(RepeatLimiter.shared())


class TunnelDirection(enum.Enum):
    OUTBOUND = "outbound"  # app in a local pod -> somewhere (15001)
    INBOUND = "inbound"  # HBONE into a local pod (15008)
    INBOUND_PLAINTEXT = "inbound_plaintext"  # plaintext into a local pod (15006)


class Phase(enum.StrEnum):
    OPEN = "open"
    CLOSE = "close"


class TransportFlag(enum.Flag):
    """The tunnel's own facts about one connection: how it was carried (CONNECT, HBONE,
    PASSTHROUGH, RESET) plus a coarse outcome bit, combinable as bits.

    A different vocabulary from `ResponseFlag`, which is Istio's single response-flag label:
    telemetry reads `ConnectionEvent.response` for outcomes and only the transport bits from
    here (agent/runtime/flows.py), so the two stay separate types."""

    NONE = 0
    CONNECT = enum.auto()  # tunnel or upstream established
    HBONE = enum.auto()  # carried over HBONE
    PASSTHROUGH = enum.auto()  # destination outside the mesh: plain TCP
    DENY = enum.auto()  # refused by policy (401 / EPERM) or STRICT mode
    TLS_FAILURE = enum.auto()  # mTLS handshake or identity check failed
    BAD_REQUEST = enum.auto()  # CONNECT failed validation (400)
    UPSTREAM_FAILURE = enum.auto()  # upstream connect failed (503 / refused / timeout)
    RESET = enum.auto()  # ended by a reset in either direction
    NO_ROUTE = enum.auto()  # destination unknown and passthrough not allowed


class ResponseFlag(enum.StrEnum):
    """Istio's response flags, as exposed in the `response_flags` label and the flow record.

    ztunnel's own flags first (DENY ... CERT_REVOKED), then the Envoy flags ztunnel has no name
    for: Envoy's DPE (downstream protocol error) for a malformed CONNECT, NR (no route) for a
    destination the tunnel has no way to reach and UH (no healthy upstream) for a Service with
    no ready endpoint, UO (upstream overflow) for a Service port at its connection cap and RL
    (rate limited) for a connect a ConnectionRateLimit refused. `-` is a
    clean connection; any other flag counts
    the connection in istio_tcp_connections_failed_total.
    """

    NONE = "-"
    DENY = "DENY"  # authorization policy (or STRICT mTLS, which Istio expresses as a policy)
    CONNECT = "CONNECT"  # the upstream connection could not be made (Envoy's UF)
    TLS_FAILURE = "TLS_FAILURE"  # the mTLS handshake failed
    H2_HANDSHAKE_FAILURE = "H2_HANDSHAKE_FAILURE"
    NETWORK_POLICY = "NETWORK_POLICY"
    IDENTITY_ERROR = "IDENTITY_ERROR"  # handshake done, but the peer's identity is not acceptable
    CERT_REVOKED = "CERT_REVOKED"
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"  # malformed CONNECT request (400)
    NO_ROUTE = "NR"  # no route: outside the mesh with passthrough off, or a tunnel port
    NO_HEALTHY_UPSTREAM = "UH"  # a Service VIP with no ready endpoint (refused in the kernel)
    UPSTREAM_OVERFLOW = "UO"  # a Service port's connection cap reached (refused in the kernel)
    RATE_LIMITED = "RL"  # a ConnectionRateLimit refused the connect (in the kernel)


class Cause(enum.StrEnum):
    """Which check refused a connection: the flow record's `reason` token for tunnel refusals."""

    TLS_HANDSHAKE = "TLS_HANDSHAKE"  # handshake failed (chain, expiry, alert from the peer)
    PEER_IDENTITY = "PEER_IDENTITY"  # verified certificate, wrong or foreign identity, no ALPN
    STRICT_MTLS = "STRICT_MTLS"  # plaintext to a STRICT pod
    POLICY_DENY = "POLICY_DENY"  # the policy program refused the upstream connect (EPERM)
    REMOTE_DENY = "REMOTE_DENY"  # the destination tunnel answered 401
    BAD_METHOD = "BAD_METHOD"  # CONNECT request with another method
    BAD_AUTHORITY = "BAD_AUTHORITY"  # :authority not a literal ip:port
    WRONG_DESTINATION = "WRONG_DESTINATION"  # :authority names another pod's address
    ILLEGAL_PORT = "ILLEGAL_PORT"  # a tunnel port as the target (loop)
    REMOTE_BAD_REQUEST = "REMOTE_BAD_REQUEST"  # the destination tunnel answered 400
    OUTSIDE_MESH = "OUTSIDE_MESH"  # not in the mesh and passthrough is off
    UPSTREAM = "UPSTREAM"  # upstream connect failed / 503
    DRAINING = "DRAINING"  # the tunnel is shutting down


@dataclass
class ConnectionEvent:
    """Telemetry record; byte counts are from the app's side."""

    phase: Phase
    direction: TunnelDirection
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    src_workload: str = ""
    dst_workload: str = ""
    src_identity: Identity | None = None
    dst_identity: Identity | None = None
    bytes_sent: int = 0  # toward the destination
    bytes_received: int = 0  # back toward the source
    duration: float = 0.0
    flags: TransportFlag = TransportFlag.NONE
    reason: str = ""  # human explanation (logs); `cause` is the token
    started: float = field(default_factory=time.monotonic)
    response: ResponseFlag = ResponseFlag.NONE
    cause: Cause | None = None
    # Outbound to a Service: the VIP:port the kernel chose dst from ("": not a Service connect).
    svc_ip: str = ""
    svc_port: int = 0

    def __post_init__(self) -> None:
        if type(self.phase) is not Phase:
            self.phase = Phase(self.phase)

    def closed(self, **changes: object) -> ConnectionEvent:
        # A copy, not dataclasses.replace (which runs __init__ again): one per connection.
        unknown = changes.keys() - _EVENT_FIELDS
        if unknown:
            raise TypeError(f"ConnectionEvent has no field(s) {sorted(unknown)}")
        ev = copy.copy(self)
        ev.phase = Phase.CLOSE
        ev.__dict__.update(changes)
        ev.duration = time.monotonic() - self.started
        return ev

    def refused(self, response: ResponseFlag, cause: Cause, flags: TransportFlag,
                reason: str = "") -> ConnectionEvent:
        """The close event of a connection refused before it carried data."""
        return self.closed(response=response, cause=cause, flags=flags, reason=reason)


_EVENT_FIELDS = frozenset(f.name for f in fields(ConnectionEvent))

EventHook = Callable[[ConnectionEvent], None]


def emit(hook: EventHook | None, ev: ConnectionEvent) -> None:
    if hook is None:
        return
    try:
        hook(ev)
    except Exception as exc:
        # Telemetry must never break the data path. One bounded line; the traceback only at
        # DEBUG, so a telemetry bug hit by every refusal cannot flood the log.
        log.error("BUG: connection event hook failed: %s: %.200s", type(exc).__name__, exc)
        log.debug("connection event hook traceback", exc_info=True)
