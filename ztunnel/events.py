"""Per-connection events for telemetry: one on open and one on close of every proxied connection."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from agent.identity.spiffe import Identity

log = logging.getLogger(__name__)


class Direction(enum.Enum):
    OUTBOUND = "outbound"  # app in a local pod -> somewhere (15001)
    INBOUND = "inbound"  # HBONE into a local pod (15008)
    INBOUND_PLAINTEXT = "inbound_plaintext"  # plaintext into a local pod (15006)


class Flag(enum.Flag):
    """Response flags (like Istio's): what happened to the connection."""

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


@dataclass
class ConnectionEvent:
    """Telemetry record; `phase` is "open" or "close"; byte counts are from the app's side."""

    phase: str
    direction: Direction
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
    flags: Flag = Flag.NONE
    reason: str = ""
    started: float = field(default_factory=time.monotonic)

    def closed(self, **changes: object) -> ConnectionEvent:
        ev = replace(self, phase="close", **changes)  # type: ignore[arg-type]  # dataclass replace takes the field kwargs
        ev.duration = time.monotonic() - self.started
        return ev


EventHook = Callable[[ConnectionEvent], None]


def emit(hook: EventHook | None, ev: ConnectionEvent) -> None:
    if hook is None:
        return
    try:
        hook(ev)
    except Exception:
        # Telemetry must never break the data path.
        log.exception("connection event hook failed")
