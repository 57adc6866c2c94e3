"""connect() cost: no programs vs. nodemesh's programs with 0 and with 100k policy entries, and
an app's connect to a Service VIP vs. to a pod IP with 10k Services x 10 endpoints loaded.

A process in the node's cgroup makes non-blocking connect() calls from inside an enrolled pod
to a server pod, marked like the tunnel's upstream sockets so cgroup/connect4 runs the full
policy lookup (generation, ipcache, up to four hash lookups). Only the syscall is timed; the
three modes run in one process on the same test bed, so the ratios compare like with like.

The Service modes time the app's own (captured) connects inside the enrolled pod: to a pod IP,
and to a VIP that connect4 load-balances first (service lookup, random slot, backend lookup);
both are then policed and redirected to 127.0.0.1:15001 alike, so their ratio is the cost of
the translation.

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

from agent.abi import MARK_MAGIC
from agent.datapath.datapath import Datapath
from agent.datapath.layouts import Backend, Frontend, PolicyEntry, PolicyKey
from agent.datapath.options import DEFAULT_PIN_ROOT, BuildOptions
from agent.datapath.verdicts import KernelVerdict, Reason
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


# The app inside the pod (its cgroup and netns): captured connects, timed the same way, to
# several destinations in turn (so drift and the sink's scheduling hit them alike).
APP_TIMER = """
import json, socket, sys, time
n = int(sys.argv[1])
dests = [(d.split(":")[0], int(d.split(":")[1])) for d in sys.argv[2:]]
times = [[] for _ in dests]
for i in range(n * len(dests)):
    k = i % len(dests)
    s = socket.socket()
    s.setblocking(False)
    t = time.perf_counter_ns()
    try:
        s.connect(dests[k])
    except (BlockingIOError, ConnectionRefusedError):
        pass
    times[k].append(time.perf_counter_ns() - t)
    s.close()
print(json.dumps(times))
"""

# Stands in for the tunnel's outbound listener in the pod: accepts and drops.
SINK = """
import socket
s = socket.create_server(("127.0.0.1", 15001), backlog=4096)
while True:
    s.accept()[0].close()
"""
VIP = ipaddress.IPv4Address("10.97.0.1")


def measure_app(cluster: Cluster, n: int, *dests: str) -> list[list[int]]:
    """n captured connects from the app in pod 0 to each of dests ("ip:port"), alternating."""
    proc = cluster.pod(0, 0).python(APP_TIMER, str(n), *dests, stdout=subprocess.PIPE)
    assert proc.popen is not None
    out, _ = proc.popen.communicate(timeout=300)
    return [list(t) for t in json.loads(out)]


def service_table(services: int, endpoints: int, server: ipaddress.IPv4Address
                  ) -> dict[Frontend, tuple[Backend, ...]]:
    """services VIPs x endpoints backends; the first VIP's backends are the server pod."""
    base, pods = int(VIP), int(ipaddress.IPv4Address("10.200.0.0"))
    table = {
        Frontend(ipaddress.IPv4Address(base + i), 80): tuple(
            Backend(ipaddress.IPv4Address(pods + (i * endpoints + j) % 65000), 8080)
            for j in range(endpoints))
        for i in range(services)
    }
    table[Frontend(VIP, 80)] = tuple(Backend(server, 8080 + j) for j in range(endpoints))
    return table


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
    allow = PolicyEntry(KernelVerdict.ALLOW)
    entries = {
        PolicyKey(
            ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.200.0.0")) + i // 100),
            3 + i % 100,
            0,
            1000 + i % 7,
        ): allow
        for i in range(count - 1)
    }
    entries[PolicyKey(target, 5, 0, 8080)] = PolicyEntry(KernelVerdict.ALLOW, Reason.NONE, 1, 0)
    return entries


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connects", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    results: dict[str, list[int]] = {
        "no programs": [],
        "programs, 0 entries": [],
        "programs, 100k entries": [],
        "app -> pod IP (svc map)": [],
        "app -> VIP (svc map)": [],
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
            server = meshed.pod(0, 1).ip
            dp.apply_services(service_table(args.services, args.endpoints, server))
            meshed.pod(0, 0).python(SINK)
            measure(plain, 500)  # warm-up
            measure(meshed, 500)
            measure_app(meshed, 500, f"{server}:8080", f"{VIP}:80")
            for _ in range(args.repeats):
                results["no programs"] += measure(plain, args.connects)
                dp.apply_policy({}, {})
                results["programs, 0 entries"] += measure(meshed, args.connects)
                to_pod, to_vip = measure_app(meshed, args.connects, f"{server}:8080", f"{VIP}:80")
                results["app -> pod IP (svc map)"] += to_pod
                results["app -> VIP (svc map)"] += to_vip
                dp.apply_policy(big, {})
                results["programs, 100k entries"] += measure(meshed, args.connects)
        finally:
            dp.uninstall()
    base = summary(results["no programs"])
    report: dict[str, object] = {
        "cpu": platform.processor() or platform.machine(),
        "kernel": platform.release(),
        "connects_per_mode": len(results["no programs"]),
        "services": args.services,
        "endpoints_per_service": args.endpoints,
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
    vip = summary(results["app -> VIP (svc map)"])["p50_ns"]
    pod = summary(results["app -> pod IP (svc map)"])["p50_ns"]
    report["vip_vs_pod_ip_p50_ratio"] = vip / pod
    print(f"VIP vs pod IP connect (p50), {args.services} Services x {args.endpoints} endpoints: "
          f"{vip / pod:.2f}x (goal <= 1.1x)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
