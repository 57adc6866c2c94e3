"""Carrying an established connection: report it open, relay until both halves end, report it
closed (through the connection's guard, so the close goes out once whatever happens)."""

from __future__ import annotations

import asyncio

from ztunnel.events import ConnectionEvent, TransportFlag
from ztunnel.guard import ConnectionGuard
from ztunnel.relay import PlainSide
from ztunnel.session import HboneSession


async def carry_stream(guard: ConnectionGuard, ev: ConnectionEvent, session: HboneSession,
                       sid: int, plain: PlainSide, *, source_side: bool) -> None:
    """An HBONE stream joined to `plain`: the source app's socket (source_side) or the
    destination app's."""
    if stream_opened(guard, ev, session, sid, plain):
        await _wait(plain)
    stream_finished(guard, ev, plain, source_side=source_side)


def stream_opened(guard: ConnectionGuard, ev: ConnectionEvent, session: HboneSession, sid: int,
                  plain: PlainSide) -> bool:
    """Report the stream open and join it to `plain`; False when the stream is already gone
    (then there is nothing to wait for). Its end is `stream_finished`, once `plain.done`."""
    guard.opened(ev, TransportFlag.CONNECT | TransportFlag.HBONE)
    return session.attach(sid, plain)


def stream_finished(guard: ConnectionGuard, ev: ConnectionEvent, plain: PlainSide, *,
                    source_side: bool) -> None:
    """Report a carried stream closed, its bytes counted from the app's side."""
    sent, received = ((plain.bytes_read, plain.bytes_written) if source_side
                      else (plain.bytes_written, plain.bytes_read))
    guard.finished(bytes_sent=sent, bytes_received=received,
                   flags=ev.flags | (TransportFlag.RESET if plain.reset_seen
                                     else TransportFlag.NONE))


async def splice(guard: ConnectionGuard, ev: ConnectionEvent, a: PlainSide, b: PlainSide,
                 flags: TransportFlag) -> None:
    """Two plain sockets relayed to each other (`a` is the source app's side)."""
    guard.opened(ev, flags)
    a.attach(b)
    b.attach(a)
    try:
        await asyncio.gather(a.done, b.done)
    except asyncio.CancelledError:
        a.reset()
        b.reset()
        raise
    guard.finished(bytes_sent=a.bytes_read, bytes_received=a.bytes_written,
                   flags=ev.flags | (TransportFlag.RESET if a.reset_seen or b.reset_seen
                                     else TransportFlag.NONE))


async def _wait(plain: PlainSide) -> None:
    try:
        await plain.done
    except asyncio.CancelledError:
        plain.reset()
        raise
