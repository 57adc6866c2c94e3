"""The benchmark suite: no mesh vs nodemesh vs Envoy HBONE, side by side in one run.

Run as root (make bench, or .venv/bin/python -m benchmarks.suite). Sections:
  paths         bulk (iperf3, 1 stream), concurrent streams (iperf3 -P), 1-byte request/response
                latency, new connection per request: each over the three routes of bed.py,
                modes interleaved and rotated every repetition, after a warm-up round
  policy_update mesh file with 10k rules changed -> connect denied (policy_update.py)
  scale         agent + tunnel RSS/CPU with 100 enrolled pods (scale.py)
  connect_cost  the kernel connect() cost (connect_cost.py, its own test beds)
  flow_events   kernel flow events through the agent's ring-buffer reader (flow_events.py)
  same_node     two pods of one node: no mesh vs same-node bypass vs bypass off (same_node.py)
  profile       with --profile: py-spy on both agents during a bulk transfer (profile.py)
Writes <out>/latest.json, latest.md and latest.png (out defaults to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ztunnel
from benchmarks import (
    connect_cost,
    envoy,
    flow_events,
    policy_update,
    profile,
    report,
    same_node,
    scale,
)
from benchmarks.bed import MODES, Bed, bring_up
from benchmarks.workloads import TINY, WARMUP, WORKLOADS, Settings

SECTIONS = ("paths", "policy_update", "scale", "connect_cost", "flow_events", "same_node")
RESULTS = Path(__file__).with_name("results")


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "missing"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def cipher_speed(evp: str) -> float | None:
    """GB/s of one cipher at 16 KiB records (openssl speed, 1 s): the suites differ (see README)."""
    out = _version_all(["openssl", "speed", "-evp", evp, "-bytes", "16384", "-seconds", "1"])
    last = out.split()[-1] if out.split() else ""
    return float(last[:-1]) * 1000 / 1e9 if last.endswith("k") else None


def _version_all(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    envoy_version = _version([envoy.binary(), "--version"]).split("version: ")[-1]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": envoy_version.split("/")[1] if "/" in envoy_version else envoy_version,
        "iperf3": _version(["iperf3", "--version"]).split()[1:2][0]
        if len(_version(["iperf3", "--version"]).split()) > 1 else "unknown",
        "cipher_gb_s": {c: cipher_speed(c) for c in ("aes-128-gcm", "aes-256-gcm")},
        # the agents run from this tree: what their tunnel runs, compiled or interpreted
        "data_path": ztunnel.data_path(),
        "compiled": ztunnel.compiled_modules(),
    }


def run_paths(bed: Bed, s: Settings) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {mode: [] for mode in MODES} for name in WORKLOADS
    }
    for rep in range(-1, s.reps):  # rep -1 is the warm-up round, discarded
        order = MODES[rep % 3:] + MODES[:rep % 3]  # who goes first rotates
        for name, (measure, _, _) in WORKLOADS.items():
            for mode in order:
                r = measure(bed, bed.routes[mode], WARMUP if rep < 0 else s)
                if rep >= 0:
                    r["rep"] = rep
                    runs[name][mode].append(r)
                    print(f"  {name:<9} {mode:<9} rep {rep}: {r.get('value', 0):,.2f}"
                          f"{'' if r.get('verified') else '  (NOT VERIFIED)'}", flush=True)
    out: dict[str, Any] = {}
    for name, (_, unit, higher) in WORKLOADS.items():
        summary = {mode: report.summarize(runs[name][mode]) for mode in MODES}
        w: dict[str, Any] = {
            "unit": unit,
            "higher_is_better": higher,
            "summary": summary,
            "ratios": report.ratios(summary),
            "verified": all(r.get("verified") for m in MODES for r in runs[name][m]),
            "runs": runs[name],
        }
        if name == "bulk":
            w["cpu_s_per_gb"] = {
                mode: sum(r["proxy_cpu_s"] for r in runs[name][mode])
                / max(1e-9, sum(r.get("bytes_received", 0) for r in runs[name][mode]) / 1e9)
                for mode in MODES
            }
        out[name] = w
    return out


def run(
    s: Settings, sections: tuple[str, ...], out: Path, profile_out: Path | None
) -> dict[str, Any]:
    started = time.monotonic()
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": dataclasses.asdict(s),
        "ciphers": {},
        "sections": {},
    }
    sec = results["sections"]
    with tempfile.TemporaryDirectory(prefix="nodemesh-bench-") as tmp:
        work = Path(tmp)
        if {"paths", "policy_update"} & set(sections) or s.profile_seconds:
            with bring_up(work, s.workers[0]) as bed:
                results["ciphers"] = bed.ciphers
                print(f"test bed {bed.cluster.run_id} up ({s.workers[0]} worker(s)); TLS "
                      f"{bed.ciphers}", flush=True)
                if "paths" in sections:
                    sec["paths"] = run_paths(bed, s)
                if s.profile_seconds and profile_out is not None:
                    print("profiling the agents under bulk load", flush=True)
                    sec["profile"] = _guarded(
                        lambda: profile.record(bed, s.profile_seconds, profile_out))
                if "policy_update" in sections:
                    print(f"policy update with {s.policy_rules} rules", flush=True)
                    sec["policy_update"] = _guarded(
                        lambda: policy_update.measure(bed, s.policy_rules, s.policy_reps))
        for n in s.workers[1:] if "paths" in sections else ():
            with bring_up(work, n) as bed:
                print(f"test bed {bed.cluster.run_id} up ({n} workers, Envoy concurrency {n})",
                      flush=True)
                sec[f"paths_w{n}"] = run_paths(bed, s)
        if "scale" in sections:
            print(f"agent footprint with {s.scale_pods} pods", flush=True)
            sec["scale"] = _guarded(lambda: scale.measure(s.scale_pods, s.scale_load_seconds))
        if "connect_cost" in sections:
            print("connect() cost", flush=True)
            sec["connect_cost"] = _guarded(lambda: connect_cost.main(
                ["--connects", str(s.connect_cost_connects),
                 "--repeats", str(s.connect_cost_repeats)]
            ))
        if "flow_events" in sections:
            print(f"flow events at {s.flow_events_rate:,}/s", flush=True)
            sec["flow_events"] = _guarded(lambda: flow_events.measure(
                s.flow_events_rate, s.flow_events_seconds))
        if "same_node" in sections:
            print("same node: no mesh, bypass, bypass off", flush=True)
            sec["same_node"] = _guarded(lambda: same_node.measure(s))
    results["duration_s"] = time.monotonic() - started
    # Both tunnels must have used the same TLS 1.3 suite (bed.start_agents sees to it).
    ciphers = results["ciphers"]
    same_suite = not ciphers or len({tuple(v) for v in ciphers.values()}) == 1
    results["verified"] = _all_verified(sec) and same_suite
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    text = report.table(results)
    (out / "latest.md").write_text(text + "\n")
    if "paths" in sec:
        report.chart(results, out / "latest.png")
    print()
    print(text)
    print(f"wrote {out / 'latest.json'}")
    return results


def _guarded(section: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A failing section is recorded (and fails the run) without losing the other results."""
    try:
        return section()
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}", "verified": False}


