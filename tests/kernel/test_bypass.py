"""Same-node bypass in the real kernel: an allowed connect between two pods enrolled on this
node goes socket to socket (connect4 leaves it direct, sk_lookup lets its SYN through on the
strength of a kernel-recorded tuple, sk_msg moves the bytes); a denied one is EPERM; with the
switch off, or with no tunnel serving the destination (agent down), the old path (the in-pod
tunnel on 15001) is taken."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator

import pytest
from peers import CLIENT, FAKE_TUNNEL, SERVER

from agent.datapath import bypass
from agent.datapath.bypass import BypassCounter
from agent.datapath.datapath import Datapath
from agent.datapath.layouts import FlowEvent, PolicyEntry, PolicyKey
from agent.datapath.verdicts import KernelEventKind, KernelVerdict, Reason
from agent.testbed import Cluster, PodProcess

A_ID, B_ID = 200, 201

# Connect, wait for the server side to be established (so the first send is redirected, not
# pinned to TCP), send, read the reply, then hold the socket open until stdin closes so the
# test can see the live bypass entry; reports peer, local address and reply.
HOLDING_CLIENT = """
import json, socket, sys, time
ip, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket()
s.settimeout(10)
s.connect((ip, port))
time.sleep(0.3)
s.sendall(payload)
data = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    data += d
me, peer = s.getsockname(), s.getpeername()
print(json.dumps({"peer": f"{peer[0]}:{peer[1]}", "me": f"{me[0]}:{me[1]}",
                  "reply": data.decode()}), flush=True)
sys.stdin.read()
s.close()
"""


# An echo server and a client that pushes `size` seeded random bytes through it (after the
# server side is established) and compares SHA-256 of what went and what came back; it holds
# the socket open until stdin closes.
ECHO = """
import socket, sys, threading
if sys.argv[2:] == ["dual-stack"]:  # [::] taking IPv4 clients on IPv4-mapped AF_INET6 sockets
    s = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6,
                             dualstack_ipv6=True)
else:
    s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
def serve(c):
    while d := c.recv(1 << 16):
        c.sendall(d)
    c.close()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
PUSH = """
import hashlib, json, random, socket, sys, threading, time
ip, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(size).randbytes(size)
s = socket.create_connection((ip, port), timeout=20)
time.sleep(0.3)
t = threading.Thread(target=s.sendall, args=(data,))
t.start()
h, n = hashlib.sha256(), 0
while n < size and (chunk := s.recv(1 << 20)):
    h.update(chunk); n += len(chunk)
t.join()
print(json.dumps({"echoed": n, "same": h.digest() == hashlib.sha256(data).digest()}), flush=True)
sys.stdin.read()
s.close()
"""


def run_json(proc: PodProcess) -> dict[str, str]:
    assert proc.popen is not None
    out, _ = proc.popen.communicate(timeout=20)
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def ready(proc: PodProcess) -> PodProcess:
    assert proc.popen is not None and proc.popen.stdout is not None
    assert proc.popen.stdout.readline().strip() == b"ready"
    return proc


@pytest.fixture(scope="module")
def server_b(kcluster: Cluster) -> Iterator[None]:
    proc = ready(kcluster.pod(0, 1).python(SERVER, "p1", "8080", stdout=subprocess.PIPE))
    yield
    proc.stop()


@pytest.fixture
def inbound_b(kcluster: Cluster, clean_policy: Datapath) -> Iterator[socket.socket]:
    """b's tunnel inbound listener (127.0.0.1:15006 in b), registered as the agent does."""
    b = kcluster.pod(0, 1)
    with b.socket() as lst:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", 15006))
        lst.listen(16)
        lst.settimeout(10)
        clean_policy.set_inbound_listener(b.ip, lst)
        yield lst
        clean_policy.remove_inbound_listener(b.ip)


@pytest.fixture
def bypass_on(kcluster: Cluster, clean_policy: Datapath,
              inbound_b: socket.socket) -> Iterator[Datapath]:
    """Switch on; a and b enrolled; b's tunnel listener registered (the agent serving b) but
    never accepting a bypassed connection, and nothing listening on 15001 in a: only the bypass
    can carry a connection from a to b."""
    a, b = kcluster.pod(0, 0), kcluster.pod(0, 1)
    clean_policy.set_same_node_bypass(True)
    clean_policy.enroll(a.netns, A_ID, a.ip)
    clean_policy.enroll(b.netns, B_ID, b.ip)
    yield clean_policy
    inbound_b.setblocking(False)
    with pytest.raises(BlockingIOError):
        inbound_b.accept()  # nothing is left waiting for the tunnel
    clean_policy.set_same_node_bypass(False)


def _events(dp: Datapath) -> list[FlowEvent]:
    events: list[FlowEvent] = []
    dp.open_events(events.append)
    dp.drain_events()
    events.clear()
    return events


