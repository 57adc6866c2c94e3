"""Agent + tunnel footprint with many enrolled pods on one node.

One node, `pods` pods, all in the mesh with their own service accounts (one certificate each).
Measured with psutil on the `nodemesh run` control process and its data-plane workers (summed,
default worker count): time from
start to ready, RSS when idle, CPU when idle, then CPU and RSS while every pod holds one
connection to the next pod, echoing 1 KiB messages through the tunnel.

Enrollment at that scale: the last pod is taken out of the mesh file and put back, ENROLL_CYCLES
times; reported are the agent's own enroll/unenroll call times (config_dump last_enroll /
last_unenroll: certificate, tunnel listeners in the pod's netns, BPF maps) and the time from the
file write until config_dump shows the change (adds the file reload and the poll).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from agent.testbed import Cluster
from benchmarks import meshfile, programs
from benchmarks.bed import config_dump, cpu_seconds, start_agents, stop_agents, sysctls

PORT = 7100
MiB = 1 << 20
ENROLL_CYCLES = 5


def _hwm_bytes(agent: psutil.Process) -> int:
    """Peak resident memory of the agent and its data-plane workers, each process's own peak."""
    total = 0
    for proc in (agent, *agent.children()):
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total


def _rss(agent: psutil.Process) -> int:
    """The control process and its data-plane workers together."""
    return sum(p.memory_info().rss for p in (agent, *agent.children()))


def _write(config: Path, text: str) -> float:
    tmp = config.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, config)
    return time.monotonic()


def _until(c: Cluster, enrolled: bool, ref: str, before: Any,
           limit: float = 60.0) -> dict[str, Any]:
    """The first config_dump that shows `ref` (un)enrolled and the enroller's record of that
    call (`last_enroll`/`last_unenroll`, a new value: the pod leaves `enrolled` before the
    workers have closed its listeners, and the call is timed when they have)."""
    key = "last_enroll" if enrolled else "last_unenroll"
    start = time.monotonic()
    while time.monotonic() - start < limit:
        dump = config_dump(c.nodes[0])
        if (any(e["workload"] == ref for e in dump["enrolled"].values()) == enrolled
                and dump[key] is not None and dump[key] != before):
            return dump
        time.sleep(0.005)
    raise TimeoutError(f"{ref} not {'enrolled' if enrolled else 'unenrolled'} in {limit:.0f}s")


def _enroll_cycles(c: Cluster, config: Path, pods: int) -> dict[str, Any]:
    last = pods - 1
    ref = f"{meshfile.NAMESPACE}/pod-{last}"
    calls: dict[str, list[float]] = {"enroll": [], "unenroll": []}
    seen: dict[str, list[float]] = {"enroll": [], "unenroll": []}
    previous = config_dump(c.nodes[0])
    for _ in range(ENROLL_CYCLES):
        for action, text in (("unenroll", meshfile.many_pods(pods, without=last)),
                             ("enroll", meshfile.many_pods(pods))):
            t0 = _write(config, text)
            dump = _until(c, action == "enroll", ref, previous[f"last_{action}"])
            previous = dump
            seen[action].append(time.monotonic() - t0)
            calls[action].append(dump[f"last_{action}"][1])
    out: dict[str, Any] = {}
    for action in ("enroll", "unenroll"):
        out[f"{action}_call_median_ms"] = statistics.median(calls[action]) * 1e3
        out[f"{action}_call_max_ms"] = max(calls[action]) * 1e3
        out[f"{action}_file_to_dump_median_ms"] = statistics.median(seen[action]) * 1e3
    return out


def measure(pods: int, load_seconds: float, idle_seconds: float = 3.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nodemesh-bench-scale-") as tmp, \
            Cluster(nodes=1, pods_per_node=pods, description="nodemesh bench scale") as c:
        work = Path(tmp)
        config = work / "mesh.yaml"
        config.write_text(meshfile.many_pods(pods))
        for pod in c.pods:
            sysctls(pod, {"net/ipv4/tcp_tw_reuse": "1"})
        start = time.monotonic()
        agents, pins = start_agents(c, config, work, "bench-scale")
        try:
            ready_s = time.monotonic() - start
            enrolled = len(config_dump(c.nodes[0])["enrolled"])
            agent = psutil.Process(agents[0].pid)
            time.sleep(1.0)  # let start-up work (certificate issuance, first reconcile) settle
            cpu0 = cpu_seconds(agents)
            time.sleep(idle_seconds)
            idle_cpu = (cpu_seconds(agents) - cpu0) / idle_seconds
            idle_rss = _rss(agent)
            enrollment = _enroll_cycles(c, config, pods)
            names = ",".join(p.netns for p in c.pods)
            programs.start_ready(c.nodes[0], programs.FANOUT_SERVER, names, str(PORT))
            pairs = ",".join(
                f"{p.netns}={c.pods[(i + 1) % pods].ip}" for i, p in enumerate(c.pods)
            )
            client = programs.start_ready(
                c.pod(0, 0), programs.FANOUT_CLIENT, pairs, str(PORT), str(load_seconds)
            )
            assert client.popen is not None and client.popen.stdin is not None
            assert client.popen.stdout is not None
            cpu0 = cpu_seconds(agents)
            t0 = time.monotonic()
            client.popen.stdin.write(b"go\n")
            client.popen.stdin.flush()
            load_rss = 0
            while client.poll() is None and time.monotonic() - t0 < load_seconds + 60:
                load_rss = max(load_rss, _rss(agent))
                time.sleep(0.1)
            elapsed = time.monotonic() - t0
            load_cpu = (cpu_seconds(agents) - cpu0) / elapsed
            out = json.loads(client.popen.stdout.read().decode().strip().splitlines()[-1])
            return {
                "pods": pods,
                "enrolled": enrolled,
                "ready_s": ready_s,
                "idle_rss_mib": idle_rss / MiB,
                "idle_cpu_pct": idle_cpu * 100,
                "load_connections": out["connections"],
                "load_round_trips_per_s": out["round_trips"] / elapsed,
                "load_rss_mib": load_rss / MiB,
                "load_cpu_pct": load_cpu * 100,
                "peak_rss_mib": _hwm_bytes(agent) / MiB,
                **enrollment,
                "load_average": os.getloadavg(),
                "verified": out["verified"] and enrolled == pods,
            }
        finally:
            stop_agents(c, agents, pins)
