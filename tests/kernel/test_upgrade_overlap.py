"""Two agents on one node (a surge upgrade): identity ids shared through pinned maps, the tunnel
ports guarded against pods joining the SO_REUSEPORT group, accept queues migrated to the new
agent's listener, and a second install adopting every attachment without duplicates."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prereq import require_tool

from agent.datapath import bpfsys, identities
from agent.datapath.datapath import Datapath
from agent.datapath.identities import FIRST_ID, IdentityTable, SharedIds
from agent.datapath.layouts import FlowEvent, PolicyEntry, PolicyKey
from agent.datapath.options import DEFAULT_PIN_ROOT
from agent.datapath.programs import CGROUP_PROGRAMS
from agent.datapath.verdicts import KernelEventKind, KernelVerdict, Reason
from agent.host import netns
from agent.identity.spiffe import Identity
from agent.testbed import Cluster
from ztunnel import podnet

SO_COOKIE = 57
NAMES = [Identity("cluster.local", f"ns{i % 7}", f"sa{i}") for i in range(300)]

# One agent's allocations: share the pinned table, allocate every identity in an order of its
# own (seeded), print uri -> id.
ALLOCATE = """
import json, random, sys
from pathlib import Path
from agent.datapath.identities import IdentityTable
from agent.identity.spiffe import Identity
pin, seed = Path(sys.argv[1]), int(sys.argv[2])
names = [Identity("cluster.local", f"ns{i % 7}", f"sa{i}") for i in range(300)]
random.Random(seed).shuffle(names)
t = IdentityTable()
t.share(pin)
sys.stdin.readline()  # start together
print(json.dumps({n.uri: t.allocate(n) for n in names}))
"""

# A process inside a pod (its netns and cgroup, root): bind a port with SO_REUSEPORT.
BIND = """
import errno, socket, sys
port, family = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
try:
    s.bind(("::" if family == "6" else "0.0.0.0", port))
    s.listen()
    print("OK")
except OSError as e:
    print("ERR " + errno.errorcode.get(e.errno or 0, str(e.errno)))
