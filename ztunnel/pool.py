"""HBONE connection pool: many user connections share few mTLS connections.

Keyed like ztunnel's WorkloadKey: (source identity, destination identity, destination IP, source
IP — the TLS connection leaves from the source pod's address). Up to `max_streams` streams per
connection, capped by the peer's SETTINGS_MAX_CONCURRENT_STREAMS. Only one dial per key at a
time: a burst of connections waits for that dial and reuses it instead of opening one TLS
connection each. Connections that got GOAWAY are not reused; idle ones close after a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.identity.spiffe import Identity
from ztunnel.session import HboneSession

log = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS = 100
DEFAULT_IDLE_TIMEOUT = 300.0


@dataclass(frozen=True)
class PoolKey:
    src_identity: Identity
    dst_identity: Identity
    dst_ip: str
    src_ip: str


Dialer = Callable[[PoolKey], Awaitable[HboneSession]]


class Pool:
    def __init__(self, dial: Dialer, max_streams: int = DEFAULT_MAX_STREAMS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self._dial = dial
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self._conns: dict[PoolKey, list[HboneSession]] = {}
        self._locks: dict[PoolKey, asyncio.Lock] = {}
        self._idle: dict[int, asyncio.TimerHandle] = {}
        # Counters, read at scrape time (nodemesh_hbone_* in agent/telemetry/metrics.py).
        self.connections_opened = 0
        self.streams_opened = 0
        self.dial_failures = 0

    # -- public ------------------------------------------------------------------------------
    async def open_stream(self, key: PoolKey,
                          headers: list[tuple[str, str]]) -> tuple[HboneSession, int]:
        """Open a CONNECT stream to `key`'s destination (reusing or dialing a connection)."""
        session = await self._checkout(key)
        try:
            sid = session.open_stream(headers)
        finally:
            session.reserved -= 1
        self.streams_opened += 1
        return session, sid

    def connections(self, key: PoolKey | None = None) -> list[HboneSession]:
        if key is not None:
            return list(self._conns.get(key, []))
        return [s for conns in self._conns.values() for s in conns]

    def close_all(self) -> None:
        for s in self.connections():
            s.close()
        for t in self._idle.values():
            t.cancel()
        self._idle.clear()

    # -- internals ---------------------------------------------------------------------------
    def _reserve(self, key: PoolKey) -> HboneSession | None:
        for s in self._conns.get(key, []):
            if s.usable and s.load < s.capacity(self.max_streams):
                s.reserved += 1
                timer = self._idle.pop(id(s), None)
                if timer is not None:
                    timer.cancel()
                return s
        return None

    async def _checkout(self, key: PoolKey) -> HboneSession:
        s = self._reserve(key)
        if s is not None:
            return s
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            s = self._reserve(key)
            if s is not None:
                return s
            try:
                s = await self._dial(key)
            except BaseException:
                self.dial_failures += 1
                raise
            self.connections_opened += 1
            self._conns.setdefault(key, []).append(s)
            s.on_change = lambda sess: self._changed(key, sess)
            s.reserved += 1
            return s

    def _changed(self, key: PoolKey, s: HboneSession) -> None:
        conns = self._conns.get(key, [])
        if s.closed.done() or s.core.goaway_received or s.core.terminated:
            # Not reusable. Let its streams finish; drop it from the pool.
            if s in conns:
                conns.remove(s)
            if not conns:
                self._conns.pop(key, None)
            timer = self._idle.pop(id(s), None)
            if timer is not None:
                timer.cancel()
            if not s.closed.done() and s.load == 0:
                s.close()
            return
        if s.load == 0 and id(s) not in self._idle:
            loop = asyncio.get_running_loop()
            self._idle[id(s)] = loop.call_later(self.idle_timeout, self._expire, key, s)

    def _expire(self, key: PoolKey, s: HboneSession) -> None:
        self._idle.pop(id(s), None)
        if s.load:
            return
        log.debug("closing idle HBONE connection to %s:%d", *s.remote_addr)
        conns = self._conns.get(key, [])
        if s in conns:
            conns.remove(s)
        if not conns:
            self._conns.pop(key, None)
        s.close()
