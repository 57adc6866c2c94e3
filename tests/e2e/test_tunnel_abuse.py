"""The tunnel under attack (issue #20), with real agents: a hostile HBONE client in a pod that
is not in the mesh but holds a valid mesh certificate (issued from the test's CA root).

For each attack: the agent makes at most a bounded number of upstream connects, its fds and RSS
come back to their baseline, and a health probe and a normal pod-to-pod request through the
attacked agent succeed during the attack (their latencies are printed, not asserted).
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.agents import LiveMesh, live_mesh
from support.hostile_h2 import (
    HostileH2,
    client_context,
    idle_connections,
    ping_frame,
    priority_frame,
    settings_frame,
    zero_window_update_frame,
)

from agent.commands.demo import http_get
from agent.testbed import PodProcess
from ztunnel import podnet

ENHANCE_YOUR_CALM = 0xB
PAIRS = 10_000
# Upstream connects the rapid reset may cause at most: a pair split across two reads can start
# one before its RST arrives; 1% of the pairs is far above that and far below one per pair.
MAX_CONNECTS = PAIRS // 100
IDLE = 2000
RSS_SLACK = 20 * 1024 * 1024
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"  # allowed to backend:8080
# The header-block attack h2 allowed: 8 connections each buffering 63 x 1 MiB (502 MiB of RSS).
HEADER_CONNECTIONS = 8
HEADER_FRAMES = 63
# Control-frame floods: each connection sends up to FLOOD_FRAMES (the budget, 1,000 a second,
# ends it long before); the attacker reconnects for FLOOD_SECONDS so the probes see it going on.
FLOOD_FRAMES = 200_000
FLOOD_SECONDS = 3.0
FLOOD_CONNECTIONS = 40
# Unread PING ACKs: PINGs at half the control-frame budget, so the unread-ACK bound (64 KiB of
# ACKs, about 3,900) is what ends the connection, not the rate.
PING_BATCH = 50
PING_GAP = 0.1

# Counts its accepts (one line each) and answers like the demo's server.
COUNTING_SERVER = """
import socket, sys, threading
s = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=1024)
print("ready", flush=True)
def handle(c):
    with c:
        try:
            data = c.recv(65536)
            if data.startswith(b"bulk"):  # a download for the client that stops reading
                for _ in range(64):
                    c.sendall(bytes(1 << 20))
            c.sendall(b"backend got %d bytes" % len(data))
        except OSError:
            pass
while True:
    c, _ = s.accept()
    print("accept", flush=True)
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

# A normal captured client in a meshed pod, every `gap` seconds until stdin closes: one JSON
# line per request with its outcome and latency.
PROBER = """
import json, socket, sys, threading, time
ip, port, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
while not stop.is_set():
    t = time.perf_counter()
    try:
        with socket.create_connection((ip, port), timeout=10) as s:
            s.sendall(b"x"); s.shutdown(socket.SHUT_WR)
            ok = s.recv(100).startswith(b"db got")
    except OSError:
        ok = False
    print(json.dumps({"ok": ok, "ms": (time.perf_counter() - t) * 1000}), flush=True)
    stop.wait(gap)
"""


def rss(pid: int) -> int:
    """Resident bytes of the agent: its control process and its data-plane workers."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(p.memory_info().rss for p in procs)


def fds(pid: int) -> int:
    """Open descriptors of the agent: control process and workers."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(p.num_fds() for p in procs)


def own_fds(live: LiveMesh, pid: int) -> float:
    """The agent's descriptors less its pooled HBONE connections: with several workers the
    probes' requests land on whichever worker the kernel picks, and each worker keeps its own
    pooled connection (and spare) to the destination, which is not the attack's doing."""
    return fds(pid) - stat(live, 0, "pool_connections")


def fd_kinds(pid: int) -> dict[str, int]:
    """How many of the agent's fds are sockets, pipes, files... (for a failure message)."""
    kinds: dict[str, int] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        kind = target if target.startswith("anon_inode") else (
            target.split(":", 1)[0] if ":" in target else "file")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def warm(live: LiveMesh) -> None:
    """One round of the probes and a metrics scrape before a baseline is taken: the pooled HBONE
    connection (and its pre-warmed spare) and whatever a scrape opens once belong to the
    baseline, not to the attack."""
    stat(live, 0, "tunnel_handshakes_pending")
    with Probes(live) as probes:
        poll(lambda: len(probes.requests) >= 3 and len(probes.health) >= 3, "probes to run")
    time.sleep(1.0)