"""


@pytest.fixture
def id_pins(kcluster: Cluster) -> Iterator[Path]:
    pin = DEFAULT_PIN_ROOT / f"ids-{kcluster.run_id}"
    pin.mkdir(parents=True, exist_ok=True)
    try:
        yield pin
    finally:
        shutil.rmtree(pin, ignore_errors=True)


def test_overlapping_agents_allocate_one_id_per_identity_through_the_pinned_maps(
        id_pins: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", ALLOCATE, str(id_pins), str(seed)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for seed in (1, 2, 3)]
    for p in procs:  # every process has opened the maps: now they race
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    first = results[0]
    assert results[1] == first and results[2] == first  # every agent the same id
    assert sorted(first.values()) == list(range(FIRST_ID, FIRST_ID + len(NAMES)))  # no gaps
    # Both directions are in the kernel, and a restarted agent finds the same ids.
    shared = SharedIds(id_pins)
    try:
        for ident in NAMES[:20]:
            assert shared.lookup(ident) == first[ident.uri]
            raw = bpfsys.map_lookup(shared.names, first[ident.uri].to_bytes(4, "little"),
                                    identities.NAME_BYTES)
            assert raw is not None and raw.rstrip(b"\0").decode() == ident.uri
    finally:
        shared.close()
    again = IdentityTable()
    again.share(id_pins)
    try:
        assert again.allocate(NAMES[7]) == first[NAMES[7].uri]
        assert again.id_of(NAMES[8]) == identities.ID_OTHER  # known only once allocated here
        fresh = Identity("cluster.local", "late", "newcomer")
        assert again.allocate(fresh) == FIRST_ID + len(NAMES)
    finally:
        again.close()


class _LateLookup(SharedIds):
    """Sees the identity as unpublished once, as an agent does that loses the publish race."""

    missed = False

    def lookup(self, identity: Identity) -> int | None:
        if not self.missed:
            self.missed = True
            return None
        return super().lookup(identity)


def test_an_agent_that_loses_the_publish_race_adopts_the_winners_id_and_frees_its_claim(
        id_pins: Path) -> None:
    winner, loser = SharedIds(id_pins), _LateLookup(id_pins)
    try:
        ident = Identity("cluster.local", "race", "sa")
        got, _ = winner.allocate(ident, FIRST_ID)
        assert got == FIRST_ID
        adopted, nxt = loser.allocate(ident, FIRST_ID)
        assert loser.missed and adopted == FIRST_ID
        # Its claim (the next free id) was taken and given back: free for the next identity.
        assert nxt == FIRST_ID + 1
        assert bpfsys.map_lookup(loser.names, nxt.to_bytes(4, "little"), 4) is None
        assert winner.allocate(Identity("cluster.local", "race", "other"), nxt)[0] == nxt
    finally:
        winner.close()
        loser.close()


def _pod_bind(c: Cluster, pod: int, port: int, family: str = "4") -> str:
    p = c.pod(0, pod).python(BIND, str(port), family, stdout=subprocess.PIPE)
    assert p.popen is not None
    out, _ = p.popen.communicate(timeout=30)
    return str(out.decode().strip())


def test_a_pod_process_cannot_join_the_tunnels_reuseport_group_but_the_agent_can(
        kcluster: Cluster, clean_policy: Datapath) -> None:
    dp, c = clean_policy, kcluster
    pod = c.pod(0, 2)
    # Not enrolled: the ports are the pod's own business.
    assert _pod_bind(c, 2, 15008) == "OK"
    events: list[FlowEvent] = []
    dp.open_events(events.append)
    dp.drain_events()
    events.clear()
    before = dp.tunnel_port_refusals()
    dp.enroll(pod.netns, 42, pod.ip)
    # The agent (this process: a trusted cgroup) holds the port with SO_REUSEPORT, as the
    # tunnel does, and a second agent socket may join the group.
    own = [podnet.listener(pod.netns, "0.0.0.0", 15008) for _ in range(2)]
    try:
        refused = [_pod_bind(c, 2, port, fam) for port in (15008, 15006, 15001)
                   for fam in ("4", "6")]
        assert refused == ["ERR EPERM"] * 6
        assert _pod_bind(c, 2, 18123) == "OK"  # any other port: allowed
        assert dp.tunnel_port_refusals() - before == 6
        assert dp.drop_counts()["tunnel_port_bind"] >= 6
        dp.drain_events(0.2)
        denies = [e for e in events if e.kind == KernelEventKind.DENY
                  and e.reason == Reason.TUNNEL_PORT]
        assert sorted(e.dst_port for e in denies) == [15001, 15001, 15006, 15006, 15008, 15008]
        assert {(e.src_id, str(e.src_ip)) for e in denies} == {(42, str(pod.ip))}
    finally:
        for s in own:
            s.close()


def test_closing_a_listener_moves_its_accept_queue_to_the_new_one(kcluster: Cluster) -> None:
    pod = kcluster.pod(0, 3)
    podnet.prepare_pod_netns(pod.netns)  # sets net.ipv4.tcp_migrate_req in the pod
    with netns.entered(pod.netns):
        assert Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip() == "1"

    def queue_and_replace() -> tuple[list[bytes], list[socket.socket]]:
        """Connections wait in the old listener's queue; a new one joins; the old closes."""
        old = podnet.listener(pod.netns, "127.0.0.1", 15001)
        clients = []
        for i in range(5):
            cl = pod.socket()
            cl.settimeout(10)
            cl.connect(("127.0.0.1", 15001))
            cl.sendall(b"hello %d" % i)
            clients.append(cl)
        new = podnet.listener(pod.netns, "127.0.0.1", 15001)
        old.close()
        got = []
        new.settimeout(2)
        try:
            while True:
                conn, _ = new.accept()
                with conn:
                    conn.settimeout(10)
                    got.append(conn.recv(100))
        except TimeoutError:
            pass
        finally:
            new.close()
        return got, clients

    got, clients = queue_and_replace()
    assert sorted(got) == [b"hello %d" % i for i in range(5)]
    for cl in clients:
        cl.close()
    # Without the sysctl the same sequence resets every queued connection.
    with netns.entered(pod.netns):
        Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("0\n")
    try:
        got, clients = queue_and_replace()
        assert got == []
        for cl in clients:
            with pytest.raises(ConnectionResetError):
                cl.recv(100)
            cl.close()
    finally:
        podnet.prepare_pod_netns(pod.netns)


