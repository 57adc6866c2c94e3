"""Same node (issue #13): two enrolled pods of one node, with the same-node bypass on and, beside
it, off (the old path: both pods' tunnels, HBONE over the node), against an unenrolled pair of
the same node (no mesh). Workloads: 1-byte request/response latency (p50) and one-stream bulk
with an integrity echo, modes interleaved and rotated every repetition after a warm-up round.

The switch is the agent's map (`nm_bypass_opt_v1`), flipped between runs: the agent wrote it at
start from --same-node-bypass. Each run checks from the kernel's counters that it really took
the path it is labelled with (connects bypassed > 0 for `bypass`, == 0 for `tunnel`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.datapath.bypass import BypassCounter
from agent.datapath.datapath import Datapath
from agent.datapath.options import BuildOptions
from agent.testbed import Cluster
from agent.testbed.cluster import Pod
from benchmarks import meshfile, programs, report
from benchmarks.bed import (
    BULK_PORT,
    CONN_SYSCTLS,
    ECHO_PORT,
    Bed,
    Route,
    start_agents,
    stop_agents,
    sysctls,
)
from benchmarks.workloads import WARMUP, Settings, bulk, latency

MODES = ("no-mesh", "bypass", "tunnel")
WORKLOADS = {"latency": (latency, "us p50", False), "bulk": (bulk, "Gbit/s", True)}


class SameNodeBed(Bed):
    """Bed whose servers are on node0: pod1 (enrolled) and pod3 (not)."""

    def server_pod(self, route: Route) -> Pod:
        return self.cluster.pod(0, 3 if route.mode == "no-mesh" else 1)


@contextlib.contextmanager
def bring_up(work: Path) -> Iterator[tuple[SameNodeBed, Datapath]]:
    mesh_file = work / "mesh.yaml"
    mesh_file.write_text(meshfile.same_node_pair())
    with Cluster(nodes=1, pods_per_node=4, description="nodemesh same-node benchmark") as c:
        for pod in c.pods:
            sysctls(pod, CONN_SYSCTLS)
        agents, pins = start_agents(c, mesh_file, work, "bench-same")
        try:
            servers = {f"echo-{p.name}": programs.start_ready(p, programs.ECHO_SERVER,
                                                               str(ECHO_PORT))
                       for p in (c.pod(0, 1), c.pod(0, 3))}
            enrolled = Route("bypass", c.pod(0, 0), str(c.pod(0, 1).ip), BULK_PORT, ECHO_PORT,
                             list(agents))
            routes = {
                "no-mesh": Route("no-mesh", c.pod(0, 2), str(c.pod(0, 3).ip), BULK_PORT,
                                 ECHO_PORT),
                "bypass": enrolled,
                "tunnel": Route("tunnel", enrolled.client, enrolled.ip, BULK_PORT, ECHO_PORT,
                                list(agents)),
            }
            dp = Datapath(c.nodes[0].cgroup_root, BuildOptions(pin_dir=pins[0]))
            dp.open_pins()
            try:
                yield SameNodeBed(c, work, mesh_file, agents, [], routes, servers, {}), dp
            finally:
                dp.set_same_node_bypass(True)
                for s in servers.values():
                    s.stop()
        finally:
            stop_agents(c, agents, pins)


def _one(bed: SameNodeBed, dp: Datapath, name: str, mode: str, s: Settings) -> dict[str, Any]:
    measure = WORKLOADS[name][0]
    if mode != "no-mesh":
        dp.set_same_node_bypass(mode == "bypass")
    before = dp.bypass_counters()
    r = measure(bed, bed.routes[mode], s)
    after = dp.bypass_counters()
    r["bypassed_connects"] = after[BypassCounter.CONNECTS] - before[BypassCounter.CONNECTS]
    r["fallbacks"] = after[BypassCounter.FALLBACK] - before[BypassCounter.FALLBACK]
    took_path = (r["bypassed_connects"] > 0) if mode == "bypass" else r["bypassed_connects"] == 0
    r["verified"] = bool(r.get("verified")) and took_path
    return r


def measure(s: Settings) -> dict[str, Any]:
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {n: {m: [] for m in MODES}
                                                        for n in WORKLOADS}
    with tempfile.TemporaryDirectory(prefix="nodemesh-bench-same-") as tmp, \
            bring_up(Path(tmp)) as (bed, dp):
        for rep in range(-1, s.reps):  # rep -1 is the warm-up round, discarded
            order = MODES[rep % 3:] + MODES[:rep % 3]
            for name in WORKLOADS:
                for mode in order:
                    r = _one(bed, dp, name, mode, WARMUP if rep < 0 else s)
                    if rep >= 0:
                        r["rep"] = rep
                        runs[name][mode].append(r)
                        print(f"  same-node {name:<8} {mode:<8} rep {rep}: "
                              f"{r.get('value', 0):,.2f}"
                              f"{'' if r.get('verified') else '  (NOT VERIFIED)'}", flush=True)
    out: dict[str, Any] = {"load_before": load_before, "load_after": os.getloadavg()}
    for name, (_, unit, higher) in WORKLOADS.items():
        summary = {m: report.summarize(runs[name][m]) for m in MODES}

        def ratio(a: str, summary: dict[str, Any] = summary) -> float | None:
            x, y = summary[a].get("median"), summary["no-mesh"].get("median")
            return float(x / y) if x is not None and y else None

        out[name] = {
            "unit": unit, "higher_is_better": higher, "summary": summary,
            "ratios": {"bypass/no-mesh": ratio("bypass"), "tunnel/no-mesh": ratio("tunnel")},
            "verified": all(r.get("verified") for m in MODES for r in runs[name][m]),
            "runs": runs[name],
        }
    lat, blk = out["latency"]["ratios"]["bypass/no-mesh"], out["bulk"]["ratios"]["bypass/no-mesh"]
    out["targets_met"] = bool(lat is not None and blk is not None and lat <= 1.5 and blk >= 0.7)
    out["verified"] = out["latency"]["verified"] and out["bulk"]["verified"]
    return out
