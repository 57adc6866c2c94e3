"""HBONE connection pool: many user connections share few mTLS connections.

Keyed like ztunnel's WorkloadKey: (source identity, destination identity, destination IP, source
IP — the TLS connection leaves from the source pod's address). Up to `max_streams` streams per
connection, capped by the peer's SETTINGS_MAX_CONCURRENT_STREAMS. Only one dial per key at a
time: a burst of connections waits for that dial and reuses it instead of opening one TLS
connection each. Connections that got GOAWAY are not reused; idle ones close after a timeout.

Pre-warming: for up to `prewarm_destinations` keys used in the last `prewarm_ttl` seconds the
pool keeps one spare idle connection (dialed in the background after a stream is opened), so a
connection that fills up, expires or gets GOAWAY is replaced without a handshake on the app's
path. Spares are counted apart (`prewarm_opened`); `connections_opened` counts dials on demand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.identity.spiffe import Identity
from ztunnel.session import HboneSession

log = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS = 100
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_PREWARM_TTL = 60.0


@dataclass(frozen=True)
class PoolKey:
    src_identity: Identity
    dst_identity: Identity
    dst_ip: str
    src_ip: str


Dialer = Callable[[PoolKey], Awaitable[HboneSession]]


class Pool:
    def __init__(self, dial: Dialer, max_streams: int = DEFAULT_MAX_STREAMS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, *, prewarm_destinations: int = 0,
                 prewarm_ttl: float = DEFAULT_PREWARM_TTL) -> None:
        self._dial = dial
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.prewarm_destinations = prewarm_destinations
        self.prewarm_ttl = prewarm_ttl
        self._recent: OrderedDict[PoolKey, float] = OrderedDict()  # key -> last use (monotonic)
        self._warming: dict[PoolKey, asyncio.Task[None]] = {}
        self._conns: dict[PoolKey, list[HboneSession]] = {}
        self._locks: dict[PoolKey, asyncio.Lock] = {}
        self._idle: dict[int, asyncio.TimerHandle] = {}
        # Counters, read at scrape time (nodemesh_hbone_* in agent/telemetry/metrics.py).
        self.connections_opened = 0
        self.streams_opened = 0
        self.dial_failures = 0
        self.prewarm_opened = 0
        self.prewarm_failures = 0

    # -- public ------------------------------------------------------------------------------
    async def open_stream(self, key: PoolKey,
                          headers: list[tuple[str, str]]) -> tuple[HboneSession, int]:
        """Open a CONNECT stream to `key`'s destination (reusing or dialing a connection)."""
        return self._opened(key, await self._checkout(key), headers)

    def try_open_stream(self, key: PoolKey,
                        headers: list[tuple[str, str]]) -> tuple[HboneSession, int] | None:
        """`open_stream` without waiting: None when no pooled connection has room now (the
        caller then awaits `open_stream`, which dials)."""
        session = self._reserve(key)
        return None if session is None else self._opened(key, session, headers)

    def _opened(self, key: PoolKey, session: HboneSession,
                headers: list[tuple[str, str]]) -> tuple[HboneSession, int]:
        try:
            sid = session.open_stream(headers)
        finally:
            session.reserved -= 1
        self.streams_opened += 1
        if self.prewarm_destinations > 0:
            self._prewarm(key)
        return session, sid

    def stats(self) -> dict[str, float]:
        """Flat counters and gauges (Tunnel.stats)."""
        return {
            "pool_connections_opened": float(self.connections_opened),
            "pool_streams_opened": float(self.streams_opened),
            "pool_dial_failures": float(self.dial_failures),
            "pool_prewarm_opened": float(self.prewarm_opened),
            "pool_prewarm_failures": float(self.prewarm_failures),
            "pool_connections": float(len(self.connections())),
            "pool_prewarm_destinations": float(len(self._recent)),
        }

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
        for task in self._warming.values():
            task.cancel()
        self._warming.clear()
        self._recent.clear()

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
            self._add(key, s)
            s.reserved += 1
            return s

    def _add(self, key: PoolKey, s: HboneSession) -> None:
        self._conns.setdefault(key, []).append(s)
        s.on_change = lambda sess: self._changed(key, sess)

    # -- pre-warming -------------------------------------------------------------------------
    def _prewarm(self, key: PoolKey) -> None:
        """`key` was just used: remember it (bounded, most recent last) and make sure it has a
        spare idle connection, dialing one in the background if not."""
        now = time.monotonic()
        self._recent[key] = now
        self._recent.move_to_end(key)
        while len(self._recent) > self.prewarm_destinations:
            self._recent.popitem(last=False)
        while self._recent:  # oldest first: drop the ones past their TTL
            oldest, used = next(iter(self._recent.items()))
            if now - used <= self.prewarm_ttl:
                break
            del self._recent[oldest]
        if key in self._warming or self._spare(key) is not None:
            return
        task = asyncio.get_running_loop().create_task(self._warm(key))
        self._warming[key] = task
        task.add_done_callback(lambda _: self._warming.pop(key, None))

    def _spare(self, key: PoolKey) -> HboneSession | None:
        for s in self._conns.get(key, []):
            if s.usable and s.load == 0:
                return s
        return None

    async def _warm(self, key: PoolKey) -> None:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._recent or self._spare(key) is not None:
                return
            try:
                s = await self._dial(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the dialer logs why; a spare is best effort
                self.prewarm_failures += 1
                log.debug("pre-warming a connection for %s failed: %s", key.dst_ip, exc)
                return
            self.prewarm_opened += 1
            self._add(key, s)
            self._changed(key, s)  # idle from the start: its idle timer runs

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
