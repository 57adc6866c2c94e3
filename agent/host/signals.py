"""SIGTERM handled like SIGINT by every long-running command (demo, run, ca serve, testbed up).

Service managers, container runtimes and `timeout` stop a process with SIGTERM, whose default
action kills Python on the spot: no `finally`, no context-manager exit, so network namespaces,
cgroups and pins of a demo would stay behind. Both helpers here treat the two signals alike:
- asyncio commands wait on `stop_event()` and then drain;
- synchronous commands run inside `interrupt_on_stop()`. A signal there is recorded, and
  `Stopped` (a KeyboardInterrupt, so every path that tears down on Ctrl-C runs) is raised at the
  next `checkpoint()` or at once inside `StopGuard.interruptible()` (a wait). It is not raised at
  an arbitrary bytecode: there it could land in a finalizer, which swallows it, or between a
  fork and the wait for the child, which would then create a namespace after teardown listed
  them. Signals after the first are ignored, so the teardown is not cut short.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread for the first SIGINT or SIGTERM (see the module docstring)."""

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
        self.signum: int | None = None  # the signal received, if any
        self._raised = False
        self._interruptible = False

    def checkpoint(self) -> None:
        """Raise Stopped here if a signal came and it was not raised yet."""
        if self.signum is not None and not self._raised:
            self._raised = True
            raise Stopped(self.signum)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block (a sleep, a wait) the signal may interrupt at any point."""
        self.checkpoint()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def wait(self) -> int:
        """Block until SIGINT or SIGTERM; the signal number."""
        try:
            with self.interruptible():
                while True:
                    time.sleep(3600)
        except Stopped as stop:
            return stop.signum

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            return  # already stopping
        self.signum = signum
        if self._interruptible:
            self._raised = True
            raise Stopped(signum)


_active: list[StopGuard] = []


def checkpoint() -> None:
    """Raise Stopped if the innermost `interrupt_on_stop()` block got a signal; no-op outside
    one (library code such as the test bed's build calls this between steps)."""
    if _active:
        _active[-1].checkpoint()


@contextmanager
def interrupt_on_stop() -> Iterator[StopGuard]:
    """Handle SIGINT/SIGTERM as described above inside the block; the previous handlers come
    back after it. Handlers are Python functions (not SIG_IGN), so children started inside get
    the default dispositions after exec."""
    guard = StopGuard()
    previous = {s: signal.signal(s, guard._handle) for s in STOP_SIGNALS}
    _active.append(guard)
    try:
        yield guard
    finally:
        _active.remove(guard)
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
