"""Summaries, the results table (Markdown) and the chart (PNG) from the suite's raw runs."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.bed import MODES

LABELS = {
    "bulk": "bulk, 1 stream",
    "streams": "concurrent streams, aggregate",
    "latency": "1-byte request/response",
    "connrate": "new connection per request",
}


def spread(values: list[float]) -> dict[str, float]:
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread_pct": 100 * (max(values) - min(values)) / med if med else 0.0,
    }


def summarize(runs: list[dict[str, Any]], key: str = "value") -> dict[str, Any]:
    """Median and spread of the verified runs; failed runs are counted, never averaged in."""
    vals = [float(r[key]) for r in runs if r.get("verified") and r.get(key) is not None]
    failed = sum(1 for r in runs if not r.get("verified"))
    return {**(spread(vals) if vals else {"median": None}), "failed": failed}


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def ratio(a: str, b: str) -> float | None:
        x, y = summary[a].get("median"), summary[b].get("median")
        return x / y if x is not None and y else None

    return {"nodemesh/no-mesh": ratio("nodemesh", "no-mesh"),
            "nodemesh/envoy": ratio("nodemesh", "envoy")}


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _cell(s: dict[str, Any]) -> str:
    if s.get("median") is None:
        return "n/a"
    return f"{_fmt(s['median'])} ({_fmt(s['min'])}-{_fmt(s['max'])})"


def _verified(summary: dict[str, dict[str, Any]]) -> str:
    failed = [f"{mode} {s['failed']}" for mode, s in summary.items() if s.get("failed")]
    return "yes" if not failed else "failed runs: " + ", ".join(failed)


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    sec = results["sections"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, Python {m['python']}, "
        f"Envoy {m['envoy']}, iperf3 {m['iperf3']}; "
        f"data path: {m.get('data_path', 'not recorded')}.",
        f"Run: {results['started']}, {results['duration_s']:.0f} s, "
        f"{results['settings']['reps']} repetitions per cell (median, min-max in brackets); "
        f"TLS: nodemesh {', '.join(results['ciphers'].get('nodemesh', []))}, Envoy "
        f"{', '.join(results['ciphers'].get('envoy', []))} (openssl speed at 16 KiB: "
        + ", ".join(f"{k} {_fmt(v)} GB/s" for k, v in m.get("cipher_gb_s", {}).items())
        + ").",
        "",
    ]
    workers = results["settings"].get("workers", [1])
    for key in sorted(k for k in sec if k.startswith("paths")):
        n = int(key.removeprefix("paths_w")) if key != "paths" else workers[0]
        lines += [f"Workers: {n} (agents `--workers {n}`, Envoy `--concurrency {n}`).", ""]
        lines += _paths_rows(sec[key])
        lines.append("")
    for name, section in sec.items():
        if not name.startswith("paths") and "error" in section:
            lines += [f"{name}: FAILED - {section['error']}", ""]
    if "connect_cost" in sec and "error" not in sec["connect_cost"]:
        cc = sec["connect_cost"]
        lines.append(f"connect() cost ({cc['connects_per_mode']} calls per mode):")
        lines.append("")
        lines.append("| mode | p50 us | p90 us | p99 us | p50 / no programs |")
        lines.append("| --- | --- | --- | --- | --- |")
        modes = ("no programs", "programs, 0 entries", "programs, 100k entries",
                 "app -> pod IP (svc map)", "app -> VIP (svc map)")
        for mode in (m for m in modes if m in cc):
            c = cc[mode]
            lines.append(
                f"| {mode} | {c['p50_ns'] / 1e3:.2f} | {c['p90_ns'] / 1e3:.2f} | "
                f"{c['p99_ns'] / 1e3:.2f} | {c['p50_ratio_vs_no_programs']:.2f} |"
            )
        if "vip_vs_pod_ip_p50_ratio" in cc:
            lines += ["", f"connect() to a Service VIP vs. to a pod IP, {cc['services']:,} "
                      f"Services x {cc['endpoints_per_service']} endpoints loaded (p50): "
                      f"{cc['vip_vs_pod_ip_p50_ratio']:.2f}x (goal <= 1.1x)."]
        lines.append("")
    if "policy_update" in sec and "error" not in sec["policy_update"]:
        p = sec["policy_update"]
        lines.append(
            f"Policy update, {p['rules']:,} rules ({p['mesh_file_bytes'] / 1e6:.1f} MB mesh file, "
            f"{p['kernel_entries']} kernel entries): file replaced -> connect denied "
            f"median {_fmt(p['median_s'], 3)} s (min {_fmt(p['min_s'], 3)}, max "
            f"{_fmt(p['max_s'], 3)}); denied -> allowed again median "
            f"{_fmt(p['restore_median_s'], 3)} s; first load {p['initial_load_s']:.2f} s; probe "
            f"attempts that stalled or broke while the agents reloaded: "
            f"{sum(r['broken'] for r in p['allowed_to_denied'] + p['denied_to_allowed'])}; "
            f"verified: {'yes' if p['verified'] else 'NO'}."
        )
        lines.append("")
    if "scale" in sec and "error" not in sec["scale"]:
        s = sec["scale"]
        lines.append(
            f"Agent + tunnel with {s['enrolled']} enrolled pods (control + workers): ready in "
            f"{s['ready_s']:.1f} s; idle RSS {s['idle_rss_mib']:.0f} MiB, idle CPU "
            f"{s['idle_cpu_pct']:.1f}% of a core; with {s['load_connections']} connections "
            f"echoing 1 KiB ({s['load_round_trips_per_s']:,.0f} round trips/s): CPU "
            f"{s['load_cpu_pct']:.0f}% of a core, RSS {s['load_rss_mib']:.0f} MiB "
            f"(peak {s['peak_rss_mib']:.0f} MiB); verified: {'yes' if s['verified'] else 'NO'}."
        )
        lines.append("")
    if "flow_events" in sec and "error" not in sec["flow_events"]:
        f = sec["flow_events"]
        lines.append(
            f"Flow events (kernel ring buffer of {f['ring_bytes'] >> 20} MiB -> the agent's "
            f"reader): {f['written_per_s']:,} events/s for {f['seconds']:.0f} s, "
            f"{f['read']:,} of {f['written']:,} read, ring-buffer drops {f['ringbuf_drops']}, "
            f"decode errors {f['decode_errors']}; verified: {'yes' if f['verified'] else 'NO'}."
        )
        lines.append("")
    if "same_node" in sec and "error" not in sec["same_node"]:
        lines.extend(_same_node(sec["same_node"]))
    return "\n".join(lines)


def _same_node(sn: dict[str, Any]) -> list[str]:
    """The same-node table: no mesh, bypass, bypass off (median (min-max) of the reps)."""
    lines = ["Same node (both pods on node0): no mesh vs nodemesh with the same-node bypass, and "
             "with it switched off (the tunnel path).", "",
             "| workload | no mesh | nodemesh bypass | nodemesh bypass off | bypass / no mesh "
             "| off / no mesh | verified |", "|---|---|---|---|---|---|---|"]
    for name in ("latency", "bulk"):
        w = sn[name]
        cells = " | ".join(_cell(w["summary"][m]) for m in ("no-mesh", "bypass", "tunnel"))
        r = w["ratios"]
        lines.append(f"| {name} ({w['unit']}) | {cells} | {_fmt(r['bypass/no-mesh'])}x "
                     f"| {_fmt(r['tunnel/no-mesh'])}x | {'yes' if w['verified'] else 'NO'} |")
    before, after = sn["load_before"][0], sn["load_after"][0]
    lines += ["", f"Targets (latency <= 1.5x, bulk >= 0.7x no mesh): "
              f"{'met' if sn['targets_met'] else 'NOT met'}; load average (1 min) "
              f"{before:.2f} before, {after:.2f} after.", ""]
    return lines


def _paths_rows(paths: dict[str, Any]) -> list[str]:
    """The table rows of one paths pass (bulk, streams, latency p50/p99, new connections)."""
    lines = [
        "| workload | unit | no mesh | nodemesh | Envoy HBONE | nodemesh / no mesh "
        "| nodemesh / Envoy | verified |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, w in paths.items():
        s = w["summary"]
        r = w["ratios"]
        lines.append(
            f"| {LABELS.get(name, name)} | {w['unit']} | {_cell(s['no-mesh'])} | "
            f"{_cell(s['nodemesh'])} | {_cell(s['envoy'])} | {_fmt(r['nodemesh/no-mesh'], 3)} | "
            f"{_fmt(r['nodemesh/envoy'], 3)} | {_verified(s)} |"
        )
        if name == "latency":
            p99 = {mode: summarize(w["runs"][mode], "p99_us") for mode in MODES}
            r99 = ratios(p99)
            lines.append(
                f"| 1-byte request/response | us p99 | {_cell(p99['no-mesh'])} | "
                f"{_cell(p99['nodemesh'])} | {_cell(p99['envoy'])} | "
                f"{_fmt(r99['nodemesh/no-mesh'], 3)} | {_fmt(r99['nodemesh/envoy'], 3)} | "
                f"{_verified(s)} |"
            )
        if name == "bulk":
            cpu = {mode: w["cpu_s_per_gb"][mode] for mode in ("nodemesh", "envoy")}
            lines.append(
                f"| bulk: proxy CPU per GB received | CPU s | - | {_fmt(cpu['nodemesh'])} | "
                f"{_fmt(cpu['envoy'])} | - | "
                f"{_fmt(cpu['nodemesh'] / cpu['envoy'] if cpu['envoy'] else None, 3)} | - |"
            )
    return lines


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 -- optional (bench extra) and slow to import

    matplotlib.use("Agg")  # no display on the test machines
    import matplotlib.pyplot as plt  # noqa: PLC0415 -- after choosing the backend

    paths = results["sections"].get("paths", {})
    fig, axes = plt.subplots(1, len(paths), figsize=(4 * max(1, len(paths)), 3.6), squeeze=False)
    colors = {"no-mesh": "#9e9e9e", "nodemesh": "#1f77b4", "envoy": "#ff7f0e"}
    for ax, (name, w) in zip(axes[0], paths.items(), strict=False):
        meds, lo, hi = [], [], []
        for mode in MODES:
            s = w["summary"][mode]
            med = s.get("median") or 0.0
            meds.append(med)
            lo.append(med - (s.get("min") or med))
            hi.append((s.get("max") or med) - med)
        ax.bar(MODES, meds, yerr=[lo, hi], color=[colors[m] for m in MODES], capsize=4)
        ax.set_title(LABELS.get(name, name), fontsize=9)
        ax.set_ylabel(w["unit"] + (" (lower is better)" if not w["higher_is_better"] else ""))
        ax.tick_params(axis="x", labelsize=8)
    m = results["machine"]
    fig.suptitle(f"nodemesh vs no mesh vs Envoy - {m['cpu']}, kernel {m['kernel']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
