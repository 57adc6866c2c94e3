"""Agent + tunnel footprint with many enrolled pods on one node.

One node, `pods` pods, all in the mesh with their own service accounts (one certificate each).
Measured with psutil on the `nodemesh run` process (agent and tunnel are one process): time from
start to ready, RSS when idle, CPU when idle, then CPU and RSS while every pod holds one
connection to the next pod, echoing 1 KiB messages through the tunnel.
"""

from __future__ import annotations

import json
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


def _hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


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
            idle_rss = agent.memory_info().rss
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
                load_rss = max(load_rss, agent.memory_info().rss)
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
                "peak_rss_mib": _hwm_bytes(agent.pid) / MiB,
                "verified": out["verified"] and enrolled == pods,
            }
        finally:
            stop_agents(c, agents, pins)