def stat(live: LiveMesh, node: int, name: str) -> float:
    text = http_get(live.cluster.nodes[node].netns, 15020, "/metrics")
    assert text is not None, "metrics endpoint did not answer"
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "nodemesh_tunnel_stat" and s.labels.get("name") == name:
                return float(s.value)
    raise AssertionError(f"nodemesh_tunnel_stat{{name={name!r}}} not exported")


def poll(check: object, what: str, limit: float = 60.0) -> float:
    """Seconds until check() is true (the limit only stops a hang)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if check():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {limit:.0f}s")


@dataclass
class Probes:
    """A pod-to-pod request through the attacked agent (backend -> db, cross-node) and a
    health probe of that agent, both repeated while an attack runs."""

    live: LiveMesh
    prober: PodProcess | None = None
    health: list[tuple[bool, float]] = field(default_factory=list)
    requests: list[tuple[bool, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _started: tuple[int, int] = (0, 0)  # results before the attack began

    def __enter__(self) -> Probes:
        c = self.live.cluster
        self.prober = c.pod(0, 1).python(PROBER, str(c.pod(1, 0).ip), "5432", "0.1",
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._threads = [threading.Thread(target=self._health, daemon=True),
                         threading.Thread(target=self._read, daemon=True)]
        for t in self._threads:
            t.start()
        # Both running before the attack starts (the prober's interpreter takes a while to
        # start; a short attack was otherwise over before its first request).
        poll(lambda: self.health and self.requests, "probes to start")
        self._started = (len(self.health), len(self.requests))
        return self

    def _health(self) -> None:
        ns = self.live.cluster.nodes[0].netns
        while not self._stop.is_set():
            t = time.perf_counter()
            body = http_get(ns, 15021, "/healthz/ready")
            self.health.append((body is not None, (time.perf_counter() - t) * 1000))
            self._stop.wait(0.1)

    def _read(self) -> None:
        assert self.prober is not None and self.prober.popen is not None
        assert self.prober.popen.stdout is not None
        for line in self.prober.popen.stdout:
            r = json.loads(line)
            self.requests.append((bool(r["ok"]), float(r["ms"])))

    def __exit__(self, *exc: object) -> None:
        # at least one of each started after the attack did
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self._during():
            time.sleep(0.05)
        self._stop.set()
        assert self.prober is not None and self.prober.popen is not None
        assert self.prober.popen.stdin is not None
        self.prober.popen.stdin.close()
        self.prober.wait(30)
        for t in self._threads:
            t.join(timeout=30)
        self.prober.stop()

    def _during(self) -> bool:
        return len(self.health) > self._started[0] and len(self.requests) > self._started[1]

    def report(self, attack: str) -> None:
        for what, xs in (("health probe", self.health), ("backend -> db", self.requests)):
            ms = sorted(m for _, m in xs)
            print(f"{attack}: {what}: {len(xs)} tries, {sum(ok for ok, _ in xs)} ok, "
                  f"latency ms p50 {ms[len(ms) // 2]:.1f} max {ms[-1]:.1f}" if ms else
                  f"{attack}: {what}: no tries")
        assert self.health and all(ok for ok, _ in self.health), self.health
        assert self.requests and all(ok for ok, _ in self.requests), self.requests
        assert self._during(), ("no probe after the attack began", self._started,
                                len(self.health), len(self.requests))


@dataclass
class Bed:
    live: LiveMesh
    accepts: list[int]  # [count] of the backend server's accepts
    ctx: ssl.SSLContext

    @property
    def backend(self) -> tuple[str, int]:
        return str(self.live.cluster.pod(0, 1).ip), 15008


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    work = tmp_path_factory.mktemp("abuse")
    with live_mesh(work, "pytest abuse", pods_per_node=3, servers=((1, 0, "db", "5432"),)) as live:
        c = live.cluster
        server = c.pod(0, 1).python(COUNTING_SERVER, "8080", stdout=subprocess.PIPE, text=True)
        assert server.popen is not None and server.popen.stdout is not None
        assert server.popen.stdout.readline().strip() == "ready"
        accepts = [0]
        stream = server.popen.stdout

        def count() -> None:
            for line in stream:
                if line.startswith("accept"):
                    accepts[0] += 1

        threading.Thread(target=count, daemon=True).start()
        try:
            yield Bed(live, accepts, client_context(work / "ca", FRONTEND, work))
        finally:
            server.stop()


def rapid_reset(bed: Bed) -> tuple[HostileH2, int]:
    c = bed.live.cluster
    ip, port = bed.backend
    # From node1's pod 2: in no Workload, so not enrolled and not captured.
    h = HostileH2(c.pod(1, 2).socket, bed.ctx, (ip, port))
    return h, h.rapid_reset(f"{ip}:8080", PAIRS)


def test_rapid_reset_makes_a_bounded_number_of_upstream_connects(bed: Bed) -> None:
    agent = bed.live.agents[0].pid
    warm(bed.live)
    base_fds, base_kinds = own_fds(bed.live, agent), fd_kinds(agent)
    before = bed.accepts[0]
    with Probes(bed.live) as probes:
        h, sent = rapid_reset(bed)
        h.wait_end(5)  # whatever the server says back
        h.close()
    connects = bed.accepts[0] - before
    skipped = stat(bed.live, 0, "tunnel_streams_reset_before_connect")
    print(f"rapid reset: {sent} pairs sent, {connects} upstream connects, {skipped:.0f} streams "
          f"dropped before any connect, goaway {h.seen.goaway_codes}, fds {base_fds} -> "
          f"{fds(agent)}")
    probes.report("rapid reset")
    assert sent > 0
    assert connects <= MAX_CONNECTS, connects
    # Two defences, either enough: the reset-rate budget ends the connection (GOAWAY
    # ENHANCE_YOUR_CALM) before most streams reach the tunnel, and a stream reset before its
    # upstream connect gets none.
    assert ENHANCE_YOUR_CALM in h.seen.goaway_codes or skipped >= sent - MAX_CONNECTS, (
        skipped, sent, h.seen.goaway_codes)
    took = poll(lambda: own_fds(bed.live, agent) <= base_fds,
                f"agent fds back to {base_fds} {base_kinds} (now {fd_kinds(agent)})")
    print(f"rapid reset: fds back to baseline after {took:.1f}s")


def test_rapid_reset_is_answered_with_goaway_enhance_your_calm(bed: Bed) -> None:
    h, sent = rapid_reset(bed)
    try:
        assert h.wait_end(30), "the server kept the abusive connection open"
        assert ENHANCE_YOUR_CALM in h.seen.goaway_codes, h.seen
    finally:
        h.close()
    print(f"rapid reset: connection ended after {sent} pairs with GOAWAY "
          f"{h.seen.goaway_codes}")


def test_idle_handshake_flood_is_capped_and_its_memory_returned(bed: Bed) -> None:
    live = bed.live
    agent = live.agents[0].pid
    warm(live)
    base_rss, base_fds = rss(agent), own_fds(live, agent)
    refused_before = stat(live, 0, "tunnel_handshakes_refused_per_ip")
    with Probes(live) as probes:
        socks = idle_connections(live.cluster.pod(1, 2).socket, bed.backend, IDLE)
        try:
            peak_pending = stat(live, 0, "tunnel_handshakes_pending")
            poll(lambda: stat(live, 0, "tunnel_handshakes_refused_per_ip") > refused_before,
                 "per-IP handshake refusals counted")
            peak_rss = rss(agent)
            # The admitted ones time out (handshake_timeout, 10 s) while the client still
            # holds every socket: the agent must give back what they held.
            took_fds = poll(lambda: own_fds(live, agent) <= base_fds + 2,
                            f"agent fds back to {base_fds}")
            took_rss = poll(lambda: rss(agent) <= base_rss + RSS_SLACK,
                            f"agent RSS back within 20 MiB of {base_rss >> 20} MiB")
        finally:
            for s in socks:
                s.close()
    refused = stat(live, 0, "tunnel_handshakes_refused_per_ip") - refused_before
    print(f"handshake flood: {len(socks)} idle connections, {refused:.0f} reset at accept, "
          f"pending at most {peak_pending:.0f} seen; RSS {base_rss >> 20} -> {peak_rss >> 20} "
          f"MiB, back after {took_rss:.1f}s; fds {base_fds}, back after {took_fds:.1f}s")
    probes.report("handshake flood")
    assert peak_pending <= 64
    assert refused >= len(socks) - 64 * 4, refused  # the cap holds; a few slots free up meanwhile


def rss_back(agent: int, base: int) -> float:
    return poll(lambda: rss(agent) <= base + RSS_SLACK,
                f"agent RSS back within 20 MiB of {base >> 20} MiB (now {rss(agent) >> 20} MiB)")


def test_header_block_flood_is_cut_at_the_budget(bed: Bed) -> None:
    """HEADERS without END_HEADERS, then CONTINUATION frames of 1 MiB on 8 connections at
    once: each is ended with GOAWAY ENHANCE_YOUR_CALM at the first frame header past 64 KiB,
    before its payload is buffered; no upstream connect, RSS stays within 20 MiB."""
    live = bed.live
    agent = live.agents[0].pid
    ip, _ = bed.backend
    warm(live)
    base_rss = rss(agent)
    trips_before = stat(live, 0, "hbone_budget_trips_header_block")
    before = bed.accepts[0]
    sent: dict[int, int] = {}
    with Probes(live) as probes:
        conns = [HostileH2(live.cluster.pod(1, 2).socket, bed.ctx, bed.backend)
                 for _ in range(HEADER_CONNECTIONS)]

        def attack(i: int) -> None:
            sent[i] = conns[i].header_flood(f"{ip}:8080", HEADER_FRAMES)
            conns[i].wait_end(30)

        threads = [threading.Thread(target=attack, args=(i,), daemon=True)
                   for i in range(len(conns))]
        for t in threads:
            t.start()
        peak_rss = base_rss
        while any(t.is_alive() for t in threads):
            peak_rss = max(peak_rss, rss(agent))
            time.sleep(0.1)
        for h in conns:
            h.close()
    took = rss_back(agent, base_rss)
    poll(lambda: stat(live, 0, "hbone_budget_trips_header_block") >= trips_before + len(conns),
         "header_block trips counted")
    connects = bed.accepts[0] - before
    print(f"header-block flood: {len(conns)} connections aiming at {HEADER_FRAMES} x 1 MiB "
          f"each, sent {sorted(sent.values())} CONTINUATION bytes before the close, goaway "
          f"{[h.seen.goaway_codes for h in conns]}, {connects} upstream connects; RSS "
          f"{base_rss >> 20} -> peak {peak_rss >> 20} MiB, within 20 MiB after {took:.1f}s")
    probes.report("header-block flood")
    for h in conns:
        assert h.seen.ended, h.seen
        assert ENHANCE_YOUR_CALM in h.seen.goaway_codes, h.seen
    assert connects == 0, connects


def _open_closed_stream(bed: Bed, h: HostileH2) -> None:
    """Stream 1 opened and finished (a GET, refused at once: no upstream connect), so
    WINDOW_UPDATEs on it are legal (a closed stream) and cost only the server's work."""
    ip, _ = bed.backend
    assert h.request(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                         (":authority", f"{ip}:8080")], end_stream=True), h.seen


