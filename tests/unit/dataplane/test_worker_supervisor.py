"""The supervisor with real worker processes (no pods: those need netns, see
tests/e2e/test_workers.py): state replayed to every worker, a killed worker logged once, counted,
restarted with its requests failed and its counters kept, drain, and a worker without its
control process exits. Plus the event wire format both ends share."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from agent.backoff import Backoff
from agent.dataplane import channel, wire
from agent.dataplane.supervisor import InitSettings, Supervisor, WorkerError, is_counter
from agent.identity.spiffe import Identity
from ztunnel.events import (
    Cause,
    ConnectionEvent,
    Phase,
    ResponseFlag,
    TransportFlag,
    TunnelDirection,
)
from ztunnel.tunnel import TunnelWorkload

pytestmark = pytest.mark.unit

FRONTEND = Identity("cluster.local", "shop", "frontend")


async def until(check: object, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


def supervisor(count: int, **kw: tuple[float, float]) -> Supervisor:
    events: list[ConnectionEvent] = []
    sup = Supervisor(count, InitSettings("cluster.local", "passthrough", 1, 2),
                     on_event=events.append, set_inbound=lambda _s, _k: None,
                     log_format="text", backoff=Backoff(initial=0.05, cap=0.1), **kw)
    sup.set_trust(("-----BEGIN CERTIFICATE-----\n",), {})
    sup.set_identity_ids({FRONTEND: 3})
    sup.set_resolver({"10.0.0.1": TunnelWorkload("10.0.0.1", FRONTEND, "shop/frontend")})
    return sup


def test_a_killed_worker_is_logged_once_restarted_with_the_state_and_keeps_its_counters(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        sup = supervisor(2)
        await sup.start()
        try:
            await until(lambda: all(w is not None and w.stats for w in sup.workers),
                        "stats from both workers")
            assert await sup.recheck_peers() == 0  # both answer: their init arrived
            victim = sup.workers[0]
            assert victim is not None
            os.kill(victim.proc.pid, signal.SIGSTOP)
            victim.stats = {"pool_streams_opened": 5.0, "budget_trips_total": 2.0,
                            "pool_connections": 7.0}
            pending = asyncio.ensure_future(sup.recheck_peers())
            await asyncio.sleep(0.1)
            os.kill(victim.proc.pid, signal.SIGKILL)
            with pytest.raises(WorkerError, match="worker 0 exited"):
                await pending
            await until(lambda: sup.restarts == 1 and 0 in sup.pids()
                        and sup.pids()[0] != victim.proc.pid, "worker 0 restarted")
            assert victim.proc.returncode == -signal.SIGKILL
            fresh = sup.workers[0]
            assert fresh is not None
            await until(lambda: bool(fresh.stats), "stats from the new worker 0")
            stats = sup.stats()
            assert stats["pool_streams_opened"] >= 5.0 and stats["budget_trips_total"] >= 2.0
            assert stats.get("pool_connections", 0.0) < 7.0  # a gauge leaves with its worker
            assert await sup.recheck_peers() == 0  # the new one got init again
        finally:
            await sup.drain(5.0)
        assert sup.pids() == {}
        assert all(w is not None and w.proc.returncode is not None for w in sup.workers)
        assert sup.restarts == 1  # drain is not a death

    with caplog.at_level(logging.INFO, logger="agent.dataplane.supervisor"):
        asyncio.run(scenario())
    died = [r.getMessage() for r in caplog.records if "exited" in r.getMessage()]
    assert len(died) == 1 and "killed by SIGKILL" in died[0], died


def test_the_watchdog_kills_a_stopped_worker_and_it_is_restarted(
        caplog: pytest.LogCaptureFixture) -> None:
    """A SIGSTOPped worker (or one whose loop never yields) answers nothing: the watchdog kills
    it once it was silent for the timeout, the watcher restarts it; the other is left alone."""
    async def scenario() -> None:
        sup = supervisor(2, watchdog=(0.2, 1.5))
        await sup.start()
        try:
            await until(lambda: all(w is not None and w.stats for w in sup.workers),
                        "stats from both workers")
            await asyncio.sleep(1.0)  # a few rounds while both answer
            assert sup.watchdog_kills == 0
            before = sup.pids()
            os.kill(before[0], signal.SIGSTOP)
            await until(lambda: sup.restarts == 1 and sup.pids().get(0) not in (None, before[0]),
                        "the stopped worker replaced")
            assert sup.watchdog_kills == 1
            assert sup.pids()[1] == before[1]
            assert await sup.recheck_peers() == 0  # both answer again
        finally:
            await sup.drain(5.0)
        assert sup.watchdog_kills == 1

    with caplog.at_level(logging.INFO, logger="agent.dataplane.supervisor"):
        asyncio.run(scenario())
    stuck = [r.getMessage() for r in caplog.records if "did not answer" in r.getMessage()]
    assert len(stuck) == 1 and "worker 0" in stuck[0], stuck


def test_with_every_worker_dead_the_supervisor_says_the_data_plane_is_down() -> None:
    """Readiness asks `unserving`: None while a worker runs, a reason while none does (here
    the only worker waits out a long restart backoff), None again once it is back."""
    async def scenario() -> None:
        sup = Supervisor(1, InitSettings("cluster.local", "passthrough", 1, 2),
                         on_event=lambda _e: None, set_inbound=lambda _s, _k: None,
                         log_format="text", backoff=Backoff(initial=1.5, cap=1.5, jitter=0.0))
        assert sup.unserving() is not None  # not started: nothing carries traffic yet
        await sup.start()
        try:
            assert sup.unserving() is None
            victim = sup.workers[0]
            assert victim is not None
            os.kill(victim.proc.pid, signal.SIGKILL)
            await until(lambda: sup.unserving() is not None, "the data plane reported down")
            why = sup.unserving()
            assert why is not None and "no data-plane worker running" in why, why
            await until(lambda: sup.restarts == 1 and sup.unserving() is None,
                        "the data plane back with the restarted worker")
        finally:
            await sup.drain(5.0)
        assert sup.unserving() is None  # stopping: readiness has other reasons then

    asyncio.run(scenario())


def test_a_worker_exits_when_its_control_process_goes_away() -> None:
    ours, theirs = channel.pair()
    proc = subprocess.Popen([sys.executable, "-m", "agent.dataplane.worker", "--fd",
                             str(theirs.fileno()), "--index", "7"], pass_fds=(theirs.fileno(),),
                            stderr=subprocess.PIPE)
    theirs.close()
    try:
        init = {"op": "init", "trust_domain": "cluster.local", "outside_mesh": "refuse",
                "id_plaintext": 1, "id_other": 2}
        channel.send_now(ours, channel.encode(init))
        channel.send_now(ours, channel.encode({"op": "recheck", "rid": 1}))
        while (got := channel.receive(ours)) is not None and got[0]["op"] != "reply":
            pass  # stats
        assert got is not None and got[0] == {"op": "reply", "rid": 1, "error": None,
                                              "refused": 0}
        os.kill(proc.pid, signal.SIGTERM)  # ignored: control decides when it stops
        ours.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_counters_are_told_from_gauges_by_name() -> None:
    assert is_counter("pool_connections_opened") and is_counter("tunnel_handshakes_refused_global")
    assert not is_counter("tunnel_handshakes_pending") and not is_counter("pool_connections")


def test_events_cross_the_wire_unchanged_and_bad_ones_are_named() -> None:
    ev = ConnectionEvent(Phase.OPEN, TunnelDirection.OUTBOUND, "10.0.0.1", 40000, "10.0.0.2",
                         8080, src_workload="shop/frontend", src_identity=FRONTEND,
                         svc_ip="10.96.0.20", svc_port=80)
    closed = ev.refused(ResponseFlag.DENY, Cause.POLICY_DENY,
                        TransportFlag.DENY | TransportFlag.HBONE, "x" * 1000)
    assert wire.event_from_wire(wire.event_to_wire(ev)) == ev
    back = wire.event_from_wire(wire.event_to_wire(closed))
    assert back.reason == "x" * wire.REASON_MAX  # free text is bounded before it crosses
    back.reason = closed.reason
    assert back == closed
    raw = wire.event_to_wire(ev)
    raw[1] = "sideways"
    with pytest.raises(ValueError, match="connection event"):
        wire.event_from_wire(raw)