def _all_verified(sec: dict[str, Any]) -> bool:
    checks = [w["verified"] for name, paths in sec.items() if name.startswith("paths")
              for w in paths.values()]
    checks += [sec[k]["verified"]
               for k in ("policy_update", "scale", "flow_events", "same_node") if k in sec]
    checks += [sec[k].get("verified", True) for k in ("connect_cost", "profile") if k in sec]
    return all(checks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="very short runs, one repetition (smoke)")
    ap.add_argument("--reps", type=int, help="repetitions per cell (default 3)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--profile", type=float, metavar="SECONDS", default=0.0,
                    help="also sample both agents with py-spy during a bulk run")
    ap.add_argument("--workers", type=int, nargs="+",
                    help="paths passes: agents' --workers and Envoy's --concurrency (default 1 2)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="only re-render the table and chart of a saved results file")
    args = ap.parse_args(argv)
    if args.report:
        results = json.loads(args.report.read_text())
        passes = [v for k, v in results["sections"].items() if k.startswith("paths")]
        for w in (w for paths in passes for w in paths.values()):
            w["summary"] = {mode: report.summarize(w["runs"][mode]) for mode in MODES}
            w["ratios"] = report.ratios(w["summary"])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latest.md").write_text(report.table(results) + "\n")
        report.chart(results, args.out / "latest.png")
        print(report.table(results))
        return 0
    if os.geteuid() != 0:
        print("benchmarks: run as root (network namespaces, cgroups, BPF)", file=sys.stderr)
        return 2
    s = TINY if args.tiny else Settings()
    changes: dict[str, Any] = {"profile_seconds": args.profile}
    if args.reps:
        changes["reps"] = args.reps
    if args.workers:
        changes["workers"] = tuple(args.workers)
    s = dataclasses.replace(s, **changes)
    results = run(s, tuple(args.only or SECTIONS), args.out, args.out)
    return 0 if results["verified"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