def _attachments(c: Cluster) -> dict[str, int]:
    fd = os.open(c.nodes[0].cgroup_root, os.O_RDONLY)
    try:
        return {p.name: len(bpfsys.prog_query(fd, p.attach_type)) for p in CGROUP_PROGRAMS}
    finally:
        os.close(fd)


def test_a_second_agent_adopts_every_attachment_and_enrollment_without_duplicates(
        kcluster: Cluster, clean_policy: Datapath) -> None:
    require_tool("bpftool")
    old, c = clean_policy, kcluster
    pod = c.pod(0, 1)
    old.enroll(pod.netns, 42, pod.ip)
    old_listener = podnet.listener(pod.netns, "0.0.0.0", 15006)
    old.set_inbound_listener(ipaddress.IPv4Address(str(pod.ip)), old_listener)
    ino = os.stat(pod.netns_path).st_ino
    before = _attachments(c), _links_in(ino)
    assert before == ({p.name: 1 for p in CGROUP_PROGRAMS}, 1)
    new = Datapath(old.cgroup_root, old.options)
    new_listener = podnet.listener(pod.netns, "0.0.0.0", 15006)
    try:
        actions = new.install()
        assert [a for a in actions if a.startswith("adopted nm_")] == [
            f"adopted {p.name}" for p in CGROUP_PROGRAMS] + ["adopted nm_bypass_msg"]
        assert f"adopted sklookup-{pod.cookie()}" in actions
        new.enroll(pod.netns, 42, pod.ip)  # idempotent: same entries, no second link
        new.set_inbound_listener(ipaddress.IPv4Address(str(pod.ip)), new_listener)
        assert (_attachments(c), _links_in(ino)) == before
        # The inbound steering target is the new agent's listener now: the old one closing
        # leaves it in place.
        old_listener.close()
        raw = bpfsys.map_lookup(old.module.map_fd("nm_inbound_v1"),
                                ipaddress.IPv4Address(str(pod.ip)).packed, 8)
        assert raw == new_listener.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
        assert old.enrolled()[pod.cookie()] == (42, ipaddress.IPv4Address(str(pod.ip)))
    finally:
        old_listener.close()
        new_listener.close()
        assert new._module is not None
        new._module.close()


def _links_in(netns_inode: int) -> int:
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return sum(1 for link in json.loads(out or "[]")
               if link.get("type") == "netns" and link.get("netns_ino") == netns_inode)


def _entries(n: int, verdict: KernelVerdict) -> dict[PolicyKey, PolicyEntry]:
    return {PolicyKey(ipaddress.IPv4Address(f"10.9.0.{i}")): PolicyEntry(verdict,
            Reason.POLICY_DENY if verdict == KernelVerdict.DENY else Reason.NONE)
            for i in range(1, n + 1)}


def test_an_agent_does_not_patch_a_policy_slot_another_agent_rewrote(
        clean_policy: Datapath) -> None:
    old = clean_policy
    a, b, c = (_entries(4, KernelVerdict.DENY), _entries(5, KernelVerdict.ALLOW),
               _entries(3, KernelVerdict.ALLOW))
    for _ in range(2):  # the old agent holds its own generation in both slots
        old.apply_policy(a, {}, {"p": a})
    assert old.apply_policy(a, {}, {"p": a}).mode == "incremental"
    new = Datapath(old.cgroup_root, old.options)
    new.open_pins()
    try:
        assert new.apply_policy(b, {}, {"p": b}).mode == "full"  # replaces the inactive slot
        assert old.policy_entries() == b
        # The old agent's next write goes to the other slot, still its own: patched.
        assert old.apply_policy(c, {}, {"p": c}).mode == "incremental"
        assert old.policy_entries() == c
        # The one after targets the slot the new agent rewrote: the old agent's copy is no
        # longer installed, so it builds the slot anew instead of patching a map nothing reads.
        assert old.apply_policy(a, {}, {"p": a}).mode == "full"
        assert old.policy_entries() == a
    finally:
        for gen in new._generations.values():
            gen.close()
        assert new._module is not None
        new._module.close()
