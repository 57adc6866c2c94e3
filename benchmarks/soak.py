"""Soak: hours of mixed traffic in minutes' worth of code; does anything grow or break?

Two-node test bed with real agents (benchmarks/agentproc.py). client (node0 pod0) and prober
(node0 pod1) talk to an echo server (node1 pod0) through the mesh, for `--seconds`:
  short    a new connection every --short-gap s: 1-byte request, echo compared; latency -> p99
  bulk     64 MiB of seeded random data per connection, paced (a long transfer), echoed back,
           SHA-256 compared; again and again
  streams  every --streams-period s, 100 connections open at once (100 HBONE streams), each
           echoing 64 KiB
  probe    prober -> server every 0.5 s: refused while its DENY is in force (expected)
  policy   every --policy-period s the mesh file is rewritten: a DENY for a principal nobody has
           is added, then removed; then a DENY for the prober is added and removed 10 s later
  certs    --cert-ttl 120: every workload certificate is renewed every minute (counted from the
           agents' nodemesh_certificate_rotations)
  restart  node1's agent is replaced once, halfway (agentproc.replace_agent: --restart surge or
           plain)
Every --interval s: open fds, RSS, CPU % of each agent (its process and every child process).
Writes <out>/soak.json (raw), soak.md (summary, verdict) and soak.png (chart). Exits 1 when the
verdict fails: fd or RSS growth over 5 % between the window after warm-up and the last one, any
unexpected failed connection, or a check that the schedule really happened.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from agent.datapath.datapath import Datapath
from agent.datapath.options import BuildOptions
from agent.runtime.certs import load_or_create_authority
from agent.testbed import Cluster
from benchmarks import meshfile, programs, soakreport
from benchmarks.agentproc import (
    RESTART_MODES,
    AgentError,
    AgentSpec,
    RunningAgent,
    replace_agent,
    start_agents,
)
from benchmarks.bed import CONN_SYSCTLS, sysctls
from benchmarks.soakload import KINDS, Event, Load

RESULTS = Path(__file__).with_name("results")
ECHO_PORT = 7000
MiB = 1 << 20
DENY_HOLD = 10.0  # seconds the prober's DENY stays in the file
RESTART_NODE = 1


@dataclass(frozen=True)
class SoakSettings:
    seconds: float = 1800.0
    warmup: float = 300.0
    window: float = 180.0
    interval: float = 5.0
    restart: str = "surge"
    cert_ttl: int = 120
    short_gap: float = 0.05
    bulk_bytes: int = 64 * MiB
    bulk_rate: float = 8 * MiB  # bytes/s: 8 s per transfer
    bulk_gap: float = 1.0
    streams: int = 100
    stream_bytes: int = 64 << 10
    streams_period: float = 30.0
    probe_gap: float = 0.5
    policy_period: float = 20.0
    drain_seconds: float = 15.0  # longer than one bulk transfer: a drain lets it finish


def settings_for(seconds: float, restart: str) -> SoakSettings:
    """Warm-up: a third of the run, at most 5 min (it must hold a streams burst, a policy
    cycle and a renewal); windows: a tenth, at least 30 s."""
    return SoakSettings(seconds=seconds, warmup=min(300.0, seconds / 3),
                    window=max(30.0, seconds / 10), restart=restart)


class Sampler:
    """fds, RSS and CPU of each node's agent processes (and their children: data-plane workers),
    and certificate rotations from each agent's metrics."""

    def __init__(self) -> None:
        self._cpu: dict[int, float] = {}
        self._last = time.monotonic()
        self.rotations: dict[tuple[int, int], dict[str, float]] = {}  # (node, pid) -> per id
        self.started: dict[int, float] = {}  # agent pid -> time.monotonic() it was started

    def sample(self, nodes: dict[int, list[RunningAgent]]) -> dict[str, Any]:
        now = time.monotonic()
        dt, self._last = max(1e-6, now - self._last), now
        out: dict[str, Any] = {}
        cpu_now: dict[int, float] = {}
        for node, agents in nodes.items():
            fds = rss = 0
            cpu = 0.0
            pids = []
            for a in list(agents):
                with contextlib.suppress(psutil.Error):
                    top = psutil.Process(a.proc.pid)
                    for p in (top, *top.children(recursive=True)):
                        with p.oneshot():
                            fds += p.num_fds()
                            rss += p.memory_info().rss
                            t = p.cpu_times()
                        cpu_now[p.pid] = t.user + t.system
                        cpu += max(0.0, cpu_now[p.pid] - self._cpu.get(p.pid, 0.0))
                        pids.append(p.pid)
                self.started.setdefault(a.proc.pid, a.started)
                self._rotations(node, a)
            out[str(node)] = {"fds": fds, "rss_mib": rss / MiB, "cpu_pct": 100 * cpu / dt,
                              "pids": pids}
        self._cpu = cpu_now
        return out

    def _rotations(self, node: int, a: RunningAgent) -> None:
        text = a.metrics()
        if text is None:
            return
        per_id = {}
        for fam in text_string_to_metric_families(text):
            if fam.name == "nodemesh_certificate_rotations":
                for s in fam.samples:
                    if s.name.endswith("_total"):
                        per_id[s.labels["identity"]] = s.value
        self.rotations[(node, a.proc.pid)] = per_id


