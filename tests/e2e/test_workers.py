"""Data-plane worker processes under real `nodemesh run` agents (issue #13, issue #20).

The same-node bypass is off so frontend -> backend goes through the tunnel (outbound 15001,
HBONE 15008) and shop is PERMISSIVE so plaintext from node1's host netns reaches frontend through
sk_lookup and 15006. Every listener exists once per worker with SO_REUSEPORT: the kernel spreads
connections, the control process sums what the workers report, restarts one that dies, and keeps
answering health and metrics while the data plane is stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.agents import live_mesh

import ztunnel
from agent.commands.demo import CLIENT, EXAMPLE, _run_client, http_get
from agent.testbed import Cluster, PodProcess

WAIT = 60.0
PERMISSIVE = EXAMPLE.read_text().replace("mode: STRICT", "mode: PERMISSIVE")
FRONTEND = (0, 0, "frontend", "8080")
# backend:8080: "stream" gets an endless trickle (a transfer in flight), anything else one answer.
STREAM_SERVER = """
import socket, sys, threading, time
s = socket.create_server(("0.0.0.0", 8080))
print("ready", flush=True)
def handle(c, peer):
    with c:
        data = c.recv(65536)
        if not data.startswith(b"stream"):
            c.sendall(f"backend got {len(data)} bytes from {peer[0]}".encode())
            return
        try:
            while True:
                c.sendall(b"." * 1024)
                time.sleep(0.05)
        except OSError:
            pass
while True:
    c, peer = s.accept()
    threading.Thread(target=handle, args=(c, peer), daemon=True).start()
"""
# Reads the trickle: "ALIVE" if it still flows after `seconds`, else how it ended.
STREAM_CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 8080), timeout=8)
s.sendall(b"stream")
first = s.recv(65536)
print("FLOWING" if first else "EOF", flush=True)
end = time.monotonic() + float(sys.argv[2])
try:
    while time.monotonic() < end:
        if not s.recv(65536):
            print("EOF", flush=True); break
    else:
        print("ALIVE", flush=True)
except ConnectionResetError:
    print("RESET", flush=True)
except TimeoutError:
    print("STALL", flush=True)
"""


def metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def per_worker(text: str) -> dict[str, float]:
    return {s.labels["worker"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "nodemesh_worker_connections_total"}


def scrape(c: Cluster, node: int = 0) -> str:
    text = http_get(c.nodes[node].netns, 15020, "/metrics")
    assert text is not None, "no /metrics answer"
    return text


def workers_of(c: Cluster, node: int = 0) -> dict[str, int]:
    dump = http_get(c.nodes[node].netns, 15000, "/config_dump")
    assert dump is not None
    pids: dict[str, int] = json.loads(dump)["workers"]["pids"]
    return pids


def both_paths_carry(c: Cluster, rounds: int = 10) -> None:
    """New connections through both sides of the tunnel, and plaintext through sk_lookup."""
    for _ in range(rounds):
        assert _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x").startswith(
            "OK backend")
        assert plaintext(c).startswith("OK frontend")


def agent_log_lines(tmp_path: Path, needle: str) -> list[str]:
    """node0's agent log lines that contain `needle`."""
    log = (tmp_path / "agent-n0.log").read_text()
    return [line for line in log.splitlines() if needle in line]


def plaintext(c: Cluster) -> str:
    """One plaintext request from node1's host netns (outside the mesh) to frontend:8080."""
    cli = c.nodes[1].python(CLIENT, str(c.pod(0, 0).ip), "8080", "plain", stdout=subprocess.PIPE)
    assert cli.popen is not None
    out, _ = cli.popen.communicate(timeout=30)
    return out.decode().strip()


def eventually(check: object, what: str, limit: float = WAIT) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"never: {what}")


