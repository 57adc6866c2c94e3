"""Readiness rules (agent/runtime/readiness.py), on a fake clock."""

from __future__ import annotations

from agent.runtime.readiness import Readiness


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_pass_that_began_before_the_first_lists_does_not_make_the_agent_ready() -> None:
    clock = Clock()
    r = Readiness(clock=clock)
    assert r.check() == (False, "waiting for the first list of every resource")
    # The pass read a partial state; the lists completed while it ran.
    r.synced = True
    r.pass_done(began_synced=False, ok=True, pending={})
    assert r.check() == (False, "waiting for the first reconcile after sync")
    r.pass_done(began_synced=True, ok=False, pending={})  # compiling failed
    assert not r.check()[0]
    r.pass_done(began_synced=True, ok=True, pending={})
    assert r.check() == (True, "ready")


def test_pending_enrollment_holds_the_start_until_it_is_reported_as_failing() -> None:
    clock = Clock()
    r = Readiness(clock=clock, enroll_grace=60)
    r.synced = True
    pending = {"uid-web": ("shop/web", "pod netns not found yet")}
    r.pass_done(True, True, pending)
    assert r.check() == (False, "enrollment pending: shop/web: pod netns not found yet")
    clock.now += 59
    r.pass_done(True, True, pending)  # still the same pod: its first-seen time is kept
    assert not r.check()[0] and r.failing() == {}
    clock.now += 2
    r.pass_done(True, True, pending)
    assert r.check() == (True, "ready; not enrolled: shop/web: pod netns not found yet")
    assert r.failing() == {"shop/web": "pod netns not found yet"}
    # Enrolled at last; a pod arriving later does not make a started agent unready.
    r.pass_done(True, True, {})
    assert r.check() == (True, "ready")
    r.pass_done(True, True, {"uid-new": ("shop/new", "no pod IP yet")})
    assert r.check() == (True, "ready")


def test_unready_only_after_the_source_has_failed_for_longer_than_the_grace() -> None:
    clock = Clock()
    outage = [0.0]
    r = Readiness(clock=clock, source_grace=30, source_outage=lambda: outage[0])
    r.synced = True
    r.pass_done(True, True, {})
    outage[0] = 29.0
    assert r.check()[0]
    outage[0] = 31.0
    ok, why = r.check()
    assert not ok and why.startswith("state source failing for 31s (grace 30s)")
    outage[0] = 0.0
    assert r.check() == (True, "ready")


def test_unready_while_the_data_plane_has_no_worker_and_ready_again_once_one_is_back() -> None:
    clock = Clock()
    down: list[str | None] = [
        "no data-plane worker running with its pods (2 configured, 3 restarts so far)"]
    r = Readiness(clock=clock, data_plane=lambda: down[0])
    r.synced = True
    r.pass_done(True, True, {})
    assert r.check() == (False, down[0])  # not ready at the start without a worker either
    assert not r.started
    down[0] = None
    r.pass_done(True, True, {})
    assert r.check() == (True, "ready") and r.started
    down[0] = "no data-plane worker running with its pods (2 configured, 4 restarts so far)"
    assert r.check() == (False, down[0])
    down[0] = None
    assert r.check() == (True, "ready")