def _write_mesh(path: Path, unrelated: bool, deny_probe: bool) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(meshfile.soak(unrelated, deny_probe))
    os.replace(tmp, path)  # the file source never sees half a file


class PolicySchedule:
    """The schedule of mesh-file rewrites: add unrelated, remove it, DENY the prober (removed
    DENY_HOLD s later), repeat."""

    def __init__(self, mesh: Path, period: float, end: float) -> None:
        self.mesh, self.period, self.end = mesh, period, end
        self.step, self.due = 0, period / 2
        self.deny_until: float | None = None
        self.unrelated = False
        self.deny_changes: list[dict[str, float]] = []

    def tick(self, now: float, timeline: list[dict[str, Any]]) -> None:
        if self.deny_until is not None and now >= self.deny_until:
            _write_mesh(self.mesh, self.unrelated, False)
            self.deny_changes[-1]["removed"] = now
            timeline.append({"t": now, "what": "policy: prober DENY removed"})
            self.deny_until = None
        if now < self.due:
            return
        self.due += self.period
        kind = self.step % 3
        self.step += 1
        if kind in (0, 1):
            self.unrelated = kind == 0
            _write_mesh(self.mesh, self.unrelated, False)
            timeline.append({"t": now, "what": "policy: unrelated DENY "
                             + ("added" if self.unrelated else "removed")})
        elif now + DENY_HOLD + 20 < self.end:  # room to see the probe get through again
            _write_mesh(self.mesh, self.unrelated, True)
            self.deny_changes.append({"start": now, "removed": now + DENY_HOLD})
            self.deny_until = now + DENY_HOLD
            timeline.append({"t": now, "what": "policy: prober DENY added"})


