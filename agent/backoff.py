"""Exponential retry delays with jitter, shared by every retry loop of the agent (certificate
requests, Kubernetes watches), so agents that lost a server together do not return in lockstep."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """After the n-th failure in a row the nominal delay is initial * factor**(n-1), capped.

    The delay drawn around it is nominal * (1 +- jitter) (Istio's certificate retries), or,
    with `equal_jitter`, uniform in [nominal/2, nominal]: never shorter than half, never in
    lockstep (client-go style watch retries). The defaults are Istio's."""

    initial: float = 0.5
    factor: float = 2.0
    jitter: float = 0.2
    cap: float = 150.0
    equal_jitter: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ValueError(
                f"backoff needs 0 < initial <= cap, got {self.initial} and {self.cap}")

    def nominal(self, failures: int) -> float:
        try:
            return min(self.cap, self.initial * self.factor ** max(0, failures - 1))
        except OverflowError:  # factor**n beyond a float: far past any cap
            return self.cap

    def delay(self, failures: int, draw: float) -> float:
        """The delay after `failures` failures in a row; `draw` is uniform in [0, 1)."""
        base = self.nominal(failures)
        if self.equal_jitter:
            return base / 2 + draw * base / 2
        return base * (1 + (-self.jitter + (self.jitter + self.jitter) * draw))


class Retries:
    """One retry loop's count of failures in a row, with the delay before the next attempt."""

    def __init__(self, backoff: Backoff, rand: Callable[[], float] = random.random) -> None:
        self.backoff = backoff
        self._rand = rand
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return self.backoff.delay(self.failures, self._rand())

    def reset(self) -> None:
        self.failures = 0