def test_same_node_allowed_connect_goes_socket_to_socket(
    kcluster: Cluster, bypass_on: Datapath, server_b: None
) -> None:
    a, b = kcluster.pod(0, 0), kcluster.pod(0, 1)
    cookie = a.cookie()
    assert bypass.enabled(bypass_on.module)
    allow = PolicyEntry(KernelVerdict.ALLOW, policy=3, rule=1)
    bypass_on.apply_policy({PolicyKey(b.ip, A_ID, 0, 8080): allow}, {})
    events = _events(bypass_on)
    before = bypass_on.bypass_counters()
    payload = "z" * 3000
    proc = a.python(HOLDING_CLIENT, str(b.ip), "8080", payload, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE)
    assert proc.popen is not None and proc.popen.stdout is not None
    out = json.loads(proc.popen.stdout.readline())
    sport = int(out["me"].split(":")[1])
    # the app's views: its real peer and its pod address; the server saw the pod's address
    assert out["peer"] == f"{b.ip}:8080"
    assert out["me"] == f"{a.ip}:{sport}"
    assert out["reply"] == f"p1|{b.ip}:8080|{a.ip}:{sport}|{payload}"
    live = bypass.live(bypass_on.module)
    [(key, (_owner, c2s, s2c))] = list(live.items())
    assert (key.src, key.dst, key.src_port, key.dst_port) == (a.ip, b.ip, sport, 8080)
    # the bytes went by sk_msg redirect, both ways (TCP's counters never see them)
    assert (c2s, s2c) == (len(payload), len(out["reply"]))
    proc.popen.stdin.close()  # type: ignore[union-attr]
    proc.popen.wait(timeout=10)
    proc.stop()
    after = bypass_on.bypass_counters()
    assert after[BypassCounter.CONNECTS] == before[BypassCounter.CONNECTS] + 1
    assert after[BypassCounter.INBOUND] == before[BypassCounter.INBOUND] + 1
    assert after[BypassCounter.FALLBACK] == before[BypassCounter.FALLBACK]
    # the sk_lookup entry was bound to the client socket and went with it
    assert bypass.live(bypass_on.module) == {}
    bypass_on.drain_events(0.2)
    mine = [e for e in events if e.netns == cookie]
    assert [e.kind for e in mine] == [KernelEventKind.OPEN, KernelEventKind.CLOSE]
    close = mine[1]
    assert all(e.bypass for e in mine)
    assert (close.dst_ip, close.dst_port, close.src_ip, close.src_port, close.src_id) == (
        b.ip, 8080, a.ip, sport, A_ID)
    assert (close.bytes_sent, close.bytes_received) == (len(payload), len(out["reply"]))
    assert bypass_on.map_fill()["nm_conn_cookie_v1"][0] == 0


def _push_through_echo(kcluster: Cluster, dp: Datapath, port: str, size: int,
                      *echo_args: str) -> None:
    """PUSH `size` bytes from pod a through an echo server in pod b (ECHO `port` `echo_args`)
    and check they came back intact with every byte, both ways, moved by the sk_msg redirect
    (the live entry's counts, read while the client still holds the socket)."""
    a, b = kcluster.pod(0, 0), kcluster.pod(0, 1)
    echo = ready(b.python(ECHO, port, *echo_args, stdout=subprocess.PIPE))
    try:
        proc = a.python(PUSH, str(b.ip), port, str(size), stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE)
        assert proc.popen is not None and proc.popen.stdout is not None
        assert json.loads(proc.popen.stdout.readline()) == {"echoed": size, "same": True}
        [(_owner, c2s, s2c)] = bypass.live(dp.module).values()
        assert (c2s, s2c) == (size, size)  # every byte both ways went by sk_msg redirect
        proc.popen.stdin.close()  # type: ignore[union-attr]
        proc.popen.wait(timeout=10)
        proc.stop()
    finally:
        echo.stop()


def test_bulk_through_the_redirect_arrives_intact(
    kcluster: Cluster, bypass_on: Datapath
) -> None:
    _push_through_echo(kcluster, bypass_on, "7000", 4 << 20)


def test_dual_stack_server_is_bypassed_both_ways(
    kcluster: Cluster, bypass_on: Datapath
) -> None:
    """A server on [::] (iperf3, most dual-stack servers) accepts the IPv4 client on an
    IPv4-mapped AF_INET6 socket; that socket joins the bypass like an AF_INET one (it used not
    to, and every byte to it went by TCP)."""
    before = bypass_on.bypass_counters()
    _push_through_echo(kcluster, bypass_on, "7001", 1 << 20, "dual-stack")
    after = bypass_on.bypass_counters()
    assert after[BypassCounter.FALLBACK] == before[BypassCounter.FALLBACK]
    assert after[BypassCounter.NO_SOCKHASH] == before[BypassCounter.NO_SOCKHASH]