@contextmanager
def mesh(tmp_path: Path, workers: int) -> Iterator[Cluster]:
    with live_mesh(tmp_path, f"pytest workers {workers}", mesh_text=PERMISSIVE,
                   servers=(FRONTEND,), extra=("--workers", str(workers),
                                               "--same-node-bypass", "off")) as live:
        c = live.cluster
        server = c.pod(0, 1).python(STREAM_SERVER, stdout=subprocess.PIPE)
        assert server.popen is not None and server.popen.stdout is not None
        server.popen.stdout.readline()
        yield c


def test_connections_spread_over_workers_and_metrics_are_sums(tmp_path: Path) -> None:
    with mesh(tmp_path, 2) as c:
        assert len(workers_of(c)) == 2
        n, m = 30, 6
        for _ in range(n):
            out = _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x")
            assert out.startswith("OK backend got 1 bytes"), out
        for _ in range(m):
            assert plaintext(c).startswith("OK frontend got 5 bytes"), "plaintext refused"
        src = {"reporter": "source", "source_workload": "frontend",
               "destination_workload": "backend"}
        # Each tunnelled connection is one outbound and one inbound HBONE connection, each
        # handled by whichever worker the kernel picked; plaintext is one more.
        deadline = time.monotonic() + WAIT
        while True:
            text = scrape(c)
            got = (sum(per_worker(text).values()),
                   metric(text, "nodemesh_hbone_streams_opened_total"))
            if got == (2 * n + m, n) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got == (2 * n + m, n), (got, per_worker(text))
        counts = per_worker(text)
        print(f"connections per worker: {counts}")
        assert set(counts) == {"0", "1"} and all(v > 0 for v in counts.values()), counts
        assert metric(text, "istio_tcp_connections_closed_total", **src) == n
        assert metric(text, "nodemesh_workers") == 2
        assert metric(text, "nodemesh_worker_restarts_total") == 0
        assert all(v > 0 for v in (metric(text, "nodemesh_worker_resident_bytes", worker=w)
                                   for w in ("0", "1")))
        # The control process's telemetry caches: a few shapes for one pair of workloads,
        # nothing dropped.
        for cache in ("flow_shapes", "metric_children", "event_identities", "event_addresses"):
            assert metric(text, "nodemesh_telemetry_cache_entries", cache=cache) >= 1, cache
            assert metric(text, "nodemesh_telemetry_cache_evictions_total", cache=cache) == 0
        # The agent says what its data path runs, as this installation has it.
        dump = http_get(c.nodes[0].netns, 15000, "/config_dump")
        assert dump is not None
        build = json.loads(dump)["build"]
        assert build["data_path"] == ztunnel.data_path(), build
        assert build["compiled"] == ztunnel.compiled_modules(), build
        label = "yes" if build["compiled"] else "no"
        assert metric(text, "nodemesh_build_info", compiled=label) == 1, label


def start_streams(c: Cluster, count: int, seconds: float) -> list[PodProcess]:
    clients = []
    for _ in range(count):
        p = c.pod(0, 0).python(STREAM_CLIENT, str(c.pod(0, 1).ip), str(seconds),
                               stdout=subprocess.PIPE, text=True)
        assert p.popen is not None and p.popen.stdout is not None
        assert p.popen.stdout.readline().strip() == "FLOWING"
        clients.append(p)
    return clients


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_worker_fails_its_connections_and_is_restarted(
        tmp_path: Path, workers: int) -> None:
    with mesh(tmp_path, workers) as c:
        clients = start_streams(c, 6, 20.0)
        pids = workers_of(c)
        os.kill(pids["0"], signal.SIGKILL)
        endings = []
        for p in clients:
            assert p.popen is not None
            out, _ = p.popen.communicate(timeout=60)  # bounded: a hang fails here
            endings.append(out.strip())
        print(f"{workers} worker(s), streams after SIGKILL of worker 0: {endings}")
        # Worker 0 carried at least one side of some of them: those failed at once (reset or
        # EOF, never a stall); the others (workers=2) kept flowing.
        assert all(e in ("EOF", "RESET", "ALIVE") for e in endings), endings
        assert any(e in ("EOF", "RESET") for e in endings), endings
        if workers == 1:
            assert "ALIVE" not in endings, endings
        eventually(lambda: workers_of(c).get("0") not in (None, pids["0"]), "worker 0 back")
        eventually(lambda: metric(scrape(c), "nodemesh_worker_restarts_total") == 1,
                   "the restart counted")
        # New connections through both sides of the tunnel and plaintext through sk_lookup.
        eventually(lambda: _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x").startswith(
            "OK backend"), "frontend -> backend after the restart")
        eventually(lambda: plaintext(c).startswith("OK frontend"), "plaintext after the restart")
        both_paths_carry(c)
        died = agent_log_lines(tmp_path, "killed by SIGKILL")
        assert len(died) == 1, died
        assert f"pid {pids['0']}" in died[0]


