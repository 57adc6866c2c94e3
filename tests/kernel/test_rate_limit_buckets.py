"""Connection rate limits in cgroup/connect4 (bpf/lib/ratelimit.h), in the real kernel.

One node; p0 and p2 are enrolled (ids 100, 102), each with a fake tunnel on 127.0.0.1:15001 so
captured connects complete; limits are written straight into nm_rl_cfg_v1 (what the agent's
compiler writes), so each test sets exactly the bucket it means.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest
from peers import CONNECT_BATCH, FAKE_TUNNEL, HOLDER

from agent.abi import MARK_ID_SHIFT, MARK_MAGIC
from agent.datapath.datapath import Datapath
from agent.datapath.layouts import FlowEvent, RateLimitEntry, RateLimitKey, RateLimitState
from agent.datapath.verdicts import KernelDirection, KernelEventKind, KernelVerdict, Reason
from agent.testbed import Cluster, Pod, PodProcess

A_ID, B_ID = 100, 102
LIMIT_ID = 7
HOUR_NS = 3600 * 10**9  # an interval no test outlasts: the bucket never refills meanwhile


class Holder:
    """An app process in a pod that keeps its sockets open (peers.HOLDER)."""

    def __init__(self, pod: Pod) -> None:
        self.proc: PodProcess = pod.python(HOLDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.popen is not None and self.proc.popen.stdout is not None
        return self.proc.popen.stdout.readline().decode().strip()

    def _send(self, line: str) -> str:
        assert self.proc.popen is not None and self.proc.popen.stdin is not None
        self.proc.popen.stdin.write(line.encode() + b"\n")
        self.proc.popen.stdin.flush()
        return self._line()

    def connect(self, ip: object, port: int, local_port: int | None = None) -> str:
        """"ok" or the errno name."""
        extra = f" {local_port}" if local_port else ""
        reply = self._send(f"connect {ip} {port}{extra}").split()
        return "ok" if reply[0] == "ok" else reply[1]

    def close(self, n: int) -> None:
        assert self._send(f"close {n}") == "closed"


@pytest.fixture
def rl(kcluster: Cluster, clean_policy: Datapath) -> Iterator[Datapath]:
    node = kcluster.nodes[0]
    tunnels = []
    for pod, ident in ((kcluster.pod(0, 0), A_ID), (kcluster.pod(0, 2), B_ID)):
        clean_policy.enroll(pod.netns, ident, pod.ip)
        t = node.python(FAKE_TUNNEL, pod.netns_path, stdout=subprocess.PIPE)
        assert t.popen is not None and t.popen.stdout is not None
        assert t.popen.stdout.readline().strip() == b"ready"
        tunnels.append(t)
    holders: list[Holder] = []
    clean_policy.holders = holders  # type: ignore[attr-defined]
    yield clean_policy
    for h in holders:
        h.proc.stop()
    for t in tunnels:
        t.stop()
    clean_policy.apply_rate_limits({})


def holder(dp: Datapath, pod: Pod) -> Holder:
    h = Holder(pod)
    dp.holders.append(h)  # type: ignore[attr-defined]
    return h


def bucket(dp: Datapath, key: RateLimitKey, direction: KernelDirection) -> RateLimitState:
    (st,) = [b for b in dp.rate_limit_buckets()
             if (b.dst, b.src_id, b.direction) == (key.dst, key.src_id, direction)]
    return st


def wait_active(dp: Datapath, key: RateLimitKey, want: int) -> None:
    deadline = time.monotonic() + 30
    while bucket(dp, key, KernelDirection.EGRESS).active != want:
        assert time.monotonic() < deadline, bucket(dp, key, KernelDirection.EGRESS)
        time.sleep(0.05)


def test_burst_admits_exactly_the_bucket_then_refuses_with_econnrefused_and_a_deny_event(
    kcluster: Cluster, rl: Datapath
) -> None:
    a, db, b = kcluster.pod(0, 0), kcluster.pod(0, 1), kcluster.pod(0, 2)
    key = RateLimitKey(db.ip, A_ID)
    rl.apply_rate_limits({key: RateLimitEntry(HOUR_NS, 3, 0, LIMIT_ID)})
    events: list[FlowEvent] = []
    rl.open_events(events.append)
    rl.drain_events()  # what earlier tests left in the ring
    events.clear()
    before = rl.rate_limit_refusals()
    app = holder(rl, a)
    assert [app.connect(db.ip, 5432) for _ in range(10)] == ["ok"] * 3 + ["ECONNREFUSED"] * 7
    assert rl.rate_limit_refusals()["rate"] == before["rate"] + 7
    # Another source, and another destination of the same source: their own (absent) buckets.
    other = holder(rl, b)
    assert [other.connect(db.ip, 5432) for _ in range(5)] == ["ok"] * 5
    assert [app.connect(kcluster.pod(0, 3).ip, 5432) for _ in range(5)] == ["ok"] * 5
    rl.drain_events()
    denies = [e for e in events if e.kind == KernelEventKind.DENY and e.dst_ip == db.ip]
    assert len(denies) == 7
    for d in denies:
        assert (d.reason, d.verdict, d.policy, d.src_id, d.direction, d.dst_port) == (
            Reason.RATE_LIMITED, KernelVerdict.DENY, LIMIT_ID, A_ID, KernelDirection.EGRESS, 5432)
    assert bucket(rl, key, KernelDirection.EGRESS).active == 0  # no cap: no slots taken


def test_the_bucket_refills_with_kernel_time(kcluster: Cluster, rl: Datapath) -> None:
    a, db = kcluster.pod(0, 0), kcluster.pod(0, 1)
    key = RateLimitKey(db.ip, A_ID)
    interval = 5 * 10**9  # one token per 5 s, bucket of 1
    rl.apply_rate_limits({key: RateLimitEntry(interval, 1, 0, LIMIT_ID)})
    app = holder(rl, a)
    assert app.connect(db.ip, 5432) == "ok"
    assert app.connect(db.ip, 5432) == "ECONNREFUSED"  # microseconds later: still empty
    tat = bucket(rl, key, KernelDirection.EGRESS).tat  # CLOCK_MONOTONIC, as bpf_ktime_get_ns
    while time.monotonic_ns() < tat:  # the next token is due at tat
        time.sleep(0.1)
    assert app.connect(db.ip, 5432) == "ok"
    assert app.connect(db.ip, 5432) == "ECONNREFUSED"


def test_the_concurrency_cap_is_released_when_a_connection_closes(
    kcluster: Cluster, rl: Datapath
) -> None:
    a, db, b = kcluster.pod(0, 0), kcluster.pod(0, 1), kcluster.pod(0, 2)
    key = RateLimitKey(db.ip, A_ID)
    rl.apply_rate_limits({key: RateLimitEntry(0, 0, 2, LIMIT_ID)})
    before = rl.rate_limit_refusals()
    app = holder(rl, a)
    assert [app.connect(db.ip, 5432) for _ in range(3)] == ["ok", "ok", "ECONNREFUSED"]
    assert rl.rate_limit_refusals()["concurrency"] == before["concurrency"] + 1
    wait_active(rl, key, 2)
    assert holder(rl, b).connect(db.ip, 5432) == "ok"  # B has no cap
    app.close(0)
    wait_active(rl, key, 1)  # sockops at TCP_CLOSE (or sock_release) gave the slot back
    assert app.connect(db.ip, 5432) == "ok"
    assert app.connect(db.ip, 5432) == "ECONNREFUSED"


def test_a_connect_that_fails_after_admission_does_not_leak_its_slot(
    kcluster: Cluster, rl: Datapath
) -> None:
    """The second socket, bound to the first one's port, passes connect4 (and takes a slot),
    then fails in the kernel's 4-tuple check (EADDRNOTAVAIL) before any SYN: no TCP state
    callback ever runs for it; closing it (cgroup/sock_release) must give the slot back."""
    a, db = kcluster.pod(0, 0), kcluster.pod(0, 1)
    key = RateLimitKey(db.ip, A_ID)
    rl.apply_rate_limits({key: RateLimitEntry(0, 0, 2, LIMIT_ID)})
    app = holder(rl, a)
    assert app.connect(db.ip, 5432, local_port=40123) == "ok"
    assert app.connect(db.ip, 5432, local_port=40123) == "EADDRNOTAVAIL"
    wait_active(rl, key, 2)  # the failed socket still holds its slot while it is open
    app.close(1)
    wait_active(rl, key, 1)
    assert app.connect(db.ip, 5432) == "ok"
    assert app.connect(db.ip, 5432) == "ECONNREFUSED"


def test_the_tunnels_upstream_connect_has_its_own_bucket_and_gets_eperm(
    kcluster: Cluster, rl: Datapath
) -> None:
    """Both sides enforce: the source pod's connects spend the egress bucket, the tunnel's
    upstream connects (marked with the peer's identity, from the trusted node cgroup) spend a
    separate ingress bucket of the same size, and over it get EPERM (the tunnel answers 401)."""
    a, db = kcluster.pod(0, 0), kcluster.pod(0, 1)
    key = RateLimitKey(db.ip, A_ID)
    rl.apply_rate_limits({key: RateLimitEntry(HOUR_NS, 2, 0, LIMIT_ID)})
    rl.enroll(db.netns, 101, db.ip)
    events: list[FlowEvent] = []
    rl.open_events(events.append)
    rl.drain_events()  # what earlier tests left in the ring
    events.clear()
    app = holder(rl, a)
    assert [app.connect(db.ip, 5432) for _ in range(3)] == ["ok", "ok", "ECONNREFUSED"]
    upstream = kcluster.nodes[0].python(CONNECT_BATCH, db.netns_path, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
    try:
        assert upstream.popen is not None and upstream.popen.stdin and upstream.popen.stdout
        assert upstream.popen.stdout.readline().strip() == "ready"
        mark = (A_ID << MARK_ID_SHIFT) | MARK_MAGIC
        batch = [[mark, str(a.ip), str(db.ip), 5432]] * 3
        upstream.popen.stdin.write(json.dumps(batch) + "\n")
        upstream.popen.stdin.flush()
        assert json.loads(upstream.popen.stdout.readline()) == ["OK", "OK", "EPERM"]
    finally:
        upstream.stop()
    rl.drain_events()
    denies = [(e.direction, e.reason, e.src_id, e.policy) for e in events
              if e.kind == KernelEventKind.DENY and e.dst_ip == db.ip]
    assert denies == [(KernelDirection.EGRESS, Reason.RATE_LIMITED, A_ID, LIMIT_ID),
                      (KernelDirection.INGRESS, Reason.RATE_LIMITED, A_ID, LIMIT_ID)]
