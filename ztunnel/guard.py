"""One guard per accepted connection (or HBONE stream): it emits the connection's close event
exactly once, whatever path the handler takes: a refusal, a normal end, a handler bug or a
cancellation (drain deadline, shutdown). Telemetry counts on that: a second close would count a
connection twice, a missing one would leave it open forever.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from typing import Any, Protocol

from ztunnel.events import (
    Cause,
    ConnectionEvent,
    EventHook,
    Phase,
    ResponseFlag,
    TransportFlag,
    emit,
)
from ztunnel.lograte import RepeatLimiter

log = logging.getLogger(__name__)
log.addFilter(RepeatLimiter.shared())


class HookSource(Protocol):
    """Where the event hook is read at each emit (TunnelConfig): it may be replaced at run time."""

    on_event: EventHook | None


class ConnectionGuard:
    def __init__(self, hooks: HookSource, conn: socket.socket | None = None) -> None:
        self._hooks = hooks
        self._conn = conn
        self.event: ConnectionEvent | None = None  # the connection as last reported
        self.closed = False  # the close event went out (or the connection never had one)

    def track(self, ev: ConnectionEvent) -> ConnectionEvent:
        """The connection is identified (no event yet): a failure from here on reports it."""
        self.event = ev
        return ev

    def opened(self, ev: ConnectionEvent, flags: TransportFlag) -> None:
        """Report the connection open (once carrying, before any close)."""
        ev.flags = flags
        self.event = ev
        if not self.closed:
            emit(self._hooks.on_event, ev)

    def close(self, ev: ConnectionEvent) -> bool:
        """Emit `ev` (a close event) unless one went out already; True if this one did."""
        if ev.phase is not Phase.CLOSE:
            raise ValueError("ConnectionGuard.close takes a close event")
        if self.closed:
            log.debug("second close event for %s:%d -> %s:%d dropped", ev.src_ip, ev.src_port,
                      ev.dst_ip, ev.dst_port)
            return False
        self.closed = True
        emit(self._hooks.on_event, ev)
        return True

    def refuse(self, ev: ConnectionEvent, response: ResponseFlag, cause: Cause,
               flags: TransportFlag, reason: str = "") -> bool:
        self.event = ev
        return self.close(ev.refused(response, cause, flags, reason))

    def finished(self, **changes: object) -> bool:
        """The tracked connection ended (byte counts and final flags in `changes`)."""
        if self.event is None:
            self.closed = True
            return False
        return self.close(self.event.closed(**changes))

    async def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a connection handler; whatever happens, the socket is closed on failure and the
        close event goes out once."""
        try:
            await coro
        except asyncio.CancelledError:
            self.cancelled()
            raise
        except Exception as exc:
            self.failed(exc)

    def cancelled(self) -> None:
        """The handler (a Task or a callback chain) was cut short: tunnel closing or drain
        deadline."""
        self._close_socket()
        self._abandoned("cancelled (tunnel closing or drain deadline)")

    def failed(self, exc: Exception) -> None:
        """The handler raised: a bug, but one a peer may trigger at will: one bounded line,
        traceback at DEBUG (call from the except block)."""
        log.error("BUG: connection handler failed: %s: %.200s", type(exc).__name__, exc)
        log.debug("connection handler traceback", exc_info=True)
        self._close_socket()
        self._abandoned(f"handler failed: {type(exc).__name__}")

    def _abandoned(self, why: str) -> None:
        if self.event is None or self.closed:
            self.closed = True
            return
        self.finished(flags=self.event.flags | TransportFlag.RESET, reason=why)

    def _close_socket(self) -> None:
        if self._conn is not None:
            self._conn.close()