def test_health_and_metrics_answer_while_the_data_plane_is_stopped(tmp_path: Path) -> None:
    with mesh(tmp_path, 2) as c:
        assert _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x").startswith("OK")
        pids = list(workers_of(c).values())
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(5):
                ready = http_get(c.nodes[0].netns, 15021, "/healthz/ready")
                assert ready is not None and ready.strip() == "ready", ready
                text = scrape(c)
                assert metric(text, "nodemesh_workers") == 2
                time.sleep(0.2)
            # Mesh traffic waits for the stopped workers (it is not served by control).
            assert workers_of(c) == {str(i): p for i, p in enumerate(pids)}
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x").startswith("OK")
        assert metric(scrape(c), "nodemesh_worker_restarts_total") == 0


def test_with_no_worker_running_the_agent_is_unready_until_one_is_back(tmp_path: Path) -> None:
    """A crash loop: the only worker is killed each time it comes back, so its restart backoff
    grows; while no worker runs, /healthz/ready answers 503 with the reason (a surge upgrade or
    an operator must not take this node's data plane for ready); once the loop ends a worker is
    back, and ready means it has its pods' listeners again: the first connections go through."""
    with mesh(tmp_path, 1) as c:
        killed: set[int] = set()
        down: str | None = None
        deadline = time.monotonic() + WAIT
        while down is None and time.monotonic() < deadline:
            pid = workers_of(c).get("0")
            if pid is not None and pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            answer = http_get(c.nodes[0].netns, 15021, "/healthz/ready")
            if answer is not None and "no data-plane worker running" in answer:
                down = answer
            time.sleep(0.05)
        assert down is not None, f"never unready; workers killed: {len(killed)}"
        print(f"after {len(killed)} kills: {down.strip()}")
        eventually(lambda: (http_get(c.nodes[0].netns, 15021, "/healthz/ready") or "").strip()
                   == "ready", "ready again with the worker back")
        assert workers_of(c).get("0") not in (None, *killed)
        both_paths_carry(c, rounds=1)
        assert metric(scrape(c), "nodemesh_worker_restarts_total") >= len(killed)


def test_a_stopped_worker_is_killed_by_the_watchdog_and_replaced(tmp_path: Path) -> None:
    """A worker that stops answering (SIGSTOP here; a loop that never yields alike) holds every
    new pod's enrollment and stalls its connections: the watchdog kills it after 15 s of
    silence, it is restarted, and traffic goes through both workers again."""
    with mesh(tmp_path, 2) as c:
        pids = workers_of(c)
        os.kill(pids["1"], signal.SIGSTOP)
        try:
            eventually(lambda: workers_of(c).get("1") not in (None, pids["1"]),
                       "worker 1 replaced")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids["1"], signal.SIGCONT)
        text = scrape(c)
        assert metric(text, "nodemesh_worker_watchdog_kills_total") == 1
        assert metric(text, "nodemesh_worker_restarts_total") == 1
        assert workers_of(c)["0"] == pids["0"]
        both_paths_carry(c)
        stuck = agent_log_lines(tmp_path, "did not answer")
        assert len(stuck) == 1 and f"pid {pids['1']}" in stuck[0], stuck
