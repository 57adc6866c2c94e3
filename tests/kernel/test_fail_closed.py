"""Fail closed and trust nothing a pod sets, in the real kernel on the test bed.

- A process in an enrolled pod (root there, so CAP_NET_ADMIN) that puts the tunnel's mark on its
  own socket is treated as the app it is: captured and judged with the pod's real identity.
- sk_lookup drops inbound plaintext to an enrolled pod whose tunnel listener is gone (the agent
  is dead), counts it and reports it; an excluded port and unenrolled pods are untouched.
- The agent's upstream entry that lets its connect reach the app lives only as long as the
  agent's socket, so its 4-tuple cannot be replayed afterwards.

One node, pods p0..p3; p0 plays the hostile enrolled pod, p2 the STRICT destination.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest
from peers import FAKE_TUNNEL, FORGED_CONNECT, HELD_UPSTREAM, PLAIN_CONNECT, SERVER

from agent.abi import ID_TUNNEL, MARK_MAGIC
from agent.datapath import bpfsys, layouts, trust
from agent.datapath.datapath import Datapath
from agent.datapath.layouts import FlowEvent, PolicyEntry, PolicyKey, TrustedEntry, UpstreamKey
from agent.datapath.verdicts import Counter, KernelDirection, KernelEventKind, KernelVerdict, Reason
from agent.testbed import Cluster, PodProcess
from agent.testbed.cluster import Place

A_ID, B_ID, DB_ID = 100, 101, 55
WORLD = 0  # CIDR class of an address no policy names
# sk_lookup's SK_DROP fails the socket lookup, so TCP answers the SYN with a reset: the client is
# refused at once, and the app (which listens on that port) never sees the connection.
REFUSED = {"errno": "ECONNREFUSED"}


def run_json(proc: PodProcess) -> dict[str, str]:
    assert proc.popen is not None
    out, _ = proc.popen.communicate(timeout=30)
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def ready(proc: PodProcess) -> PodProcess:
    assert proc.popen is not None and proc.popen.stdout is not None
    assert proc.popen.stdout.readline().strip() == b"ready"
    return proc


def forged(place: Place, ip: object, port: int, identity: int, *, bind: str = "",
           rule: bool = False) -> dict[str, str]:
    mark = (identity << 12) | MARK_MAGIC
    return run_json(place.python(FORGED_CONNECT, str(ip), str(port), str(mark), bind,
                                 "1" if rule else "0", stdout=subprocess.PIPE))


def plain(place: Place, ip: object, port: int, src: str = "") -> dict[str, str]:
    return run_json(place.python(PLAIN_CONNECT, str(ip), str(port), src, stdout=subprocess.PIPE))


def counter(dp: Datapath, c: Counter) -> int:
    return dp.counters()[c]


@pytest.fixture(scope="module")
def servers(kcluster: Cluster) -> Iterator[None]:
    """Apps that tag their replies: p1:8080 (policy target), p2:8080 and p2:9000 (STRICT pod)."""
    procs = [
        ready(kcluster.pod(0, 1).python(SERVER, "p1", "8080", stdout=subprocess.PIPE)),
        ready(kcluster.pod(0, 2).python(SERVER, "p2", "8080", stdout=subprocess.PIPE)),
        ready(kcluster.pod(0, 2).python(SERVER, "p2", "9000", stdout=subprocess.PIPE)),
    ]
    yield
    for p in procs:
        p.stop()


@pytest.fixture
def events(clean_policy: Datapath) -> Iterator[list[FlowEvent]]:
    got: list[FlowEvent] = []
    clean_policy.open_events(got.append)
    clean_policy.drain_events()
    got.clear()
    yield got


FORGERIES = [
    pytest.param((DB_ID, False, False), id="db-identity"),
    pytest.param((DB_ID, True, False), id="db-identity-bound"),
    pytest.param((DB_ID, True, True), id="db-identity-bound-with-rule"),
    pytest.param((0, False, False), id="tunnel-own-id0"),
    pytest.param((ID_TUNNEL, True, True), id="tunnel-own-all-ones-with-rule"),
]


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_mark_is_judged_with_the_pods_real_identity(
    kcluster: Cluster, clean_policy: Datapath, servers: None, events: list[FlowEvent],
    forgery: tuple[int, bool, bool],
) -> None:
    """p1 admits only db's identity. A frontend-like pod forging db's mark (or the tunnel's own
    id 0/all-ones), with and without its own address bound and a routing rule for the mark, is
    still frontend: EPERM at connect and a DENY event naming its real identity."""
    identity, bind, rule = forgery
    a, p1 = kcluster.pod(0, 0), kcluster.pod(0, 1)
    clean_policy.enroll(a.netns, A_ID, a.ip)
    clean_policy.apply_policy({
        PolicyKey(p1.ip): PolicyEntry(KernelVerdict.DENY, Reason.POLICY_NOT_ALLOWED, policy=3),
        PolicyKey(p1.ip, DB_ID, WORLD, 8080): PolicyEntry(KernelVerdict.ALLOW, policy=3, rule=1),
    }, {})
    before = counter(clean_policy, Counter.UNTRUSTED_MARK)
    out = forged(a, p1.ip, 8080, identity, bind=str(a.ip) if bind else "", rule=rule)
    assert out == {"errno": "EPERM"}
    assert counter(clean_policy, Counter.UNTRUSTED_MARK) == before + 1
    clean_policy.drain_events()
    denies = [e for e in events if e.kind == KernelEventKind.DENY and e.dst_ip == p1.ip]
    assert [(e.src_id, e.src_ip, e.direction, e.reason) for e in denies] == [
        (A_ID, a.ip, KernelDirection.EGRESS, Reason.POLICY_NOT_ALLOWED)]
    # The same connect from the tunnel's stand-in (a trusted node process) is db: allowed.
    node = kcluster.nodes[0]
    assert forged(node, p1.ip, 8080, DB_ID)["reply"].startswith("p1|")


@pytest.mark.parametrize("rule", [False, True], ids=["no-rule", "with-rule"])
def test_a_forged_mark_to_a_same_node_strict_pod_goes_through_the_tunnel(
    kcluster: Cluster, clean_policy: Datapath, servers: None, rule: bool,
) -> None:
    """Forging db's mark towards a STRICT pod on the same node: the connect is captured like any
    app connect (it lands on the pod's own outbound listener with its original destination),
    nothing is recorded as an upstream, and the STRICT app never sees the plaintext."""
    a, b, node = kcluster.pod(0, 0), kcluster.pod(0, 2), kcluster.nodes[0]
    clean_policy.enroll(a.netns, A_ID, a.ip)
    clean_policy.enroll(b.netns, B_ID, b.ip)
    # With nothing on 15001 (the agent absent) the captured connect is refused.
    assert forged(a, b.ip, 8080, DB_ID, bind=str(a.ip), rule=rule) == {"errno": "ECONNREFUSED"}
    tunnel = ready(node.python(FAKE_TUNNEL, a.netns_path, stdout=subprocess.PIPE))
    try:
        out = forged(a, b.ip, 8080, DB_ID, bind=str(a.ip), rule=rule)
    finally:
        tunnel.stop()
    reply = json.loads(out["reply"])
    assert reply["orig"] == f"{b.ip}:8080"  # captured: the tunnel would carry it over HBONE
    assert reply["peer"].startswith(f"{a.ip}:")  # its bound address, on the in-pod listener
    assert not [k for k in clean_policy.upstreams() if k.dst == b.ip]


def test_forged_mark_does_not_open_ipv6(kcluster: Cluster, clean_policy: Datapath) -> None:
    a = kcluster.pod(0, 0)
    clean_policy.enroll(a.netns, A_ID, a.ip)
    for identity in (0, DB_ID, ID_TUNNEL):
        assert forged(a, "::ffff:10.251.0.11", 8080, identity) == {"errno": "EPERM"}


def test_inbound_plaintext_to_an_enrolled_pod_without_its_tunnel_is_dropped_and_reported(
    kcluster: Cluster, clean_policy: Datapath, servers: None, events: list[FlowEvent],
) -> None:
    """No inbound listener (the agent is gone): plaintext from an unenrolled pod and from the
    node is dropped every time, counted, and reported; excluded ports still pass; once a listener
    is back, the same connects are steered to it."""
    b, c, node = kcluster.pod(0, 2), kcluster.pod(0, 3), kcluster.nodes[0]
    clean_policy.enroll(b.netns, B_ID, b.ip)
    clean_policy.set_exclusions(ports=[9000])
    before = counter(clean_policy, Counter.INBOUND_NO_TUNNEL)
    for src in (c, node, c):
        assert plain(src, b.ip, 8080) == REFUSED
    assert counter(clean_policy, Counter.INBOUND_NO_TUNNEL) >= before + 3
    clean_policy.drain_events()
    drops = [e for e in events if e.reason == Reason.NO_TUNNEL]
    assert drops, "no NO_TUNNEL event"
    assert {(e.kind, e.verdict, e.direction, e.dst_ip, e.dst_port) for e in drops} == {
        (KernelEventKind.DENY, KernelVerdict.DENY, KernelDirection.INGRESS, b.ip, 8080)}
    sources = {e.src_ip for e in drops}  # the pod, and the node (from its gateway address)
    assert c.ip in sources and len(sources) == 2
    assert {e.netns for e in drops} == {b.cookie()}
    assert plain(c, b.ip, 9000)["reply"].startswith("p2|")  # excluded: the app itself
    with b.socket() as lst:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", 15006))
        lst.listen(16)
        lst.settimeout(10)
        clean_policy.set_inbound_listener(b.ip, lst)
        client = c.python(PLAIN_CONNECT, str(b.ip), "8080", "", stdout=subprocess.PIPE)
        conn, _peer = lst.accept()
        with conn:
            assert conn.getsockname() == (str(b.ip), 8080)
            conn.sendall(b"steered")
            conn.shutdown(socket.SHUT_WR)
            conn.recv(100)  # the client's bytes: closing with them unread would reset it
        assert run_json(client) == {"reply": "steered"}
    # The listener closed with its socket: dropped again, not passed to the app.
    assert plain(c, b.ip, 8080) == REFUSED
    # Unenrolled: the pod's own traffic again (the sk_lookup link stays until unenroll).
    clean_policy.unenroll(b.cookie())
    assert plain(c, b.ip, 8080)["reply"].startswith("p2|")


def test_an_upstream_entry_lives_as_long_as_the_agents_socket(
    kcluster: Cluster, clean_policy: Datapath, servers: None,
) -> None:
    """The trusted tunnel's upstream into p2 is let through by its nm_upstream_v2 entry only
    while its socket is open; replaying the 4-tuple afterwards meets sk_lookup's drop."""
    b, node = kcluster.pod(0, 2), kcluster.nodes[0]
    clean_policy.enroll(b.netns, B_ID, b.ip)
    client_ip = "10.251.9.9"
    held = node.python(HELD_UPSTREAM, b.netns_path, client_ip, str(b.ip), "8080",
                       str((DB_ID << 12) | MARK_MAGIC), stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE)
    assert held.popen is not None and held.popen.stdout and held.popen.stdin
    port = json.loads(held.popen.stdout.readline())["port"]
    key = UpstreamKey(b.ip.__class__(client_ip), b.ip, port, 8080)
    assert key in clean_policy.upstreams()
    held.popen.stdin.write(b"go\n")
    held.popen.stdin.flush()
    reply = run_json(held)["reply"]
    assert reply.startswith(f"p2|{b.ip}:8080|{client_ip}:{port}|held")  # reached the app
    assert key not in clean_policy.upstreams()  # gone with the socket
    before = counter(clean_policy, Counter.INBOUND_NO_TUNNEL)
    # The reset goes to the spoofed address, so the replaying client only sees silence; the
    # counter shows sk_lookup dropped the SYN instead of passing it to the app.
    assert "reply" not in plain(node, b.ip, 8080, f"{client_ip}:{port}")
    assert counter(clean_policy, Counter.INBOUND_NO_TUNNEL) > before


def test_a_refused_upstream_leaves_no_entry(
    kcluster: Cluster, clean_policy: Datapath, servers: None,
) -> None:
    b, node = kcluster.pod(0, 2), kcluster.nodes[0]
    clean_policy.enroll(b.netns, B_ID, b.ip)
    held = node.python(HELD_UPSTREAM, b.netns_path, "10.251.9.8", str(b.ip), "8181",
                       str((DB_ID << 12) | MARK_MAGIC), stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert held.popen is not None
    _out, err = held.popen.communicate(timeout=30)
    assert b"ConnectionRefusedError" in err  # nothing listens on 8181: the app's RST
    assert not clean_policy.upstreams()


def test_trust_of_a_gone_agent_is_dropped_and_a_live_one_kept(
    kcluster: Cluster, clean_policy: Datapath, servers: None,
) -> None:
    """What install() does on restart: a cgroup registered by an agent that is gone stops being
    trusted; one registered by an agent still running (a surge upgrade) stays."""
    a, p1 = kcluster.pod(0, 0), kcluster.pod(0, 1)
    clean_policy.enroll(a.netns, A_ID, a.ip)
    clean_policy.apply_policy({
        PolicyKey(p1.ip): PolicyEntry(KernelVerdict.DENY, Reason.POLICY_NOT_ALLOWED),
        PolicyKey(p1.ip, DB_ID, WORLD, 8080): PolicyEntry(KernelVerdict.ALLOW),
    }, {})
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    fd = clean_policy.module.map_fd("nm_trusted_cg_v1")
    pod_cg, other_cg = trust.cgroup_id(a.cgroup), trust.cgroup_id(kcluster.pod(0, 3).cgroup)
    start = trust.process_start(os.getpid())
    assert start is not None
    try:
        # Pretend p0's cgroup belonged to an agent that died: its forged mark is honoured now.
        bpfsys.map_update(fd, layouts.CGROUP_ID.pack(pod_cg), TrustedEntry(dead.pid, start).pack())
        live_start = trust.process_start(live.pid)
        assert live_start is not None
        bpfsys.map_update(fd, layouts.CGROUP_ID.pack(other_cg),
                          TrustedEntry(live.pid, live_start).pack())
        assert forged(a, p1.ip, 8080, DB_ID)["reply"].startswith("p1|")
        done = clean_policy.refresh_trust()
        assert f"untrusted cgroup {pod_cg} of gone pid {dead.pid}" in done
        trusted = clean_policy.trusted_cgroups()
        assert pod_cg not in trusted
        assert trusted[other_cg] == TrustedEntry(live.pid, live_start)
        assert trusted[trust.cgroup_id(trust.own_cgroup())].owner_pid == os.getpid()
        assert forged(a, p1.ip, 8080, DB_ID) == {"errno": "EPERM"}
    finally:
        live.kill()
        live.wait()
        bpfsys.map_delete(fd, layouts.CGROUP_ID.pack(pod_cg))
        bpfsys.map_delete(fd, layouts.CGROUP_ID.pack(other_cg))