FLOODS: dict[str, tuple[Callable[[], bytes], Callable[[Bed, HostileH2], None] | None]] = {
    "settings": (settings_frame, None),
    "ping": (ping_frame, None),
    "zero_window_update": (lambda: zero_window_update_frame(1), _open_closed_stream),
    "priority": (lambda: priority_frame(3), None),
}


@pytest.mark.parametrize("kind", list(FLOODS))
def test_control_frame_flood_is_answered_with_enhance_your_calm(bed: Bed, kind: str) -> None:
    """One control frame as fast as the socket takes it, reconnecting for a few seconds: every
    connection ends with GOAWAY ENHANCE_YOUR_CALM after about a second's budget of frames,
    each trip is counted, the agent keeps answering probes and requests meanwhile."""
    live = bed.live
    agent = live.agents[0].pid
    make, prepare = FLOODS[kind]
    frame = make()
    warm(live)
    base_rss = rss(agent)
    trips_before = stat(live, 0, "hbone_budget_trips_control_frame_rate")
    before = bed.accepts[0]
    conns: list[tuple[HostileH2, int]] = []
    with Probes(live) as probes:
        deadline = time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < deadline and len(conns) < FLOOD_CONNECTIONS:
            h = HostileH2(live.cluster.pod(1, 2).socket, bed.ctx, bed.backend)
            try:
                if prepare is not None:
                    prepare(bed, h)
                conns.append((h, h.flood(frame, FLOOD_FRAMES)))
                h.wait_end(30)
            finally:
                h.close()
    took = poll(lambda: stat(live, 0, "hbone_budget_trips_control_frame_rate")
                >= trips_before + len(conns), "control_frame_rate trips counted")
    trips = stat(live, 0, "hbone_budget_trips_control_frame_rate") - trips_before
    took_rss = rss_back(agent, base_rss)
    connects = bed.accepts[0] - before
    per_conn = sorted(n for _, n in conns)
    print(f"{kind} flood: {len(conns)} connections, frames sent before each close: min "
          f"{per_conn[0]} median {per_conn[len(per_conn) // 2]} max {per_conn[-1]}; "
          f"{trips:.0f} control_frame_rate trips (counted after {took:.1f}s), {connects} "
          f"upstream connects, RSS within 20 MiB after {took_rss:.1f}s")
    probes.report(f"{kind} flood")
    for h, _ in conns:
        assert h.seen.ended, h.seen
        assert ENHANCE_YOUR_CALM in h.seen.goaway_codes, h.seen
    assert trips >= len(conns), (trips, len(conns))
    assert connects == 0, connects