def run(s: SoakSettings, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": asdict(s),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "kernel": platform.release(),
                    "loadavg_start": os.getloadavg()},
    }
    with tempfile.TemporaryDirectory(prefix="nodemesh-soak-") as tmp, \
            Cluster(nodes=2, pods_per_node=2, description="nodemesh soak") as c:
        work = Path(tmp)
        results["run_id"] = c.run_id  # netns, cgroups and pins carry it (all gone afterwards)
        for pod in c.pods:
            sysctls(pod, CONN_SYSCTLS)
        mesh = work / "mesh.yaml"
        _write_mesh(mesh, False, False)
        ca = work / "ca" / "root-cert.pem"
        load_or_create_authority(ca, ca.with_name("root-key.pem"), "cluster.local")
        specs = [AgentSpec(c, n, mesh, c.pin_dir(n.index, "soak"), work,
                           ("--cert-ttl", str(s.cert_ttl)), s.drain_seconds) for n in c.nodes]
        nodes: dict[int, list[RunningAgent]] = {}
        loads: list[Load] = []
        try:
            for a in start_agents(specs):
                nodes[a.spec.node.index] = [a]
            programs.start_ready(c.pod(1, 0), programs.ECHO_SERVER, str(ECHO_PORT))
            results.update(_drive(c, s, work=work, mesh=mesh, nodes=nodes, loads=loads))
        finally:
            for load in loads:
                load.proc.stop()
            for agents in nodes.values():
                for a in agents:
                    a.stop()
            for spec in specs:
                Datapath(c.nodes[0].cgroup_root, BuildOptions(pin_dir=spec.pin)).uninstall()
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["growth"] = soakreport.judge_growth(results)
    results["verdict"] = soakreport.verdict(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(results, indent=1))
    (out / "soak.md").write_text(soakreport.markdown(results))
    soakreport.chart(results, out / "soak.png")
    return results


def _drive(c: Cluster, s: SoakSettings, *, work: Path, mesh: Path,
           nodes: dict[int, list[RunningAgent]], loads: list[Load]) -> dict[str, Any]:
    server = str(c.pod(1, 0).ip)
    t0 = time.monotonic()
    until = t0 + s.seconds
    log = work / "load.log"
    target = (server, ECHO_PORT)
    client, prober = c.pod(0, 0), c.pod(0, 1)
    loads += [
        Load(client, log, "short", target=target, until=until, opts=(s.short_gap,)),
        Load(client, log, "bulk", target=target, until=until,
             opts=(s.bulk_bytes, s.bulk_rate, s.bulk_gap)),
        # The last burst starts well before the end: it is over by the final samples.
        Load(client, log, "streams", target=target, until=until - 20,
             opts=(s.streams, s.stream_bytes, s.streams_period)),
        Load(prober, log, "probe", target=target, until=until, opts=(s.probe_gap,)),
    ]
    timeline: list[dict[str, Any]] = []
    restart: dict[str, Any] = {"mode": s.restart, "node": RESTART_NODE}
    sampler, samples = Sampler(), list[dict[str, Any]]()
    policy = PolicySchedule(mesh, s.policy_period, s.seconds)
    restarter: threading.Thread | None = None

    def do_restart() -> None:
        old = nodes[RESTART_NODE][0]
        try:
            # While they overlap, the node's footprint is both agents' (sampled together).
            done = replace_agent(old, s.restart, tag="-new",
                                 on_spawn=nodes[RESTART_NODE].append)
        except AgentError as e:
            restart["error"] = str(e)
            return
        nodes[RESTART_NODE] = [done.agent]
        restart.update(began=done.began - t0, ready=done.ready - t0, ended=done.ended - t0)

    sampler.sample(nodes)  # CPU is a difference: the first reading only sets the start
    next_sample = t0
    while (now := time.monotonic()) < until:
        rel = now - t0
        if restarter is None and rel >= s.seconds / 2:
            timeline.append({"t": rel, "what": f"agent restart ({s.restart}) on node1"})
            restarter = threading.Thread(target=do_restart)
            restarter.start()
        policy.tick(rel, timeline)
        if now >= next_sample:
            samples.append({"t": rel, "nodes": sampler.sample(nodes)})
            next_sample += s.interval
            last = samples[-1]["nodes"]
            print(f"[{rel:6.0f}s] " + "  ".join(
                f"node{n}: {v['fds']} fds {v['rss_mib']:.0f} MiB {v['cpu_pct']:.0f}% CPU"
                for n, v in last.items())
                + "  conns " + " ".join(f"{ld.mode}={len(ld.events)}" for ld in loads),
                flush=True)
        time.sleep(min(0.25, max(0.0, next_sample - time.monotonic())))
    if restarter is not None:
        restarter.join()
    samples.append({"t": time.monotonic() - t0, "nodes": sampler.sample(nodes)})
    for load in loads:
        load.finish(timeout=s.bulk_bytes / s.bulk_rate + 60)
    return _judge(s, t0, loads=loads, samples=samples, timeline=timeline, restart=restart,
                  policy=policy, sampler=sampler, nodes=nodes)


