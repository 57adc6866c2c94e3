"""SIGTERM handled like SIGINT by every long-running command (demo, run, ca serve, testbed up).

Service managers, container runtimes and `timeout` stop a process with SIGTERM, whose default
action kills Python on the spot: no `finally`, no context-manager exit, so network namespaces,
cgroups and pins of a demo would stay behind. Both helpers here treat the two signals alike:
- synchronous commands wrap their work in `interrupt_on_stop()`: the first signal raises `Stopped`
  (a KeyboardInterrupt, so every path that already tears down on Ctrl-C runs) and later ones are
  ignored, so that teardown is not itself cut short;
- asyncio commands wait on `stop_event()` and then drain.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by the first SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention for a command ended by a signal it handled: 128 + signum."""
        return 128 + self.signum


class StopGuard:
    """The state of one `interrupt_on_stop()` block."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal that stopped the command, if any
        self._armed = True

    def disarm(self) -> None:
        """From here on signals are ignored: call before a teardown that must run to the end."""
        self._armed = False

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if not self._armed:
            return
        self._armed = False
        self.signum = signum
        raise Stopped(signum)


@contextmanager
def interrupt_on_stop() -> Iterator[StopGuard]:
    """SIGINT/SIGTERM raise `Stopped` once inside the block; the previous handlers come back
    after it. Handlers are Python functions (not SIG_IGN), so children started inside still get
    the default dispositions after exec."""
    guard = StopGuard()
    previous = {s: signal.signal(s, guard._handle) for s in STOP_SIGNALS}
    try:
        yield guard
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_event() -> asyncio.Event:
    """An Event the first SIGINT/SIGTERM sets, for the running loop (asyncio.run removes the
    handlers when it closes the loop)."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    for s in STOP_SIGNALS:
        loop.add_signal_handler(s, event.set)
    return event
