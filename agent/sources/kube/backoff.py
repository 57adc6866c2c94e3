"""Exponential backoff with jitter, so many agents that lost the API server together do not
come back in lockstep."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays start at `initial`, double per failure up to `cap`; each is drawn uniformly from
    [d/2, d] ("equal jitter": never shorter than half the nominal delay, never in lockstep)."""

    def __init__(
        self,
        initial: float = 0.1,
        cap: float = 30.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < initial <= cap:
            raise ValueError(f"backoff needs 0 < initial <= cap, got {initial} and {cap}")
        self.initial = initial
        self.cap = cap
        self._rand = rand
        self.failures = 0

    def next_delay(self) -> float:
        nominal = min(self.cap, self.initial * 2.0 ** min(self.failures, 64))
        self.failures += 1
        return nominal / 2 + self._rand() * nominal / 2

    def reset(self) -> None:
        self.failures = 0
