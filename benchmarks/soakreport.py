"""The soak's judgement and its outputs: which failures were expected, fd/RSS growth, the
verdict, soak.md and the chart (soak.png)."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.soakload import KINDS, Event

GROWTH_LIMIT_PCT = 5.0
EXAMPLES = 20  # unexpected failures listed in full


def classify(e: Event, restart: tuple[float, float] | None,
             deny: list[tuple[float, float]]) -> str:
    """ok | expected_probe (the probe pair while its DENY is in force, until the probe gets
    through again) | during_restart (a plain restart's window) | unexpected."""
    if e.ok:
        return "ok"
    if e.kind == "probe" and any(a <= e.t0 <= b for a, b in deny):
        return "expected_probe"
    if restart is not None and e.t0 <= restart[1] and e.t1 >= restart[0]:
        return "during_restart"
    return "unexpected"


def deny_windows(events: list[Event], changes: list[dict[str, float]],
                 limit: float = 60.0) -> list[dict[str, float | int | None]]:
    """Each DENY of the probe pair: from the file write until the first probe that got through
    after the DENY was removed (at most `limit` s after the removal), and how many probes the
    kernel refused (EPERM) meanwhile: at least one proves the change took effect."""
    probes = sorted((e for e in events if e.kind == "probe"), key=lambda e: e.t0)
    out: list[dict[str, float | int | None]] = []
    for c in changes:
        start, removed = c["start"], c["removed"]
        back = next((e.t0 for e in probes if e.ok and e.t0 > removed), None)
        end = min(back, removed + limit) if back is not None else removed + limit
        denied = sum(1 for e in probes if start <= e.t0 <= end and e.why == "EPERM")
        out.append({"start": start, "removed": removed, "restored": back, "end": end,
                    "denied_probes": denied})
    return out


def intervals(events: list[Event], cats: list[str], edges: list[float]) -> list[dict[str, Any]]:
    """Per sampling interval (by connection end time): counts per category, short-connection
    p99 latency (connect + 1-byte round trip + close, ms)."""
    out: list[dict[str, Any]] = []
    bins: list[list[int]] = [[] for _ in edges]
    j = 0
    for i in sorted(range(len(events)), key=lambda k: events[k].t1):
        while j + 1 < len(edges) and events[i].t1 > edges[j]:
            j += 1
        bins[j].append(i)
    for edge, idx in zip(edges, bins, strict=True):
        counts = Counter(cats[i] for i in idx)
        lat = sorted((events[i].t1 - events[i].t0) * 1e3 for i in idx
                     if events[i].kind == "short" and events[i].ok)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None
        out.append({"t": edge, "ok": counts["ok"], "unexpected": counts["unexpected"],
                    "during_restart": counts["during_restart"],
                    "expected_probe": counts["expected_probe"], "short_p99_ms": p99})
    return out


def growth(samples: list[dict[str, Any]], warm: float, end: float, window: float,
           skip: tuple[float, float] = (0.0, 0.0)) -> dict[str, dict[str, dict[str, Any]]]:
    """Per node and measure: the floor (minimum) of the samples in the window right after the
    warm-up vs in the last window. The floor, because in-flight connections (a 100-stream burst)
    only add on top of it while a leak raises it. Samples in `skip` (the agent restart: the
    old one closing, the new one starting) are left out."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for node in samples[0]["nodes"] if samples else []:
        out[node] = {}
        for key in ("fds", "rss_mib"):
            def floor(a: float, b: float, key: str = key, node: str = node) -> float | None:
                vals = [s["nodes"][node][key] for s in samples
                        if a <= s["t"] <= b and not skip[0] <= s["t"] <= skip[1]
                        and s["nodes"][node][key]]
                return min(vals) if vals else None
            base, final = floor(warm, warm + window), floor(end - window, end)
            pct = 100 * (final - base) / base if base and final is not None else None
            out[node][key] = {"base": base, "final": final, "growth_pct": pct,
                              "ok": pct is not None and pct <= GROWTH_LIMIT_PCT}
    return out


def judge_growth(r: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """growth() per node, plus "<node>-new": the replacement agent against its own value after
    its own warm-up, when the run left room for that (a 30-minute run does, 3 minutes do not)."""
    s, rs, samples = r["settings"], r["restart"], r["samples"]
    out = growth(samples, s["warmup"], s["seconds"], s["window"],
                 skip=(rs.get("began", 0.0), rs.get("ended", 0.0) + 5))
    if "ended" in rs and rs["ended"] + s["warmup"] + s["window"] <= s["seconds"] - s["window"]:
        node = str(rs["node"])
        own = growth([x for x in samples if x["t"] > rs["ended"]], rs["ended"] + s["warmup"],
                     s["seconds"], s["window"])
        out[f"{node}-new"] = own[node]
    return out


def verdict(r: dict[str, Any]) -> dict[str, Any]:
    totals = r["totals"]
    checks = {
        "fd_growth_within_5pct": all(g["fds"]["ok"] for g in r["growth"].values()),
        "rss_growth_within_5pct": all(g["rss_mib"]["ok"] for g in r["growth"].values()),
        "zero_unexpected_failures": r["failures"]["unexpected"] == 0,
        "every_traffic_kind_ran": all(totals[k]["ok"] > 0 for k in KINDS),
        "deny_took_effect": bool(r["deny_windows"])
        and all(w["denied_probes"] > 0 and w["restored"] is not None for w in r["deny_windows"]),
        "certificates_renewed": all(a["renewed_ok"] for a in r["renewals"]),
        "agent_replaced": r["restart"].get("error") is None and "ended" in r["restart"]
        and r["ok_after_restart"] > 0,
    }
    return {**checks, "pass": all(checks.values())}


def _fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def markdown(r: dict[str, Any]) -> str:
    s, v, f = r["settings"], r["verdict"], r["failures"]
    rs = r["restart"]
    lines = [
        f"# Soak: {s['seconds']:.0f} s ({'PASS' if v['pass'] else 'FAIL'})",
        "",
        f"Run {r['started']} on {r['machine']['cpu']} ({r['machine']['cores']} cores, kernel "
        f"{r['machine']['kernel']}); load average {r['machine']['loadavg_start'][0]:.2f} at the "
        f"start, {r['machine']['loadavg_end'][0]:.2f} at the end (other work shares the "
        "machine).",
        f"Warm-up {s['warmup']:.0f} s, windows of {s['window']:.0f} s, samples every "
        f"{s['interval']:.0f} s; certificate TTL {s['cert_ttl']} s (renewed at half-life); "
        f"agent restart: {rs['mode']} on node{rs['node']}"
        + (f" from {_fmt(rs['began'])} s, new agent ready at {_fmt(rs['ready'])} s, old one "
           f"gone at {_fmt(rs['ended'])} s; {r['ok_after_restart']:,} connections after that"
           if "ended" in rs else "")
        + (f" FAILED: {rs['error'].splitlines()[0]}" if rs.get("error") else "") + ".",
        "",
        "| check | result |",
        "| --- | --- |",
    ]
    lines += [f"| {k.replace('_', ' ')} | {'yes' if ok else 'NO'} |"
              for k, ok in v.items() if k != "pass"]
    lines += ["", "| node | measure | after warm-up | final | growth |",
              "| --- | --- | --- | --- | --- |"]
    for node, g in r["growth"].items():
        for key, label in (("fds", "open fds (floor)"), ("rss_mib", "RSS MiB (floor)")):
            x = g[key]
            lines.append(f"| node{node} | {label} | {_fmt(x['base'])} | {_fmt(x['final'])} | "
                         f"{_fmt(x['growth_pct'], 2)} % |")
    lines += ["", "| traffic | ok | failed |", "| --- | --- | --- |"]
    lines += [f"| {k} | {t['ok']:,} | {t['failed']:,} |" for k, t in r["totals"].items()]
    p99 = [i["short_p99_ms"] for i in r["intervals"] if i["short_p99_ms"] is not None]
    p99_median = statistics.median(p99) if p99 else None
    changes = [c for c in r["timeline"] if c["what"].startswith("policy")]
    unrelated = sum(1 for c in changes if "unrelated" in c["what"])
    lines += [
        "",
        f"Failures: {f['unexpected']} unexpected, {f['during_restart']} during the restart "
        f"(expected only for a plain restart), {f['expected_probe']} probe connections refused "
        "while their DENY was in force (expected).",
        f"Short-connection p99 per interval: median {_fmt(p99_median, 2)}"
        f" ms, worst {_fmt(max(p99) if p99 else None, 2)} ms.",
        f"Policy changes: {len(changes)} mesh-file rewrites ({unrelated} adding or removing "
        f"the unrelated DENY, {len(r['deny_windows'])} prober DENY windows; probes refused "
        f"per window: {', '.join(str(w['denied_probes']) for w in r['deny_windows'])}).",
        "Certificate renewals (from nodemesh_certificate_rotations): " + "; ".join(
            f"node{a['node']} pid {a['pid']}: {a['renewals']} in {a['lived_s']:.0f} s "
            f"(expected >= {a['expected_min']})" for a in r["renewals"]) + ".",
    ]
    if f["examples"]:
        lines += ["", "Unexpected failures (first ones):", ""]
        lines += [f"- {x['kind']} at {x['t0']:.1f}-{x['t1']:.1f} s: {x['why']}"
                  for x in f["examples"]]
    return "\n".join(lines) + "\n"


def chart(r: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 -- optional (bench extra) and slow to import

    matplotlib.use("Agg")  # no display on the test machines
    import matplotlib.pyplot as plt  # noqa: PLC0415 -- after choosing the backend

    samples, iv = r["samples"], r["intervals"]
    fig, axes = plt.subplots(5, 1, figsize=(10, 12), sharex=True)
    t = [s["t"] for s in samples]
    for node in (samples[0]["nodes"] if samples else {}):
        for ax, key, label in ((axes[0], "fds", "open fds"), (axes[1], "rss_mib", "RSS MiB"),
                               (axes[2], "cpu_pct", "CPU %")):
            ax.plot(t, [s["nodes"][node][key] for s in samples], label=f"node{node} agent")
            ax.set_ylabel(label)
    ti = [i["t"] for i in iv]
    axes[3].plot(ti, [i["ok"] for i in iv], color="#2ca02c", label="ok")
    for key, color in (("unexpected", "#d62728"), ("during_restart", "#ff7f0e"),
                       ("expected_probe", "#9467bd")):
        axes[3].bar(ti, [i[key] for i in iv], width=r["settings"]["interval"] * 0.8,
                    color=color, label=f"failed: {key.replace('_', ' ')}")
    axes[3].set_ylabel("connections / interval")
    axes[4].plot(ti, [i["short_p99_ms"] for i in iv], color="#1f77b4")
    axes[4].set_ylabel("short conn p99 ms")
    axes[4].set_xlabel("seconds since traffic started")
    s = r["settings"]
    for ax in axes:
        ax.axvspan(s["warmup"], s["warmup"] + s["window"], color="#dddddd", alpha=0.5)
        ax.axvspan(s["seconds"] - s["window"], s["seconds"], color="#dddddd", alpha=0.5)
        for w in r["deny_windows"]:
            ax.axvspan(w["start"], min(w["end"], s["seconds"]), color="#9467bd", alpha=0.12)
        if "ended" in r["restart"]:
            ax.axvline(r["restart"]["began"], color="#ff7f0e", linestyle="--")
            ax.axvline(r["restart"]["ended"], color="#ff7f0e", linestyle=":")
        ax.grid(alpha=0.3)
    for ax in (axes[0], axes[3]):
        ax.legend(fontsize=7, loc="upper left")
    verdict = "PASS" if r["verdict"]["pass"] else "FAIL"
    fig.suptitle(f"nodemesh soak, {s['seconds']:.0f} s ({verdict})"
                 " - grey: warm-up and final windows, purple: probe DENY in force, orange: "
                 f"agent {r['restart']['mode']} restart", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["GROWTH_LIMIT_PCT", "chart", "classify", "deny_windows", "growth", "intervals",
           "markdown", "verdict"]
