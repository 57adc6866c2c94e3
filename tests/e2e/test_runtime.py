"""The agent runtime on the test bed: the demo end to end, and live policy file changes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prereq import require_root
from prometheus_client.parser import text_string_to_metric_families
from support.agents import live_mesh as live_agents

from agent.cli import main
from agent.commands.demo import (
    _run_client,
    http_get,
)
from agent.config import DEFAULT_PIN_ROOT
from agent.host import cgroup, netns
from agent.testbed import Cluster


def leftovers() -> dict[str, set[str]]:
    pins = set(os.listdir(DEFAULT_PIN_ROOT)) if DEFAULT_PIN_ROOT.exists() else set()
    return {"netns": set(netns.list_named()), "pins": {p for p in pins if p.startswith("demo-")},
            "cgroups": {d.name for d in cgroup.mount_point().iterdir() if d.is_dir()}}


def test_demo_passes_and_leaves_nothing_behind(capsys: pytest.CaptureFixture[str]) -> None:
    require_root()
    before = leftovers()
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "demo passed" in out
    assert "ENCRYPTED" in out
    results = re.findall(r"^\S+ -> \S+\s+(allowed|denied)\s", out, re.MULTILINE)
    assert results == ["allowed", "allowed", "denied", "denied", "denied", "allowed", "denied"]
    # Services: the VIP reaches the backend endpoint (which sees the frontend's pod address);
    # the db Service is refused by the db endpoint's policy, at connect (EPERM)
    assert re.search(r"^shop/frontend -> 10\.96\.0\.20:80\s+allowed\s+backend got \d+ bytes "
                     r"from 10\.251\.0\.10$", out, re.MULTILINE), out
    assert re.search(r"^tools/debug -> 10\.96\.0\.30:5432\s+denied\s+EPERM$", out,
                     re.MULTILINE), out
    after = leftovers()
    # Nothing new may remain (other runs on the machine may come and go meanwhile).
    assert all(after[k] <= before[k] for k in after), (before, after)


@pytest.fixture
def live_mesh(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Cluster, Path, Path]]:
    """Two agents on a two-node test bed, reading a mesh file the test may rewrite."""
    extra = tuple(getattr(request, "param", ()))
    with live_agents(tmp_path, "runtime test", extra=extra) as live:
        yield live.cluster, live.mesh, tmp_path


def until(c: Cluster, want: str, limit: float = 20.0) -> float:
    """Seconds until frontend->backend gives `want` (polled; the limit only stops a hang)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        out = _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x")
        if out.startswith(want):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"frontend->backend never became {want!r}; last: {out}")


def test_policy_file_changes_apply_and_a_broken_file_keeps_the_last_good_policy(
        live_mesh: tuple[Cluster, Path, Path]) -> None:
    c, mesh, work = live_mesh
    assert _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x").startswith("OK")
    good = mesh.read_text()
    # Drop the rule that lets frontend in: frontend -> backend becomes denied (EPERM).
    assert "backend-allow-frontend" in good
    denied = good.replace("name: backend-allow-frontend", "name: backend-allow-nobody").replace(
        '"cluster.local/ns/shop/sa/frontend"', '"cluster.local/ns/x/sa/y"')
    assert denied != good
    mesh.write_text(denied)
    took = until(c, "ERR EPERM")
    print(f"policy change enforced after {took:.2f}s")
    # A broken file: rejected with a logged error, the last good policy (deny) stays.
    mesh.write_text(denied + "\n---\nkind: AuthorizationPolicy\nbroken: [\n")
    time.sleep(1.5)
    assert _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x") == "ERR EPERM"
    log = (work / "agent-n0.log").read_text()
    assert "mesh.yaml" in log and "error" in log.lower()
    # Fixing the file restores the allow.
    mesh.write_text(good)
    until(c, "OK")


