"""connect() cost: no programs vs. nodemesh's programs with 0 and with 100k policy entries.

A process in the node's cgroup makes non-blocking connect() calls from inside an enrolled pod
to a server pod, marked like the tunnel's upstream sockets so cgroup/connect4 runs the full
policy lookup (generation, ipcache, up to four hash lookups). Only the syscall is timed; the
three modes run in one process on the same test bed, so the ratios compare like with like.

Run as root: .venv/bin/python -m benchmarks.connect_cost [--connects N] [--repeats R]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from agent.datapath.datapath import Datapath
from agent.datapath.layouts import PolicyEntry, PolicyKey
from agent.datapath.options import DEFAULT_PIN_ROOT, MARK_MAGIC, BuildOptions
from agent.datapath.verdicts import Reason, Verdict
from agent.testbed import Cluster

TIMER = """
import json, socket, sys, time
from agent.host import netns
ns, dst = sys.argv[1], sys.argv[2]
port, mark, n = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
socks = []
with netns.entered(ns):
    for _ in range(n):
        socks.append(socket.socket())
times = []
for s in socks:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    s.setblocking(False)
    t = time.perf_counter_ns()
    try:
        s.connect((dst, port))
    except BlockingIOError:
        pass
    times.append(time.perf_counter_ns() - t)
    s.close()
print(json.dumps(times))
"""


def measure(cluster: Cluster, n: int) -> list[int]:
    node, pod, server = cluster.nodes[0], cluster.pod(0, 0), cluster.pod(0, 1)
    mark = (5 << 12) | MARK_MAGIC
    proc = node.python(
        TIMER, pod.netns_path, str(server.ip), "8080", str(mark), str(n), stdout=subprocess.PIPE
    )
    assert proc.popen is not None
    out, _ = proc.popen.communicate(timeout=300)
    return list(json.loads(out))


def summary(samples: list[int]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100)
    return {"p50_ns": q[49], "p90_ns": q[89], "p99_ns": q[98], "mean_ns": statistics.fmean(samples)}


def policy_entries(count: int, target: ipaddress.IPv4Address) -> dict[PolicyKey, PolicyEntry]:
    """count entries over 1000 destinations x sources, plus the one the benchmark hits."""
    allow = PolicyEntry(Verdict.ALLOW)
    entries = {
        PolicyKey(
            ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.200.0.0")) + i // 100),
            3 + i % 100,
            0,
            1000 + i % 7,
        ): allow
        for i in range(count - 1)
    }
    entries[PolicyKey(target, 5, 0, 8080)] = PolicyEntry(Verdict.ALLOW, Reason.NONE, 1, 0)
    return entries


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connects", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    results: dict[str, list[int]] = {
        "no programs": [],
        "programs, 0 entries": [],
        "programs, 100k entries": [],
    }
    server_code = (
        "import socket,time\ns=socket.create_server(('0.0.0.0',8080),backlog=4096)\n"
        "time.sleep(3600)"
    )
    # Two identical clusters: `plain` never gets programs, `meshed` does. Modes are interleaved
    # per repeat so warm-up and drift hit all three alike.
    with (
        Cluster(nodes=1, pods_per_node=2, description="connect_cost plain") as plain,
        Cluster(nodes=1, pods_per_node=2, description="connect_cost meshed") as meshed,
    ):
        for c in (plain, meshed):
            c.pod(0, 1).python(server_code)
        pin = DEFAULT_PIN_ROOT / f"bench-{meshed.run_id}"
        dp = Datapath(meshed.nodes[0].cgroup_root, BuildOptions(pin_dir=pin))
        try:
            dp.install()
            dp.trust_cgroup(meshed.nodes[0].cgroup)  # the timer plays the tunnel from the node
            dp.enroll(meshed.pod(0, 0).netns, 7, meshed.pod(0, 0).ip)
            big = policy_entries(100_000, meshed.pod(0, 1).ip)
            measure(plain, 500)  # warm-up
            measure(meshed, 500)
            for _ in range(args.repeats):
                results["no programs"] += measure(plain, args.connects)
                dp.apply_policy({}, {})
                results["programs, 0 entries"] += measure(meshed, args.connects)
                dp.apply_policy(big, {})
                results["programs, 100k entries"] += measure(meshed, args.connects)
        finally:
            dp.uninstall()
    base = summary(results["no programs"])
    report: dict[str, object] = {
        "cpu": platform.processor() or platform.machine(),
        "kernel": platform.release(),
        "connects_per_mode": len(results["no programs"]),
    }
    print(
        f"connect() cost, {len(results['no programs'])} calls per mode, kernel {platform.release()}"
    )
    print(f"{'mode':<24}{'p50 us':>9}{'p90 us':>9}{'p99 us':>9}{'p50 ratio':>11}")
    for mode, samples in results.items():
        s = summary(samples)
        report[mode] = {**s, "p50_ratio_vs_no_programs": s["p50_ns"] / base["p50_ns"]}
        print(
            f"{mode:<24}{s['p50_ns'] / 1e3:>9.2f}{s['p90_ns'] / 1e3:>9.2f}{s['p99_ns'] / 1e3:>9.2f}"
            f"{s['p50_ns'] / base['p50_ns']:>11.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