def test_early_send_falls_back_to_tcp_without_losing_order(
    kcluster: Cluster, bypass_on: Datapath, server_b: None
) -> None:
    """A client sending at once may beat the server's establishment: still correct bytes."""
    a, b = kcluster.pod(0, 0), kcluster.pod(0, 1)
    cookie = a.cookie()
    events = _events(bypass_on)
    for n in (1, 70000):
        out = run_json(a.python(CLIENT, str(b.ip), "8080", "q" * n, stdout=subprocess.PIPE))
        tag, _me, _peer, data = out["reply"].split("|")
        assert tag == "p1" and data == "q" * len(data) and 0 < len(data) <= n  # one recv()
    bypass_on.drain_events(0.2)
    closes = [e for e in events if e.netns == cookie and e.kind == KernelEventKind.CLOSE]
    assert len(closes) == 2 and all(e.bypass for e in closes)
    assert sorted(e.bytes_sent for e in closes) == [1, 70000]


def test_same_node_denied_connect_is_eperm(
    kcluster: Cluster, bypass_on: Datapath, server_b: None
) -> None:
    a, b = kcluster.pod(0, 0), kcluster.pod(0, 1)
    deny = PolicyEntry(KernelVerdict.DENY, Reason.POLICY_DENY, policy=9, rule=4)
    bypass_on.apply_policy({PolicyKey(b.ip, A_ID, 0, 8080): deny}, {})
    events = _events(bypass_on)
    before = bypass_on.bypass_counters()[BypassCounter.CONNECTS]
    out = run_json(a.python(CLIENT, str(b.ip), "8080", "x", stdout=subprocess.PIPE))
    assert out == {"errno": "EPERM"}
    assert bypass_on.bypass_counters()[BypassCounter.CONNECTS] == before
    bypass_on.drain_events()
    [d] = [e for e in events if e.kind == KernelEventKind.DENY]
    assert (d.dst_ip, d.src_id, d.policy, d.reason) == (b.ip, A_ID, 9, Reason.POLICY_DENY)


def test_plaintext_from_elsewhere_is_steered_not_let_through(
    kcluster: Cluster, bypass_on: Datapath, server_b: None, inbound_b: socket.socket
) -> None:
    """An unenrolled pod reaching an enrolled one still lands on the tunnel's inbound listener
    (which enforces STRICT), even while a bypassed connection to the same port is live: only the
    kernel-recorded tuple passes sk_lookup."""
    a, b, c = kcluster.pod(0, 0), kcluster.pod(0, 1), kcluster.pod(0, 3)
    proc = a.python(HOLDING_CLIENT, str(b.ip), "8080", "hold", stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE)
    assert proc.popen is not None and proc.popen.stdout is not None
    assert json.loads(proc.popen.stdout.readline())["reply"].startswith("p1|")
    client = c.python(CLIENT, str(b.ip), "8080", "sneak", stdout=subprocess.PIPE)
    conn, peer = inbound_b.accept()
    with conn:
        assert conn.getsockname() == (str(b.ip), 8080) and peer[0] == str(c.ip)
        conn.sendall(b"tunnel")
        conn.shutdown(socket.SHUT_WR)
        conn.recv(100)
    assert run_json(client)["reply"] == "tunnel"
    proc.popen.stdin.close()  # type: ignore[union-attr]
    proc.popen.wait(timeout=10)
    proc.stop()


def test_no_bypass_while_no_tunnel_serves_the_destination(
    kcluster: Cluster, bypass_on: Datapath, server_b: None, inbound_b: socket.socket
) -> None:
    """The agent down (b's tunnel listener gone from the sockhash): the connect takes the old
    path, finds no tunnel on 15001 in a, and is refused; it does not reach b's app."""
    a, b = kcluster.pod(0, 0), kcluster.pod(0, 1)
    bypass_on.remove_inbound_listener(b.ip)
    try:
        before = bypass_on.bypass_counters()[BypassCounter.CONNECTS]
        out = run_json(a.python(CLIENT, str(b.ip), "8080", "x", stdout=subprocess.PIPE))
        assert out == {"errno": "ECONNREFUSED"}
        assert bypass_on.bypass_counters()[BypassCounter.CONNECTS] == before
    finally:
        bypass_on.set_inbound_listener(b.ip, inbound_b)


def test_switch_off_takes_the_tunnel(
    kcluster: Cluster, clean_policy: Datapath, server_b: None
) -> None:
    a, b = kcluster.pod(0, 0), kcluster.pod(0, 1)
    clean_policy.set_same_node_bypass(False)
    clean_policy.enroll(a.netns, A_ID, a.ip)
    clean_policy.enroll(b.netns, B_ID, b.ip)
    tunnel = ready(kcluster.nodes[0].python(FAKE_TUNNEL, a.netns_path, stdout=subprocess.PIPE))
    try:
        before = clean_policy.bypass_counters()[BypassCounter.CONNECTS]
        out = run_json(a.python(CLIENT, str(b.ip), "8080", "old", stdout=subprocess.PIPE))
        reply = json.loads(out["reply"])
        assert reply["orig"] == f"{b.ip}:8080"  # landed on the in-pod tunnel listener
        assert reply["peer"].startswith("127.0.0.1:")
        assert clean_policy.bypass_counters()[BypassCounter.CONNECTS] == before
    finally:
        tunnel.stop()