def _samples(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


class FlowFollower:
    """`nodemesh flows --follow --json` in a node netns, its records collected as they come."""

    def __init__(self, node: object) -> None:
        self.proc = node.spawn(  # type: ignore[attr-defined]
            [sys.executable, "-m", "agent.cli", "flows", "--follow", "--json",
             "--admin", "127.0.0.1:15000"], stdout=subprocess.PIPE, text=True)
        assert self.proc.popen is not None and self.proc.popen.stdout is not None
        stream = self.proc.popen.stdout
        self.records: list[dict[str, object]] = []
        self.reader = threading.Thread(
            target=lambda: self.records.extend(json.loads(x) for x in stream if x[:1] == "{"),
            daemon=True)
        self.reader.start()

    def closes_to_backend(self) -> int:
        return sum(1 for r in list(self.records) if r.get("kind") == "close"
                   and r.get("reporter") == "source"
                   and r["destination"]["workload"] == "backend")  # type: ignore[index]

    def stop(self) -> list[dict[str, object]]:
        assert self.proc.popen is not None
        self.proc.popen.terminate()
        self.reader.join(timeout=10)  # reads to EOF before the pipe is closed
        self.proc.stop()
        return list(self.records)


@pytest.mark.parametrize("live_mesh", [("--cert-ttl", "4")], indirect=True)
def test_metrics_flows_and_certificate_rotation_on_the_test_bed(
    live_mesh: tuple[Cluster, Path, Path],
) -> None:
    """Known traffic -> metrics equal the apps' byte counts, denies counted with reason and
    labels, `nodemesh flows --follow --json` shows the records, and 4 s certificates rotate
    repeatedly under a continuous stream of new connections without one failing."""
    c, _mesh, work = live_mesh
    node0 = c.nodes[0]
    follower = FlowFollower(node0)
    closes_seen = follower.closes_to_backend

    # The follower is subscribed once it shows a probe connection.
    probe_deadline = time.monotonic() + 30
    probes = 0
    while closes_seen() == 0 and time.monotonic() < probe_deadline:
        assert _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "probe").startswith("OK")
        probes += 1
        time.sleep(0.2)
    assert closes_seen() > 0, "nodemesh flows --follow never showed a connection"
    base = closes_seen()
    sent = received = n = 0
    failures = []
    deadline = time.monotonic() + 10  # several 4 s lifetimes: renewals at half-life
    while time.monotonic() < deadline:
        payload = "p" * (100 + n)
        out = _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, payload)
        if out.startswith("OK "):
            sent += len(payload)
            received += len(out[3:].encode())
        else:
            failures.append(out)
        n += 1
    assert not failures, failures
    assert _run_client(c.pod(0, 0), str(c.pod(1, 0).ip), 5432, "x") == "ERR EPERM"
    time.sleep(1.0)
    metrics = http_get(node0.netns, 15020, "/metrics")
    assert metrics is not None
    src = {"reporter": "source", "source_workload": "frontend", "destination_workload": "backend"}
    # Istio's meaning: "received" is the request (source -> destination), "sent" the response.
    probe_reply = len(f"backend got 5 bytes from {c.pod(0, 0).ip}")
    assert _samples(metrics, "istio_tcp_received_bytes_total", **src) == sent + probes * 5
    assert _samples(metrics, "istio_tcp_sent_bytes_total", **src) == received + probes * probe_reply
    assert _samples(metrics, "istio_tcp_connections_closed_total", **src) == n + probes
    deny = {"response_flags": "DENY", "source_workload": "frontend", "destination_workload": "db"}
    assert _samples(metrics, "istio_tcp_connections_failed_total", **deny) == 1
    rotations = _samples(metrics, "nodemesh_certificate_rotations_total",
                         identity="spiffe://cluster.local/ns/shop/sa/frontend")
    assert rotations >= 2
    # Every scrape-time reader answered with the labels its family declares.
    assert any(s.labels == {"ring": "flows"} for f in text_string_to_metric_families(metrics)
               if f.name == "nodemesh_ringbuf_drops" for s in f.samples)
    assert "at scrape time failed" not in (work / "agent-n0.log").read_text()
    seen_deadline = time.monotonic() + 30
    while closes_seen() - base < n and time.monotonic() < seen_deadline:
        time.sleep(0.1)
    assert closes_seen() - base == n  # every connection's record reached the follower
    records = follower.stop()
    assert any(r.get("kind") == "deny" and r["destination"]["workload"] == "db" for r in records)
