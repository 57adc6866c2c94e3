"""agent.host.signals: SIGTERM and SIGINT stop a command the same way, at safe points only."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from agent.host import signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_is_raised_at_the_next_checkpoint_and_later_ones_are_ignored(
        sig: signal.Signals) -> None:
    before = signal.getsignal(sig)
    reached = []
    with pytest.raises(signals.Stopped) as stopped, signals.interrupt_on_stop() as guard:
        os.kill(os.getpid(), sig)  # handled between bytecodes: recorded, not raised
        reached.append("after the signal")
        os.kill(os.getpid(), signal.SIGTERM)  # a second one: ignored
        reached.append("after the second")
        signals.checkpoint()
        reached.append("never")
    assert reached == ["after the signal", "after the second"]
    assert stopped.value.signum == sig and guard.signum == sig
    assert stopped.value.exit_status == 128 + sig
    assert isinstance(stopped.value, KeyboardInterrupt)  # Ctrl-C's teardown paths apply
    assert signal.getsignal(sig) == before  # the previous handler is back


def test_wait_returns_the_signal_and_checkpoint_is_a_no_op_outside_a_block() -> None:
    signals.checkpoint()
    with signals.interrupt_on_stop() as guard:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        previous = signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        try:
            assert guard.wait() == signal.SIGTERM
        finally:
            signal.signal(signal.SIGALRM, previous)
        signals.checkpoint()  # already raised once (and handled by wait): not again


def test_stop_event_is_set_by_sigterm() -> None:
    async def body() -> int:
        stop = signals.stop_event()
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 30)
        return 0

    assert asyncio.run(body()) == 0