def test_unread_ping_acks_are_bounded(bed: Bed) -> None:
    """A client that stops reading (small SO_RCVBUF): a download fills the agent's write
    buffer until its write side blocks, then every PING's ACK queues behind it. The agent
    counts those ACK bytes and ends the connection at 64 KiB (GOAWAY ENHANCE_YOUR_CALM,
    unread_control trip) instead of queueing without bound; its memory comes back."""
    live = bed.live
    agent = live.agents[0].pid
    ip, _ = bed.backend
    warm(live)
    base_rss = rss(agent)
    trips_before = stat(live, 0, "hbone_budget_trips_unread_control")
    before = bed.accepts[0]
    pings = ping_frame() * PING_BATCH
    sent = 0
    with Probes(live) as probes:
        h = HostileH2(live.cluster.pod(1, 2).socket, bed.ctx, bed.backend, rcvbuf=4096,
                      window=1 << 30)
        try:
            assert h.request(1, [(":method", "CONNECT"), (":authority", f"{ip}:8080")]), h.seen
            assert h.data(1, b"bulk"), h.seen
            # From here on nothing is read until the agent has given up on the connection.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if sent % (PING_BATCH * 10) == 0 and stat(
                        live, 0, "hbone_budget_trips_unread_control") > trips_before:
                    break
                if not h.send_unread(pings):
                    break  # the agent closed and stopped reading
                sent += PING_BATCH
                time.sleep(PING_GAP)
            peak_rss = rss(agent)
            poll(lambda: stat(live, 0, "hbone_budget_trips_unread_control") > trips_before,
                 "unread_control trip counted")
            h.wait_end(60)  # now read: the download, the ACKs queued before the trip, GOAWAY
        finally:
            h.close()
    took = rss_back(agent, base_rss)
    connects = bed.accepts[0] - before
    print(f"unread PING ACKs: {sent} PINGs sent unread, goaway {h.seen.goaway_codes}, "
          f"{h.seen.frames} frames read afterwards, {connects} upstream connects; RSS "
          f"{base_rss >> 20} -> {peak_rss >> 20} MiB, within 20 MiB after {took:.1f}s")
    probes.report("unread PING ACKs")
    assert h.seen.ended, h.seen
    assert ENHANCE_YOUR_CALM in h.seen.goaway_codes, h.seen
    assert connects <= 1, connects  # the download's


def test_accepted_sockets_inherit_the_listeners_tunnel_mark(bed: Bed) -> None:
    """The accept loop does not set TUNNEL_MARK again: the kernel copies the listener's mark
    into each accepted socket (with tcp_fwmark_accept on, as prepare_pod_netns sets it)."""
    pod = bed.live.cluster.pod(0, 0)
    lsock = podnet.listener(pod.netns, "127.0.0.1", 0)
    with lsock, pod.socket() as client:
        client.connect(lsock.getsockname())
        lsock.setblocking(True)
        conn, _ = lsock.accept()
        with conn:
            mark = struct.unpack("I", conn.getsockopt(socket.SOL_SOCKET, socket.SO_MARK, 4))[0]
    assert mark == podnet.TUNNEL_MARK, hex(mark)
