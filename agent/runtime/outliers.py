"""L4 outlier detection (circuit breaking) for Service endpoints, as Envoy's consecutive-failure
detector: an endpoint whose upstream connects fail `consecutive_failures` times in a row is
ejected from its Service port's backend set for a backoff that doubles with each repeated
ejection (capped), then returns; a success in between resets it.

Failures are observed where they happen: the source tunnel's outbound result for a connection
whose destination the kernel chose from a Service (the tunnel reads that VIP from the kernel,
so a failure counts against exactly that Service port). A connect counts as failed when the
upstream could not be reached: refused, timed out, or answered 503 by the destination tunnel
(cause UPSTREAM); a policy refusal is the endpoint working as configured, not a failure.

Never the last one: an endpoint is not ejected while it is the only one of its Service port
that is not ejected (an outage is better reported by the failing connects than hidden by an
empty backend set, which would refuse everything). The detector only decides; the agent
rewrites the Service's backend set (Datapath.apply_services, atomic per Service port).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.datapath.layouts import Backend, Frontend

log = logging.getLogger(__name__)

ServiceTable = Mapping[Frontend, tuple[Backend, ...]]


@dataclass(frozen=True)
class OutlierSettings:
    consecutive_failures: int = 5  # Envoy's consecutive_5xx default
    base_ejection: float = 30.0  # seconds; Envoy's base_ejection_time
    max_ejection: float = 300.0  # seconds; Envoy's max_ejection_time

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError("consecutive_failures must be at least 1")
        if not 0 < self.base_ejection <= self.max_ejection:
            raise ValueError("want 0 < base_ejection <= max_ejection")

    def backoff(self, ejections: int) -> float:
        """The n-th consecutive ejection's length (n from 1): doubling, capped."""
        return min(self.base_ejection * (1 << min(ejections - 1, 32)), self.max_ejection)


@dataclass
class _Health:
    failures: int = 0  # consecutive
    ejections: int = 0  # consecutive ejections (reset by a success after returning)
    until: float = 0.0  # ejected while clock() < until


@dataclass(frozen=True)
class Ejection:
    frontend: Frontend
    backend: Backend
    seconds: float
    ejections: int


class OutlierDetector:
    def __init__(self, settings: OutlierSettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or OutlierSettings()
        self._clock = clock
        self._table: ServiceTable = {}
        self._health: dict[Frontend, dict[Backend, _Health]] = {}
        self.ejections_total: dict[tuple[Frontend, Backend], int] = {}

    def set_table(self, table: ServiceTable) -> None:
        """The compiled (unfiltered) backend sets. State is kept only for what is in them, so
        it is bounded by the Services' size; an endpoint that leaves and comes back starts
        healthy."""
        self._table = table
        self.ejections_total = {k: n for k, n in self.ejections_total.items()
                                if k[1] in table.get(k[0], ())}
        for fe in list(self._health):
            backends = set(table.get(fe, ()))
            kept = {b: h for b, h in self._health[fe].items() if b in backends}
            if kept:
                self._health[fe] = kept
            else:
                del self._health[fe]

    def observe(self, fe: Frontend, be: Backend, ok: bool) -> Ejection | None:
        """One upstream connect result for an endpoint chosen from `fe`; the ejection it
        caused, if any."""
        if be not in self._table.get(fe, ()):
            return None  # an old version's endpoint: nothing to eject it from
        now = self._clock()
        h = self._health.setdefault(fe, {}).setdefault(be, _Health())
        if ok:
            h.failures = 0
            if h.until <= now:
                h.ejections = 0
            return None
        if h.until > now:
            return None  # already out: a connect chosen before the ejection reached it
        h.failures += 1
        if h.failures < self.settings.consecutive_failures:
            return None
        if self._in_service(fe, now) <= 1:
            # The last endpoint standing stays: keep counting, eject once another is back.
            return None
        h.failures = 0
        h.ejections += 1
        seconds = self.settings.backoff(h.ejections)
        h.until = now + seconds
        key = (fe, be)
        self.ejections_total[key] = self.ejections_total.get(key, 0) + 1
        return Ejection(fe, be, seconds, h.ejections)

    def _in_service(self, fe: Frontend, now: float) -> int:
        health = self._health.get(fe, {})
        return sum(1 for b in self._table.get(fe, ())
                   if b not in health or health[b].until <= now)

    def ejected(self) -> dict[Frontend, tuple[Backend, ...]]:
        now = self._clock()
        return {fe: tuple(sorted(b for b, h in hs.items() if h.until > now))
                for fe, hs in self._health.items() if any(h.until > now for h in hs.values())}

    def filter(self, table: ServiceTable) -> dict[Frontend, tuple[Backend, ...]]:
        """`table` without the endpoints ejected now; a frontend never loses its last one."""
        out = dict(table)
        for fe, gone in self.ejected().items():
            if fe in out:
                kept = tuple(b for b in out[fe] if b not in gone)
                out[fe] = kept or out[fe]
        return out

    def next_return(self) -> float | None:
        """Seconds until the earliest ejected endpoint returns, or None."""
        now = self._clock()
        ends = [h.until for hs in self._health.values() for h in hs.values() if h.until > now]
        return min(ends) - now if ends else None
