"""The tunnel's small shared parts: the close-once connection guard, handshake admission, the
typed upstream error and the h2 patch module's version check."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ztunnel import connect
from ztunnel.admission import HandshakeAdmission, Refusal
from ztunnel.chain import Flight
from ztunnel.events import (
    Cause,
    ConnectionEvent,
    EventHook,
    Phase,
    ResponseFlag,
    TransportFlag,
    TunnelDirection,
)
from ztunnel.guard import ConnectionGuard
from ztunnel.upstream import UpstreamError


class Hooks:
    def __init__(self, got: list[ConnectionEvent]) -> None:
        self.on_event: EventHook | None = got.append


def event() -> ConnectionEvent:
    return ConnectionEvent(Phase.OPEN, TunnelDirection.INBOUND, "10.0.0.1", 40000, "10.0.0.2",
                           8080)


def test_the_guard_emits_one_close_whatever_the_handler_does() -> None:
    got: list[ConnectionEvent] = []
    g = ConnectionGuard(Hooks(got))
    ev = g.track(event())
    g.opened(ev, TransportFlag.CONNECT)
    assert g.finished(bytes_sent=3) is True
    assert g.finished(bytes_sent=4) is False
    assert g.refuse(ev, ResponseFlag.DENY, Cause.POLICY_DENY, TransportFlag.DENY) is False
    assert [e.phase for e in got] == [Phase.OPEN, Phase.CLOSE] and got[1].bytes_sent == 3


def test_the_guard_closes_a_failed_or_cancelled_handler_once_and_its_socket() -> None:
    async def run() -> None:
        for failure in (RuntimeError("bug"), asyncio.CancelledError()):
            got: list[ConnectionEvent] = []
            a, b = socket.socketpair()
            g = ConnectionGuard(Hooks(got), a)

            async def handler(g: ConnectionGuard = g, failure: BaseException = failure) -> None:
                ev = g.track(event())
                g.opened(ev, TransportFlag.CONNECT)
                raise failure

            if isinstance(failure, asyncio.CancelledError):
                with pytest.raises(asyncio.CancelledError):
                    await g.run(handler())
            else:
                await g.run(handler())
            closes = [e for e in got if e.phase is Phase.CLOSE]
            assert len(closes) == 1 and closes[0].flags & TransportFlag.RESET
            assert a.fileno() == -1  # closed
            assert g.finished() is False  # and no second close afterwards
            b.close()

    asyncio.run(run())


class _Chain(Flight):
    """A callback chain with one step that fails and one that would come later."""

    def __init__(self, guard: ConnectionGuard) -> None:
        super().__init__(guard)
        self.aborted = 0
        self.late_steps = 0

    def start(self, failure: Exception | None) -> None:
        ev = self.guard.track(event())
        self.guard.opened(ev, TransportFlag.CONNECT)
        if failure is not None:
            raise failure

    def late(self) -> None:
        self.late_steps += 1

    def _abort(self) -> None:
        self.aborted += 1


def test_a_callback_chain_closes_once_on_a_bug_or_a_cancel_like_a_task() -> None:
    async def run() -> None:
        for failure in (RuntimeError("bug"), None):
            got: list[ConnectionEvent] = []
            a, b = socket.socketpair()
            chain = _Chain(ConnectionGuard(Hooks(got), a))
            chain.step(chain.start, failure)
            if failure is None:
                assert not chain.done.done()  # still carrying: the tunnel closes it
                chain.cancel()
            assert chain.done.done() and chain.aborted == 1
            closes = [e for e in got if e.phase is Phase.CLOSE]
            assert len(closes) == 1 and closes[0].flags & TransportFlag.RESET
            assert ("handler failed: RuntimeError" if failure else "drain deadline") in (
                closes[0].reason)
            assert a.fileno() == -1  # closed
            chain.step(chain.late)  # a callback arriving after the end does nothing
            chain.cancel()
            assert chain.late_steps == 0 and chain.aborted == 1
            assert len([e for e in got if e.phase is Phase.CLOSE]) == 1
            b.close()

    asyncio.run(run())


def test_a_refusal_before_any_event_is_the_only_close() -> None:
    got: list[ConnectionEvent] = []

    async def run() -> None:
        g = ConnectionGuard(Hooks(got))

        async def handler() -> None:
            ev = g.track(event())
            g.refuse(ev, ResponseFlag.NO_ROUTE, Cause.ILLEGAL_PORT, TransportFlag.BAD_REQUEST)
            raise RuntimeError("bug after the refusal")

        await g.run(handler())

    asyncio.run(run())
    assert [(e.phase, e.cause) for e in got] == [(Phase.CLOSE, Cause.ILLEGAL_PORT)]


def test_handshake_admission_caps_globally_and_per_source_ip() -> None:
    adm = HandshakeAdmission(max_pending=3, max_per_ip=2)
    assert adm.admit("10.0.0.1") is None and adm.admit("10.0.0.1") is None
    assert adm.admit("10.0.0.1") is Refusal.PER_IP
    assert adm.admit("10.0.0.2") is None
    assert adm.admit("10.0.0.3") is Refusal.GLOBAL
    adm.release("10.0.0.1")
    assert adm.pending == 2 and adm.pending_from("10.0.0.1") == 1
    assert adm.admit("10.0.0.3") is None
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        adm.release(ip)
    assert adm.pending == 0 and adm.pending_from("10.0.0.1") == 0
    with pytest.raises(RuntimeError):
        adm.release("10.0.0.1")
    with pytest.raises(ValueError):
        HandshakeAdmission(0, 1)


def test_upstream_errors_carry_status_flag_cause_and_reason() -> None:
    denied = UpstreamError.denied("EPERM")
    assert (denied.status, denied.response, denied.cause, denied.flag) == (
        connect.UNAUTHORIZED, ResponseFlag.DENY, Cause.POLICY_DENY, TransportFlag.DENY)
    down = UpstreamError.unavailable("refused")
    assert (down.status, down.response, down.cause) == (
        connect.UNAVAILABLE, ResponseFlag.CONNECT, Cause.UPSTREAM)
    remote = UpstreamError.from_status(connect.UNAUTHORIZED)
    assert remote.cause is Cause.REMOTE_DENY and remote.flag is TransportFlag.DENY
    assert UpstreamError.from_status(connect.BAD_REQUEST).cause is Cause.REMOTE_BAD_REQUEST
    assert UpstreamError.from_status(302).why == "unexpected status"
    ev = denied.refusal(event())
    assert (ev.phase, ev.response, ev.cause, ev.reason) == (
        Phase.CLOSE, ResponseFlag.DENY, Cause.POLICY_DENY, "EPERM")

