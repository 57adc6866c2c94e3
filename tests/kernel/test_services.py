"""Socket-level load balancing of Service VIPs in cgroup/connect4, in the real kernel.

One node, pods p0..p3; p0 is enrolled and its captured connects land on a fake tunnel in its
netns, which reports the original destination it reads with SO_ORIGINAL_DST: the endpoint the
kernel chose. The app's own views (getpeername/getsockname) come from the same connects.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from peers import FAKE_TUNNEL, MANY_CONNECTS, SERVER

from agent.datapath import bpfsys, layouts
from agent.datapath.datapath import Datapath
from agent.datapath.layouts import Backend, FlowEvent, Frontend, PolicyEntry, PolicyKey
from agent.datapath.verdicts import Counter, KernelEventKind, KernelVerdict, Reason
from agent.testbed import Cluster, Pod, PodProcess

A_ID = 100
VIP = ipaddress.IPv4Address("10.96.0.20")
UNREACHABLE = {"ENETUNREACH", "EHOSTUNREACH", "ETIMEDOUT", "ECONNREFUSED"}


def ready(proc: PodProcess) -> PodProcess:
    assert proc.popen is not None and proc.popen.stdout is not None
    assert proc.popen.stdout.readline().strip() == b"ready"
    return proc


def connects(pod: Pod, ip: object, port: int, n: int, payload: str = "svc") -> list[dict[str, str]]:
    proc = pod.python(MANY_CONNECTS, str(ip), str(port), str(n), payload, stdout=subprocess.PIPE)
    assert proc.popen is not None
    out, _ = proc.popen.communicate(timeout=120)
    return list(json.loads(out.decode().strip().splitlines()[-1]))


def orig(result: dict[str, str]) -> str:
    return str(json.loads(result["reply"])["orig"])


@pytest.fixture
def lb(kcluster: Cluster, clean_policy: Datapath) -> Iterator[Datapath]:
    """p0 enrolled, its fake tunnel up; the load balancer emptied afterwards."""
    node, a = kcluster.nodes[0], kcluster.pod(0, 0)
    clean_policy.enroll(a.netns, A_ID, a.ip)
    tunnel = ready(node.python(FAKE_TUNNEL, a.netns_path, stdout=subprocess.PIPE))
    yield clean_policy
    tunnel.stop()
    clean_policy.apply_services({})


@pytest.fixture(scope="module")
def servers(kcluster: Cluster) -> Iterator[None]:
    procs = [
        ready(kcluster.pod(0, 1).python(SERVER, "p1", "8080", stdout=subprocess.PIPE)),
        ready(kcluster.pod(0, 2).python(SERVER, "p2", "8080", stdout=subprocess.PIPE)),
    ]
    yield
    for p in procs:
        p.stop()


def test_vip_connects_are_spread_over_every_backend_and_the_app_keeps_its_views(
    kcluster: Cluster, lb: Datapath
) -> None:
    a, p1, p2, p3 = (kcluster.pod(0, i) for i in range(4))
    backends = (Backend(p1.ip, 8080), Backend(p2.ip, 8080), Backend(p3.ip, 9000))
    lb.apply_services({Frontend(VIP, 80): backends})
    before = lb.counters()[Counter.SVC_TRANSLATED]
    results = connects(a, VIP, 80, 300, "x" * 100)
    assert all("reply" in r for r in results), [r for r in results if "reply" not in r][:3]
    seen = collections.Counter(orig(r) for r in results)
    assert set(seen) == {f"{b.ip}:{b.port}" for b in backends}  # target ports per backend
    assert all(0.15 <= n / 300 <= 0.55 for n in seen.values()), seen
    assert all(json.loads(r["reply"])["got"] == 100 for r in results)
    assert {r["peer"] for r in results} == {f"{VIP}:80"}  # getpeername: the VIP, not a backend
    assert {r["local"].split(":")[0] for r in results} == {str(a.ip)}  # getsockname: pod IP
    assert lb.counters()[Counter.SVC_TRANSLATED] == before + 300
    assert lb.services() == {Frontend(VIP, 80): backends}


def test_the_tunnel_reads_the_vip_its_original_destination_was_chosen_from(
    kcluster: Cluster, lb: Datapath
) -> None:
    a, p1 = kcluster.pod(0, 0), kcluster.pod(0, 1)
    lb.apply_services({Frontend(VIP, 80): (Backend(p1.ip, 8080),)})
    (r,) = connects(a, VIP, 80, 1)
    assert json.loads(r["reply"])["svc"] == f"{VIP}:80" and orig(r) == f"{p1.ip}:8080"
    (r,) = connects(a, p1.ip, 8080, 1)  # a direct connect: no Service, ENOPROTOOPT
    assert json.loads(r["reply"])["svc"] is None
    # Both per-connection entries go at close.
    fd = lb.module.map_fd("nm_svc_tuple_v1")
    assert bpfsys.map_keys(fd, layouts.CONN_TUPLE.size) == []


# The app in a pod: open n connections, report each, hold them until a line arrives on stdin,
# then close them all.
HOLD_CONNECTS = """
import errno, json, socket, sys
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held, out = [], []
for _ in range(n):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((ip, port))
        held.append(s)
        out.append("OK")
    except OSError as e:
        out.append(errno.errorcode.get(e.errno, str(e.errno)))
        s.close()
