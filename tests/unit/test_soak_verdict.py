"""The soak's judgement (benchmarks/soakreport.py) on hand-made events and samples: which
failures are expected, how growth is measured, and that the verdict fails on each kind of bad
run."""

from __future__ import annotations

from typing import Any

from benchmarks.soakload import Event
from benchmarks.soakreport import (
    classify,
    deny_windows,
    growth,
    intervals,
    judge_growth,
    verdict,
)


def ev(kind: str, t0: float, ok: bool, why: str = "", t1: float | None = None) -> Event:
    return Event(kind, t0, t0 + 0.01 if t1 is None else t1, ok, why)


def test_only_the_probe_inside_its_deny_window_is_expected() -> None:
    deny = [(10.0, 25.0)]
    assert classify(ev("probe", 12, False, "EPERM"), None, deny) == "expected_probe"
    assert classify(ev("probe", 26, False, "EPERM"), None, deny) == "unexpected"
    # The client is never the DENY's target: its failures in the window are not excused.
    assert classify(ev("short", 12, False, "ECONNRESET"), None, deny) == "unexpected"
    assert classify(ev("short", 12, True), None, deny) == "ok"


def test_a_failure_overlapping_a_plain_restart_is_counted_apart() -> None:
    window = (50.0, 55.0)
    assert classify(ev("bulk", 40, False, "recv ECONNRESET", t1=51), window, []) == \
        "during_restart"
    assert classify(ev("short", 56, False, "ECONNREFUSED"), window, []) == "unexpected"
    # Without a window (a surge replacement) the same failure is unexpected.
    assert classify(ev("short", 52, False, "ECONNREFUSED"), None, []) == "unexpected"


def test_deny_window_ends_when_the_probe_gets_through_again() -> None:
    events = [ev("probe", 9, True), ev("probe", 11, False, "EPERM"),
              ev("probe", 21, False, "EPERM"), ev("probe", 23, True), ev("probe", 30, True)]
    (w,) = deny_windows(events, [{"start": 10.0, "removed": 20.0}])
    assert w["restored"] == 23 and w["end"] == 23 and w["denied_probes"] == 2
    # A DENY that never refused anything, and a probe that never came back, both show.
    (w,) = deny_windows([ev("probe", 11, True)], [{"start": 10.0, "removed": 20.0}], limit=5)
    assert w["denied_probes"] == 0 and w["restored"] is None and w["end"] == 25


def _samples(fds: list[int], rss: list[float]) -> list[dict[str, Any]]:
    return [{"t": 10.0 * i, "nodes": {"0": {"fds": f, "rss_mib": r, "cpu_pct": 1.0}}}
            for i, (f, r) in enumerate(zip(fds, rss, strict=True))]


def test_growth_compares_floors_so_bursts_do_not_count_but_leaks_do() -> None:
    # Window after warm-up: t 20..40; last window: t 60..80.
    steady = _samples([90, 60, 60, 260, 60, 60, 61, 300, 60], [80, 80, 80, 90, 80, 80, 81, 95, 80])
    g = growth(steady, warm=20, end=80, window=20)["0"]
    assert g["fds"]["ok"] and g["fds"]["base"] == 60 and g["fds"]["final"] == 60
    assert g["rss_mib"]["ok"]
    leak = _samples([60, 60, 60, 60, 60, 62, 64, 66, 68], [80] * 9)
    g = growth(leak, warm=20, end=80, window=20)["0"]
    assert not g["fds"]["ok"] and g["fds"]["growth_pct"] == 100 * (64 - 60) / 60
    # Samples inside the restart are left out (the old agent closing, the new one starting).
    restart = _samples([60, 60, 60, 10, 60, 60, 60, 60, 60], [80] * 9)
    assert growth(restart, warm=20, end=80, window=20, skip=(25, 35))["0"]["fds"]["base"] == 60


def test_intervals_bin_by_end_time_with_p99_of_successful_short_connections() -> None:
    events = [ev("short", 1, True, t1=1.002), ev("short", 2, True, t1=2.010),
              ev("short", 6, False, "ECONNRESET"), ev("probe", 7, False, "EPERM")]
    cats = ["ok", "ok", "unexpected", "expected_probe"]
    first, second = intervals(events, cats, [5.0, 10.0])
    assert first["ok"] == 2 and first["unexpected"] == 0
    assert abs(first["short_p99_ms"] - 10.0) < 1e-6
    assert second["unexpected"] == 1 and second["expected_probe"] == 1
    assert second["short_p99_ms"] is None


def _run() -> dict[str, Any]:
    ok = {"ok": True}
    return {
        "totals": {k: {"ok": 5, "failed": 0} for k in ("short", "bulk", "streams", "probe")},
        "growth": {"0": {"fds": dict(ok), "rss_mib": dict(ok)}},
        "failures": {"unexpected": 0},
        "deny_windows": [{"denied_probes": 3, "restored": 21.0}],
        "renewals": [{"renewed_ok": True}],
        "restart": {"ended": 60.0},
        "ok_after_restart": 10,
    }


def test_verdict_fails_on_each_kind_of_bad_run() -> None:
    assert verdict(_run())["pass"]
    breaks = {
        "fd_growth_within_5pct": lambda r: r["growth"]["0"]["fds"].update(ok=False),
        "rss_growth_within_5pct": lambda r: r["growth"]["0"]["rss_mib"].update(ok=False),
        "zero_unexpected_failures": lambda r: r["failures"].update(unexpected=1),
        "every_traffic_kind_ran": lambda r: r["totals"]["bulk"].update(ok=0),
        "deny_took_effect": lambda r: r["deny_windows"][0].update(denied_probes=0),
        "certificates_renewed": lambda r: r["renewals"][0].update(renewed_ok=False),
        "agent_replaced": lambda r: r.update(ok_after_restart=0),
    }
    for check, spoil in breaks.items():
        r = _run()
        spoil(r)
        v = verdict(r)
        assert not v[check] and not v["pass"], check
        assert all(ok for k, ok in v.items() if k not in (check, "pass")), check


def test_the_replacement_agent_is_also_judged_against_itself_when_there_is_room() -> None:
    # 0..200 s, restart 60-70 s; the new agent leaks one fd per sample after its warm-up.
    samples = _samples([60] * 21, [80.0] * 21)
    for x in samples:
        if x["t"] > 130:
            x["nodes"]["0"]["fds"] = 60 + int((x["t"] - 130) / 10)
    r = {"samples": samples, "restart": {"node": 0, "began": 60.0, "ended": 70.0},
         "settings": {"warmup": 40.0, "seconds": 200.0, "window": 30.0}}
    g = judge_growth(r)
    assert set(g) == {"0", "0-new"}
    assert g["0-new"]["fds"]["base"] == 60 and not g["0-new"]["fds"]["ok"]
    short = {**r, "settings": {"warmup": 40.0, "seconds": 120.0, "window": 30.0}}
    assert set(judge_growth(short)) == {"0"}  # no room for the new agent's own windows
