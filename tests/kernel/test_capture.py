"""Outbound capture, original destination, inbound steering, and policy at connect(), in the
real kernel on the test bed. One node, pods p0..p3; the session datapath is attached at the
node's cgroup root."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
from collections.abc import Iterator

import pytest
from peers import CLIENT, FAKE_TUNNEL, MARKED_CONNECT, SERVER, TRANSPARENT_CONNECT

from agent.abi import ID_PLAINTEXT, ID_TUNNEL, MARK_MAGIC
from agent.datapath.datapath import Datapath
from agent.datapath.layouts import PolicyEntry, PolicyKey
from agent.datapath.verdicts import Counter, KernelEventKind, KernelVerdict, Reason
from agent.testbed import Cluster, Pod, PodProcess

A_ID, B_ID = 100, 101


def run_json(proc: PodProcess) -> dict[str, str]:
    assert proc.popen is not None
    out, _ = proc.popen.communicate(timeout=20)
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def ready(proc: PodProcess) -> PodProcess:
    assert proc.popen is not None and proc.popen.stdout is not None
    assert proc.popen.stdout.readline().strip() == b"ready"
    return proc


def connect_from(pod: Pod, ip: object, port: int, payload: str = "hi") -> dict[str, str]:
    return run_json(pod.python(CLIENT, str(ip), str(port), payload, stdout=subprocess.PIPE))


@pytest.fixture(scope="module")
def servers(kcluster: Cluster) -> Iterator[None]:
    """Real servers in p1 (8080) and p2 (8080, 9000) that tag their replies."""
    procs = [
        ready(kcluster.pod(0, 1).python(SERVER, "p1", "8080", stdout=subprocess.PIPE)),
        ready(kcluster.pod(0, 2).python(SERVER, "p2", "8080", stdout=subprocess.PIPE)),
        ready(kcluster.pod(0, 2).python(SERVER, "p2", "9000", stdout=subprocess.PIPE)),
    ]
    yield
    for p in procs:
        p.stop()


@pytest.fixture
def tunnel_a(kcluster: Cluster) -> Iterator[PodProcess]:
    """The fake tunnel listening on 127.0.0.1:15001 in p0's netns, from the node's cgroup."""
    node, a = kcluster.nodes[0], kcluster.pod(0, 0)
    proc = ready(node.python(FAKE_TUNNEL, a.netns_path, stdout=subprocess.PIPE))
    yield proc
    proc.stop()


def test_enrolled_connect_lands_on_the_pods_own_listener_with_original_destination(
    kcluster: Cluster, clean_policy: Datapath, servers: None, tunnel_a: PodProcess
) -> None:
    a, b = kcluster.pod(0, 0), kcluster.pod(0, 1)
    clean_policy.enroll(a.netns, A_ID, a.ip)
    before = clean_policy.counters()[Counter.CAPTURED]
    out = connect_from(a, b.ip, 8080, "x" * 1000)
    reply = json.loads(out["reply"])
    assert reply["orig"] == f"{b.ip}:8080"  # SO_ORIGINAL_DST answered by cgroup/getsockopt
    assert reply["peer"].startswith("127.0.0.1:")  # it really landed on the in-pod listener
    assert reply["got"] == 1000
    assert out["peer"] == f"{b.ip}:8080"  # the app sees its original peer (getpeername4)
    assert clean_policy.counters()[Counter.CAPTURED] == before + 1


def test_unenrolled_pods_are_untouched(
    kcluster: Cluster, clean_policy: Datapath, servers: None, tunnel_a: PodProcess
) -> None:
    a, c, b = kcluster.pod(0, 0), kcluster.pod(0, 3), kcluster.pod(0, 1)
    clean_policy.enroll(a.netns, A_ID, a.ip)
    out = connect_from(c, b.ip, 8080, "plain")
    assert out["reply"] == f"p1|{b.ip}:8080|{c.ip}:{out['reply'].split('|')[2].split(':')[1]}|plain"
    assert out["peer"] == f"{b.ip}:8080"


def test_excluded_destinations_and_loopback_are_not_captured(
    kcluster: Cluster, clean_policy: Datapath, servers: None, tunnel_a: PodProcess
) -> None:
    a, b, c = kcluster.pod(0, 0), kcluster.pod(0, 1), kcluster.pod(0, 2)
    clean_policy.enroll(a.netns, A_ID, a.ip)
    clean_policy.set_exclusions(ports=[9000], cidrs=[ipaddress.IPv4Network(f"{b.ip}/32")])
    assert connect_from(a, c.ip, 9000)["reply"].startswith("p2|")
    assert connect_from(a, b.ip, 8080)["reply"].startswith("p1|")
    assert json.loads(connect_from(a, c.ip, 8080)["reply"])["orig"] == f"{c.ip}:8080"


def test_egress_deny_is_eperm_at_once_and_emits_a_deny_event(
    kcluster: Cluster, clean_policy: Datapath, servers: None, tunnel_a: PodProcess
) -> None:
    a, b = kcluster.pod(0, 0), kcluster.pod(0, 1)
    clean_policy.enroll(a.netns, A_ID, a.ip)
    events: list[object] = []
    clean_policy.open_events(events.append)
    deny = PolicyEntry(KernelVerdict.DENY, Reason.POLICY_DENY, policy=7, rule=2)
    clean_policy.apply_policy({PolicyKey(b.ip, A_ID, 0, 8080): deny}, {})
    assert connect_from(a, b.ip, 8080) == {"errno": "EPERM"}
    # another port of the same destination has no entry: allowed (captured)
    clean_policy.drain_events()
    denies = [e for e in events if getattr(e, "kind", None) == KernelEventKind.DENY]
    assert len(denies) == 1
    d = denies[0]
    assert (d.dst_ip, d.dst_port, d.src_id, d.policy, d.rule, d.reason) == (  # type: ignore[attr-defined]
        b.ip,
        8080,
        A_ID,
        7,
        2,
        Reason.POLICY_DENY,
    )


def test_policy_change_is_enforced_right_after_the_update_returns(
    kcluster: Cluster, clean_policy: Datapath, servers: None, tunnel_a: PodProcess
) -> None:
    a, b = kcluster.pod(0, 0), kcluster.pod(0, 1)
    clean_policy.enroll(a.netns, A_ID, a.ip)
    deny = {PolicyKey(b.ip): PolicyEntry(KernelVerdict.DENY, Reason.POLICY_NOT_ALLOWED)}
    allow = {PolicyKey(b.ip, port=8080): PolicyEntry(KernelVerdict.ALLOW, policy=1), **deny}
    for _ in range(3):
        clean_policy.apply_policy(deny, {})
        assert connect_from(a, b.ip, 8080) == {"errno": "EPERM"}
        clean_policy.apply_policy(allow, {})
        assert "reply" in connect_from(a, b.ip, 8080)


def test_destination_side_deny_follows_the_identity_in_the_socket_mark(
    kcluster: Cluster, clean_policy: Datapath, servers: None
) -> None:
    node, b, p1 = kcluster.nodes[0], kcluster.pod(0, 2), kcluster.pod(0, 1)
    clean_policy.enroll(b.netns, B_ID, b.ip)
    world = 0  # the upstream socket is unbound: source 0.0.0.0 is in no policy CIDR
    clean_policy.apply_policy(
        {
            PolicyKey(p1.ip, 55, world, 8080): PolicyEntry(KernelVerdict.DENY, Reason.POLICY_DENY),
            PolicyKey(p1.ip, ID_PLAINTEXT, world, ANY_PORT_): PolicyEntry(
                KernelVerdict.DENY, Reason.MTLS_REQUIRED
            ),
        },
        {},
    )

    def upstream(identity: int, port: int = 8080) -> dict[str, str]:
        mark = (identity << 12) | MARK_MAGIC
        return run_json(
            node.python(
                MARKED_CONNECT,
                b.netns_path,
                str(p1.ip),
                str(port),
                str(mark),
                stdout=subprocess.PIPE,
            )
        )

    assert upstream(55) == {"errno": "EPERM"}
    assert upstream(56)["reply"].startswith("p1|")  # another identity: no entry, allowed
    assert upstream(ID_PLAINTEXT) == {"errno": "EPERM"}  # plaintext under STRICT
    # the tunnel's own sockets (id 0, or all-ones as ztunnel marks them): never policed
    assert upstream(0)["reply"].startswith("p1|")
    assert upstream(ID_TUNNEL)["reply"].startswith("p1|")


ANY_PORT_ = 0


def test_ipv6_from_an_enrolled_pod_fails_closed(kcluster: Cluster, clean_policy: Datapath) -> None:
    a = kcluster.pod(0, 0)
    clean_policy.enroll(a.netns, A_ID, a.ip)
    code = (
        "import socket,errno\ns=socket.socket(socket.AF_INET6)\n"
        "try:\n s.connect(('::ffff:10.251.0.11',8080)); print('connected')\n"
        "except OSError as e: print(errno.errorcode[e.errno])"
    )
    out = a.python(code, stdout=subprocess.PIPE)
    assert out.popen is not None
    assert out.popen.communicate(timeout=10)[0].decode().strip() == "EPERM"


def test_inbound_plaintext_is_steered_to_the_inbound_listener(
    kcluster: Cluster, clean_policy: Datapath, servers: None
) -> None:
    b, c = kcluster.pod(0, 2), kcluster.pod(0, 3)
    clean_policy.enroll(b.netns, B_ID, b.ip)
    clean_policy.set_exclusions(ports=[9000])
    with b.socket() as lst:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", 15006))
        lst.listen(16)
        lst.settimeout(10)
        clean_policy.set_inbound_listener(b.ip, lst)
        for port in (8080, 443, 31337):
            client = c.python(CLIENT, str(b.ip), str(port), "in", stdout=subprocess.PIPE)
            conn, peer = lst.accept()
            with conn:
                assert conn.getsockname() == (str(b.ip), port)  # the original destination
                assert peer[0] == str(c.ip)
                conn.sendall(b"steered")
                conn.shutdown(socket.SHUT_WR)
                conn.recv(100)
            assert run_json(client)["reply"] == "steered"
        # the tunnel's own upstream (marked, source spoofed) to the pod's app is not steered
        node = kcluster.nodes[0]
        out = run_json(
            node.python(
                TRANSPARENT_CONNECT,
                b.netns_path,
                "10.251.9.9",
                str(b.ip),
                "8080",
                str((55 << 12) | MARK_MAGIC),
                stdout=subprocess.PIPE,
            )
        )
        assert out["reply"].startswith(f"p2|{b.ip}:8080|10.251.9.9:")
        # excluded port: reaches the real server; 15008: not steered (nothing listens: refused)
        assert connect_from(c, b.ip, 9000)["reply"].startswith("p2|")
        assert connect_from(c, b.ip, 15008) == {"errno": "ECONNREFUSED"}
        clean_policy.remove_inbound_listener(b.ip)


def test_flow_events_match_the_traffic(
    kcluster: Cluster, clean_policy: Datapath, servers: None, tunnel_a: PodProcess
) -> None:
    a, b = kcluster.pod(0, 0), kcluster.pod(0, 1)
    cookie = clean_policy.enroll(a.netns, A_ID, a.ip)
    events: list[object] = []
    clean_policy.open_events(events.append)
    clean_policy.drain_events()
    events.clear()
    sizes = [1, 5000, 70000]
    replies = []
    for n in sizes:
        replies.append(len(connect_from(a, b.ip, 8080, "y" * n)["reply"]))
    clean_policy.drain_events(0.2)
    mine = [e for e in events if getattr(e, "netns", None) == cookie]
    opens = [e for e in mine if e.kind == KernelEventKind.OPEN]  # type: ignore[attr-defined]
    closes = [e for e in mine if e.kind == KernelEventKind.CLOSE]  # type: ignore[attr-defined]
    assert len(opens) == len(closes) == len(sizes)
    assert sorted(e.bytes_sent for e in closes) == sorted(sizes)  # type: ignore[attr-defined]
    assert sorted(e.bytes_received for e in closes) == sorted(replies)  # type: ignore[attr-defined]
    for e in closes:
        assert (e.dst_ip, e.dst_port, e.src_ip, e.src_id) == (b.ip, 8080, a.ip, A_ID)  # type: ignore[attr-defined]
        assert e.duration_ns > 0  # type: ignore[attr-defined]
    assert clean_policy.counters()[Counter.RINGBUF_DROPS] == 0
    assert clean_policy.map_fill()["nm_conn_cookie_v1"][0] == 0  # entries removed at close