print(json.dumps(out), flush=True)
sys.stdin.readline()
for s in held:
    s.close()
print("closed", flush=True)
"""


def test_a_service_port_cap_refuses_connects_beyond_it_until_connections_close(
    kcluster: Cluster, lb: Datapath
) -> None:
    a, p1 = kcluster.pod(0, 0), kcluster.pod(0, 1)
    fe = Frontend(VIP, 80)
    events: list[FlowEvent] = []
    lb.open_events(events.append)
    lb.apply_services({fe: (Backend(p1.ip, 8080),)}, {fe: 3})
    holder = a.python(HOLD_CONNECTS, str(VIP), "80", "5", stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE)
    assert holder.popen is not None and holder.popen.stdout and holder.popen.stdin
    try:
        held = json.loads(holder.popen.stdout.readline())
        assert held == ["OK"] * 3 + ["ECONNREFUSED"] * 2
        assert lb.service_connections()[fe] == (3, 2)
        holder.popen.stdin.write(b"go\n")
        holder.popen.stdin.flush()
        assert holder.popen.stdout.readline().strip() == b"closed"
    finally:
        holder.stop()
    # sockops takes each off when it reaches TCP_CLOSE (once the fake tunnel has answered it)
    deadline = time.monotonic() + 60
    while lb.service_connections()[fe] != (0, 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lb.service_connections()[fe] == (0, 2)
    again = connects(a, VIP, 80, 2)
    assert [list(r) for r in again] == [["peer", "local", "reply"]] * 2, again
    lb.drain_events()
    denies = [e for e in events if e.kind == KernelEventKind.DENY]
    assert [(d.reason, d.svc_ip, d.svc_port, d.dst_ip, d.dst_port) for d in denies] == [
        (Reason.UPSTREAM_OVERFLOW, VIP, 80, p1.ip, 8080)] * 2
    # Lifting the cap rewrites the frontend; removing the Service drops its counter.
    lb.apply_services({fe: (Backend(p1.ip, 8080),)})
    assert connects(a, VIP, 80, 1)[0].get("errno") is None
    lb.apply_services({})
    assert fe not in lb.service_connections()


def test_a_plain_captured_connect_shows_the_pod_address_as_local_address(
    kcluster: Cluster, lb: Datapath
) -> None:
    a, p1 = kcluster.pod(0, 0), kcluster.pod(0, 1)
    (r,) = connects(a, p1.ip, 8080, 1)
    assert orig(r) == f"{p1.ip}:8080" and r["peer"] == f"{p1.ip}:8080"
    local_ip, local_port = r["local"].split(":")
    assert local_ip == str(a.ip) and int(local_port) > 0
    # the tunnel saw the same port: the app's real socket, on loopback
    assert json.loads(r["reply"])["peer"] == f"127.0.0.1:{local_port}"


def test_a_service_without_ready_endpoints_is_refused_at_once_with_a_reason(
    kcluster: Cluster, lb: Datapath
) -> None:
    a = kcluster.pod(0, 0)
    events: list[FlowEvent] = []
    lb.open_events(events.append)
    lb.apply_services({Frontend(VIP, 80): ()})
    before = lb.counters()
    assert connects(a, VIP, 80, 3) == [{"errno": "ECONNREFUSED"}] * 3
    after = lb.counters()
    assert after[Counter.NO_HEALTHY_UPSTREAM] == before[Counter.NO_HEALTHY_UPSTREAM] + 3
    assert after[Counter.CAPTURED] == before[Counter.CAPTURED]
    lb.drain_events()
    denies = [e for e in events if e.kind == KernelEventKind.DENY]
    assert len(denies) == 3
    for d in denies:
        assert (d.reason, d.verdict, d.svc_ip, d.svc_port, d.src_id) == (
            Reason.NO_HEALTHY_UPSTREAM, KernelVerdict.DENY, VIP, 80, A_ID)


def test_a_port_the_service_does_not_declare_goes_to_the_vip(
    kcluster: Cluster, lb: Datapath
) -> None:
    a, p1 = kcluster.pod(0, 0), kcluster.pod(0, 1)
    lb.apply_services({Frontend(VIP, 80): (Backend(p1.ip, 8080),)})
    (r,) = connects(a, VIP, 81, 1)
    assert orig(r) == f"{VIP}:81" and r["peer"] == f"{VIP}:81"  # captured, not translated


def test_excluded_vip_is_left_alone_and_excluded_endpoint_is_reached_directly(
    kcluster: Cluster, lb: Datapath, servers: None
) -> None:
    a, p1 = kcluster.pod(0, 0), kcluster.pod(0, 1)
    lb.apply_services({Frontend(VIP, 80): (Backend(p1.ip, 8080),)})
    lb.set_exclusions(cidrs=[ipaddress.IPv4Network(f"{VIP}/32")])
    (r,) = connects(a, VIP, 80, 1)
    assert r.get("errno") in UNREACHABLE, r  # untouched: nothing routes the VIP on the bed
    lb.set_exclusions(cidrs=[ipaddress.IPv4Network(f"{p1.ip}/32")])
    (r,) = connects(a, VIP, 80, 1, "direct")
    assert r["reply"].startswith(f"p1|{p1.ip}:8080|{a.ip}:") and r["reply"].endswith("|direct")


def test_policy_is_decided_for_the_endpoint_not_the_vip(kcluster: Cluster, lb: Datapath) -> None:
    a, p1, p2 = kcluster.pod(0, 0), kcluster.pod(0, 1), kcluster.pod(0, 2)
    events: list[FlowEvent] = []
    lb.open_events(events.append)
    lb.apply_policy(
        {PolicyKey(p1.ip, A_ID, 0, 8080): PolicyEntry(KernelVerdict.DENY, Reason.POLICY_DENY, 3,
            1)}, {}
    )
    lb.apply_services({Frontend(VIP, 80): (Backend(p1.ip, 8080),),
                       Frontend(VIP, 90): (Backend(p2.ip, 8080),)})
    assert connects(a, VIP, 80, 2) == [{"errno": "EPERM"}] * 2
    assert orig(connects(a, VIP, 90, 1)[0]) == f"{p2.ip}:8080"
    lb.drain_events()
    (d, _) = [e for e in events if e.kind == KernelEventKind.DENY]
    assert (d.dst_ip, d.dst_port, d.svc_ip, d.svc_port, d.reason, d.policy) == (
        p1.ip, 8080, VIP, 80, Reason.POLICY_DENY, 3)


def test_updates_never_expose_a_half_written_service(kcluster: Cluster, lb: Datapath) -> None:
    """Connects race a stream of backend-set replacements: every one finds a whole version."""
    a, p1, p2, p3 = (kcluster.pod(0, i) for i in range(4))
    versions = [
        (Backend(p1.ip, 8080),),
        (Backend(p2.ip, 8080), Backend(p3.ip, 8080)),
        (Backend(p3.ip, 7000), Backend(p1.ip, 7000), Backend(p2.ip, 7000)),
    ]
    allowed = {f"{b.ip}:{b.port}" for v in versions for b in v}
    lb.apply_services({Frontend(VIP, 80): versions[0]})
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            lb.apply_services({Frontend(VIP, 80): versions[i % 3],
                               Frontend(VIP, 81 + i % 2): versions[(i + 1) % 3]})

    t = threading.Thread(target=churn)
    t.start()
    try:
        results = connects(a, VIP, 80, 200)
    finally:
        stop.set()
        t.join()
    assert all("reply" in r for r in results), [r for r in results if "reply" not in r][:3]
    assert {orig(r) for r in results} <= allowed
    assert len({orig(r) for r in results}) > 1  # the churn really changed what was chosen
    # replaced versions' backends are deleted one update later: nothing accumulates
    lb.apply_services({Frontend(VIP, 80): versions[2]})
    lb.apply_services({Frontend(VIP, 80): versions[2]})
    fd = lb.module.map_fd("nm_lb4_backend_v1")
    assert len(bpfsys.map_keys(fd, layouts.LB4_BACKEND_KEY.size)) == 3


def test_a_new_agent_adopts_the_table_a_previous_one_left(kcluster: Cluster, lb: Datapath) -> None:
    """A restarted agent knows nothing of the pinned table: it rewrites every frontend and
    deletes backends no frontend uses (here: a retired version the old agent had not deleted)."""
    p1, p2, p3 = (kcluster.pod(0, i).ip for i in (1, 2, 3))
    other = ipaddress.IPv4Address("10.96.0.21")
    lb.apply_services({Frontend(VIP, 80): (Backend(p1, 1), Backend(p2, 2)),
                       Frontend(other, 80): (Backend(p3, 3),)})
    lb.apply_services({Frontend(VIP, 80): (Backend(p1, 1), Backend(p2, 2))})
    lb._services, lb._retired, lb._next_svc_id = None, [], 1  # what a new process starts with
    lb.apply_services({Frontend(VIP, 80): (Backend(p2, 2),)})
    assert lb.services() == {Frontend(VIP, 80): (Backend(p2, 2),)}
    assert orig(connects(kcluster.pod(0, 0), VIP, 80, 1)[0]) == f"{p2}:2"
    lb.apply_services({Frontend(VIP, 80): (Backend(p2, 2),)})
    fd = lb.module.map_fd("nm_lb4_backend_v1")
    assert len(bpfsys.map_keys(fd, layouts.LB4_BACKEND_KEY.size)) == 1

