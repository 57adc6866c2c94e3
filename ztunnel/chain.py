"""Connections served by a chain of callbacks instead of a Task each.

A Task per connection costs loop turns: its start, and a wake-up for every future it awaits
(connect_accepted_socket's waiter, the CONNECT response, the upstream connect). On the common
paths (an outbound connection on a pooled HBONE connection, an inbound CONNECT stream) the
tunnel instead runs each step from the callback that made it possible: the accept, the
connection_made of a transport, the response future's done callback, the socket's writability.

A chain is a `Flight`: the tunnel tracks it like a Task (drain waits for `done`, close calls
`cancel`), every step runs under `Flight.step` (a bug closes the connection and reports it
once, as ConnectionGuard.run does for a Task), and every wait has a timer that each exit path
cancels.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from mypy_extensions import mypyc_attr

from ztunnel.carry import stream_finished, stream_opened
from ztunnel.events import ConnectionEvent
from ztunnel.guard import ConnectionGuard
from ztunnel.relay import PlainSide
from ztunnel.session import HboneSession

log = logging.getLogger(__name__)


class MadePlain(PlainSide):
    """A paused PlainSide that calls `on_made` once its transport is in place."""

    def __init__(self, on_made: Callable[[MadePlain], None]) -> None:
        super().__init__(start_paused=True)
        self._on_made: Callable[[MadePlain], None] | None = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        on_made, self._on_made = self._on_made, None
        if on_made is not None:
            on_made(self)


def plain_transport(sock: socket.socket, plain: PlainSide) -> asyncio.Transport:
    """asyncio's socket transport around a connected socket, without connect_accepted_socket's
    waiter future and the Task hop that reads it; connection_made runs on the next loop turn.
    The selector loop's transport factory is not public API (stable since Python 3.4); the
    tunnel runs on that loop only."""
    make = getattr(asyncio.get_running_loop(), "_make_socket_transport", None)
    if make is None:
        raise RuntimeError("this event loop has no socket transport factory (not asyncio's "
                           "selector loop)")
    sock.setblocking(False)
    transport: asyncio.Transport = make(sock, plain)
    return transport


@mypyc_attr(allow_interpreted_subclasses=True)  # outbound/inbound (interpreted) subclass it
class Flight:
    """One connection's callback chain: `done` resolves once it has ended (its close event is
    out or it never had one)."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()

    def step(self, fn: Callable[..., None], *args: Any) -> None:
        """Run one step of the chain (a callback's body). A bug ends the connection the way
        ConnectionGuard.run ends a failed handler: one bounded line, sockets closed, the close
        event out once."""
        if self.done.done():
            return  # cancelled or failed meanwhile: a late callback has nothing to do
        try:
            fn(*args)
        except Exception as exc:
            self._abort()
            self.guard.failed(exc)
            self.finish()

    def cancel(self) -> None:
        """The tunnel is closing (or a drain deadline passed): reset and report."""
        if self.done.done():
            return
        self._abort()
        self.guard.cancelled()
        self.finish()

    def carry(self, ev: ConnectionEvent, session: HboneSession, sid: int, plain: PlainSide, *,
              source_side: bool) -> None:
        """carry.carry_stream by callbacks: report open, join, and report the close and finish
        once `plain` is done."""
        if stream_opened(self.guard, ev, session, sid, plain):
            plain.done.add_done_callback(
                lambda _: self.step(self._carried, ev, plain, source_side))
        else:
            self._carried(ev, plain, source_side)

    def _carried(self, ev: ConnectionEvent, plain: PlainSide, source_side: bool) -> None:
        stream_finished(self.guard, ev, plain, source_side=source_side)
        self.finish()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def _abort(self) -> None:
        """Release what the chain holds (timers, sockets, streams): it stops here."""
        raise NotImplementedError


Track = Callable[[Flight], None]
