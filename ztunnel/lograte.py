"""Bounded logging under a flood: repeated identical warnings are counted instead of written.

A refusal is always recorded in full by telemetry (flow record, metric, audit line); the
operator's log only needs to show that it is happening. `RepeatLimiter` is a logging.Filter for
WARNING and above: per identical line (same logger, level, message template and non-numeric
arguments, so source ports and counts do not make lines distinct) it passes `burst` lines per
`window` seconds and counts the rest. The count is reported on the next line that passes for that
key, by a summary line once the window has passed (checked whenever anything is logged), and by
`flush()` (the tunnel calls it when it closes). Keys are bounded too: past `max_keys` distinct
lines, new ones are suppressed and counted in `overflow`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

DEFAULT_BURST = 5
DEFAULT_WINDOW = 60.0
DEFAULT_MAX_KEYS = 1024
_ARG_CHARS = 200  # of each string argument in a key; longer ones are cut

Key = tuple[str, int, str, tuple[str, ...]]


@dataclass
class _Window:
    start: float
    example: str = ""  # the first line of the window, to say what was suppressed
    passed: int = 0
    suppressed: int = 0


def _key(record: logging.LogRecord) -> Key:
    args = record.args if isinstance(record.args, tuple) else ()
    text = tuple(str(a)[:_ARG_CHARS] for a in args
                 if not isinstance(a, int | float))
    return record.name, record.levelno, str(record.msg)[:_ARG_CHARS], text


class RepeatLimiter(logging.Filter):
    _shared: ClassVar[RepeatLimiter | None] = None

    def __init__(self, burst: int = DEFAULT_BURST, window: float = DEFAULT_WINDOW,
                 max_keys: int = DEFAULT_MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if burst < 1 or window <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be at least 1, window positive")
        self.burst, self.window, self.max_keys = burst, window, max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[Key, _Window] = {}
        self._next_sweep = clock() + window
        self.suppressed_total = 0
        self.overflow = 0

    @classmethod
    def shared(cls) -> RepeatLimiter:
        """The process-wide limiter every tunnel module's logger uses."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "nm_summary", False):
            return True
        now = self._clock()
        due: list[tuple[Key, _Window]] = []
        with self._lock:
            # Admit first: a line whose own window ended carries its count itself.
            passed = self._admit(_key(record), record, now)
            if now >= self._next_sweep:
                due = self._sweep(now)
        for key, win in due:
            self._summary(key, win)
        return passed

    def _admit(self, key: Key, record: logging.LogRecord, now: float) -> bool:
        win = self._keys.get(key)
        if win is None:
            if len(self._keys) >= self.max_keys:
                self.overflow += 1
                self.suppressed_total += 1
                return False
            win = self._keys[key] = _Window(now, _example(record))
        elif now - win.start >= self.window:
            if win.suppressed:
                # Said on the line itself, so the count sits next to what was suppressed.
                record.msg = (f"{record.getMessage()} [{win.suppressed} similar lines suppressed "
                              f"in the last {now - win.start:.0f}s]")
                record.args = ()
            self._keys[key] = win = _Window(now, _example(record))
        if win.passed < self.burst:
            win.passed += 1
            return True
        win.suppressed += 1
        self.suppressed_total += 1
        return False

    def _sweep(self, now: float) -> list[tuple[Key, _Window]]:
        """Forget windows that ended; return the suppressed counts they still owe."""
        self._next_sweep = now + self.window
        due = []
        for key, win in list(self._keys.items()):
            if now - win.start >= self.window:
                del self._keys[key]
                if win.suppressed:
                    due.append((key, win))
        return due

    def flush(self) -> int:
        """Report every pending suppressed count now and start over; returns the lines reported
        as suppressed."""
        with self._lock:
            pending = [(k, w) for k, w in self._keys.items() if w.suppressed]
            self._keys.clear()
            overflow, self.overflow = self.overflow, 0
        for key, win in pending:
            self._summary(key, win)
        if overflow:
            logging.getLogger(__name__).warning(
                "%d log lines suppressed: more than %d distinct repeated lines", overflow,
                self.max_keys, extra={"nm_summary": True})
        return sum(w.suppressed for _, w in pending) + overflow

    def _summary(self, key: Key, win: _Window) -> None:
        name, level, _, _ = key
        logging.getLogger(name).log(
            level, "%d similar lines suppressed in %.0fs, like: %s", win.suppressed,
            self._clock() - win.start, win.example, extra={"nm_summary": True})


def _example(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()[:300]
    except (TypeError, ValueError):  # a bad format string: logging itself reports it
        return str(record.msg)[:300]