def _judge(s: SoakSettings, t0: float, *, loads: list[Load], samples: list[dict[str, Any]],
           timeline: list[dict[str, Any]], restart: dict[str, Any], policy: PolicySchedule,
           sampler: Sampler, nodes: dict[int, list[RunningAgent]]) -> dict[str, Any]:
    events = sorted((Event(e.kind, e.t0 - t0, e.t1 - t0, e.ok, e.why)
                     for ld in loads for e in ld.events), key=lambda e: e.t0)
    windows = soakreport.deny_windows(events, policy.deny_changes)
    deny = [(float(w["start"] or 0), float(w["end"] or 0)) for w in windows]
    # Only a plain restart may fail connections; a surge replacement must not.
    rwin = ((restart["began"], restart["ended"] + 2.0)
            if s.restart == "plain" and "ended" in restart else None)
    cats = [soakreport.classify(e, rwin, deny) for e in events]
    edges = [x["t"] for x in samples[1:]] or [s.seconds]
    unexpected = [e for e, cat in zip(events, cats, strict=True) if cat == "unexpected"]
    renewals = []
    for (node, pid), per_id in sampler.rotations.items():
        alive = any(a.proc.pid == pid for a in nodes[node])
        lived = (s.seconds if alive else restart.get("ended", s.seconds)) - (
            sampler.started[pid] - t0)
        renewed = int(sum(max(0.0, v - 1) for v in per_id.values()))
        # Renewal at half-life: every identity of an agent that lived past one half-life (plus
        # slack for start-up) must have been renewed at least once.
        expected_min = len(per_id) * int(lived // (s.cert_ttl / 2 + 15))
        renewals.append({"node": node, "pid": pid, "identities": len(per_id),
                         "renewals": renewed, "lived_s": lived, "expected_min": expected_min,
                         "renewed_ok": renewed >= expected_min and bool(per_id)})
    return {
        "samples": samples,
        "intervals": soakreport.intervals(events, cats, edges),
        "timeline": timeline,
        "restart": restart,
        # Connections that began after the old agent had gone: the new one carries the traffic.
        "ok_after_restart": sum(1 for e in events if e.ok and e.t0 > restart.get("ended", 1e18)),
        "deny_windows": windows,
        "renewals": renewals,
        "totals": {k: {"ok": sum(1 for e in events if e.kind == k and e.ok),
                       "failed": sum(1 for e in events if e.kind == k and not e.ok)}
                   for k in KINDS},
        "failures": {
            "unexpected": len(unexpected),
            "during_restart": cats.count("during_restart"),
            "expected_probe": cats.count("expected_probe"),
            "examples": [asdict(e) for e in unexpected[:soakreport.EXAMPLES]],
        },
    }


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1800.0, help="traffic time (default 1800)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument("--restart", choices=RESTART_MODES, default="surge",
                    help="how node1's agent is replaced halfway (default surge)")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="only re-render soak.md and soak.png from a saved soak.json")
    args = ap.parse_args(argv)
    if args.report:
        results = json.loads(args.report.read_text())
        results["growth"] = soakreport.judge_growth(results)  # the judgement as of this code
        results["verdict"] = soakreport.verdict(results)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak.md").write_text(soakreport.markdown(results))
        soakreport.chart(results, args.out / "soak.png")
        return 0 if results["verdict"]["pass"] else 1
    if os.geteuid() != 0:
        print("soak: run as root (network namespaces, cgroups, BPF)", file=sys.stderr)
        return 2
    if args.seconds < 120:
        print("soak: --seconds must be at least 120 (warm-up, a restart, two windows)",
              file=sys.stderr)
        return 2
    results = run(settings_for(args.seconds, args.restart), args.out)
    print((args.out / "soak.md").read_text())
    return 0 if results["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
