"""Same-node bypass with real agents (issue #13): two pods of node0 talk socket to socket when
policy allows, with the switch on (the default) and off; either way the traffic works, is
recorded once, and the STRICT destination only accepts the identity its policy allows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.agents import live_mesh

from agent.commands.demo import EXAMPLE, _run_client, http_get
from agent.datapath.bypass import BypassCounter
from agent.datapath.datapath import Datapath
from agent.datapath.options import BuildOptions

# A third workload on node0 (test-bed pod 2) that no policy lets reach the backend.
PROBE = """
---
kind: Workload
metadata:
  name: probe
  namespace: tools
  labels: {app: probe}
spec:
  ips: [10.251.0.12]
  node: node0
"""


def _records(path: Path, want: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 30
    recs: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        recs = [json.loads(x) for x in lines]
        if len([r for r in recs if r["kind"] in ("close", "deny")]) >= want:
            break
        time.sleep(0.1)
    return recs


@pytest.mark.parametrize("switch", ["on", "off"])
def test_same_node_traffic_with_the_bypass(tmp_path: Path, switch: str) -> None:
    with live_mesh(tmp_path, f"pytest bypass {switch}", mesh_text=EXAMPLE.read_text() + PROBE,
                   pods_per_node=3, extra=["--same-node-bypass", switch]) as live:
        c = live.cluster
        frontend, backend, probe = c.pod(0, 0), c.pod(0, 1), c.pod(0, 2)
        assert _run_client(frontend, str(backend.ip), 8080, "direct").startswith("OK backend")
        # through the Service VIP too (connect4 picks the endpoint, then bypasses to it)
        assert _run_client(frontend, "10.96.0.20", 80, "vip").startswith("OK backend")
        # STRICT shop/backend: an identity its policy does not allow is refused at connect
        assert _run_client(probe, str(backend.ip), 8080, "x") == "ERR EPERM"
        dp = Datapath(c.nodes[0].cgroup_root, BuildOptions(pin_dir=live.pins[0]))
        dp.open_pins()
        counts = dp.bypass_counters()
        assert counts[BypassCounter.CONNECTS] == (2 if switch == "on" else 0), counts
        # the same counters, as the agent exports them
        metrics = http_get(c.nodes[0].netns, 15020, "/metrics")
        assert metrics is not None
        exported = {s.labels["event"]: s.value for fam in text_string_to_metric_families(metrics)
                    for s in fam.samples if s.name == "nodemesh_same_node_bypass_total"}
        assert exported == {k.name.lower(): float(n) for k, n in counts.items()}, exported
        recs = _records(tmp_path / "flows-n0.log", want=3)
        closes = [r for r in recs if r["kind"] == "close"
                  and r["destination"]["workload"] == "backend"]  # type: ignore[index]
        # recorded once per connection: bypassed, by the source only; else both tunnel sides
        reporters = sorted(str(r["reporter"]) for r in closes)
        if switch == "on":
            assert reporters == ["source", "source"], closes
            assert all(r["tunneled"] is False for r in closes), closes
        else:
            assert reporters == ["destination", "destination", "source", "source"], closes
            assert all(r["tunneled"] is True for r in closes), closes
        for r in closes:
            assert r["source"]["workload"] == "frontend"  # type: ignore[index]
            assert r["source"]["principal"] == "spiffe://cluster.local/ns/shop/sa/frontend"  # type: ignore[index]
            assert r["bytes_sent"] > 0 and r["bytes_received"] > 0, r  # type: ignore[operator]
        assert sorted(str(r["service_address"]) for r in closes if r["reporter"] == "source") == [
            "", "10.96.0.20:80"]
        denies = [r for r in recs if r["kind"] == "deny"]
        assert [(d["source"]["workload"], d["destination"]["workload"]) for d in denies] == [  # type: ignore[index]
            ("probe", "backend")], denies
