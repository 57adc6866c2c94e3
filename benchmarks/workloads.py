"""One measurement of one workload over one route; each returns a flat dict with `value` (the
headline number), `verified`, and the proxies' CPU seconds spent during the run."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks import programs
from benchmarks.bed import Bed, Route, cpu_seconds


@dataclass(frozen=True)
class Settings:
    reps: int = 3
    bulk_seconds: float = 5.0
    streams: int = 100
    streams_seconds: float = 5.0
    pingpongs: int = 5000
    connrate_seconds: float = 3.0
    integrity_bytes: int = 16 << 20
    policy_rules: int = 10_000
    policy_reps: int = 3
    scale_pods: int = 100
    scale_load_seconds: float = 5.0
    connect_cost_connects: int = 5000
    connect_cost_repeats: int = 3
    flow_events_rate: int = 200_000
    flow_events_seconds: float = 10.0
    # One pass of the paths section per count: agents with --workers N, Envoy --concurrency N.
    workers: tuple[int, ...] = (1, 2)
    profile_seconds: float = 0.0


TINY = Settings(
    reps=1, bulk_seconds=1, streams=8, streams_seconds=1, pingpongs=200, connrate_seconds=0.5,
    integrity_bytes=1 << 20, policy_rules=200, policy_reps=1, scale_pods=6,
    scale_load_seconds=0.5, connect_cost_connects=300, connect_cost_repeats=1,
    flow_events_rate=20_000, flow_events_seconds=1.0,  # a 2 s buffer: no timing in CI
    workers=(1,),
)
WARMUP = Settings(
    bulk_seconds=1, streams_seconds=1, pingpongs=500, connrate_seconds=0.5, integrity_bytes=1 << 20,
)

Measure = Callable[[Bed, Route, Settings], dict[str, Any]]


def iperf3(bed: Bed, route: Route, seconds: float, streams: int) -> dict[str, Any]:
    """iperf3 client in the route's client pod; throughput from the bytes the server received."""
    server = bed.iperf_server(route)
    argv = ["iperf3", "-c", route.ip, "-p", str(route.bulk_port), "-t", str(seconds), "-J",
            "--connect-timeout", "5000"]
    if streams > 1:
        argv += ["-P", str(streams)]
    proc = route.client.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.popen is not None
    try:
        out, _ = proc.popen.communicate(timeout=seconds + 60)
    finally:
        proc.stop()
        server.stop()
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        return {"value": 0.0, "verified": False, "error": out.decode()[-500:]}
    if "error" in report:
        return {"value": 0.0, "verified": False, "error": report["error"]}
    end = report["end"]
    sent, received = end["sum_sent"]["bytes"], end["sum_received"]["bytes"]
    per_stream = [s["receiver"]["bytes"] for s in end.get("streams", [])]
    return {
        "value": end["sum_received"]["bits_per_second"] / 1e9,
        "bytes_sent": sent,
        "bytes_received": received,
        "streams_with_data": sum(1 for b in per_stream if b > 0),
        # iperf3 stops counting at its end-of-test message, while a proxy may still hold bytes:
        # received <= sent always; equality is checked by the integrity transfer instead.
        "verified": 0 < received <= sent and sum(1 for b in per_stream if b > 0) == streams,
    }


def bulk(bed: Bed, route: Route, s: Settings) -> dict[str, Any]:
    cpu = cpu_seconds(route.proxies)
    r = iperf3(bed, route, s.bulk_seconds, 1)
    r["proxy_cpu_s"] = cpu_seconds(route.proxies) - cpu
    check = programs.run_json(
        route.client, programs.INTEGRITY, route.ip, str(route.echo_port), str(s.integrity_bytes)
    )
    r["integrity"] = check
    r["verified"] = r["verified"] and check["verified"]
    return r


def streams(bed: Bed, route: Route, s: Settings) -> dict[str, Any]:
    cpu = cpu_seconds(route.proxies)
    r = iperf3(bed, route, s.streams_seconds, s.streams)
    r["proxy_cpu_s"] = cpu_seconds(route.proxies) - cpu
    return r


def latency(bed: Bed, route: Route, s: Settings) -> dict[str, Any]:
    cpu = cpu_seconds(route.proxies)
    r = programs.run_json(
        route.client, programs.PINGPONG, route.ip, str(route.echo_port), str(s.pingpongs),
        str(max(50, s.pingpongs // 10)),
    )
    r["proxy_cpu_s"] = cpu_seconds(route.proxies) - cpu
    r["value"] = r["p50_us"]
    return r


def connrate(bed: Bed, route: Route, s: Settings) -> dict[str, Any]:
    cpu = cpu_seconds(route.proxies)
    r = programs.run_json(
        route.client, programs.CONNRATE, route.ip, str(route.echo_port), str(s.connrate_seconds)
    )
    r["proxy_cpu_s"] = cpu_seconds(route.proxies) - cpu
    r["value"] = r["conn_per_s"]
    return r


# name -> (measure, unit, higher is better)
WORKLOADS: dict[str, tuple[Measure, str, bool]] = {
    "bulk": (bulk, "Gbit/s", True),
    "streams": (streams, "Gbit/s", True),
    "latency": (latency, "us p50", False),
    "connrate": (connrate, "conn/s", True),
}
