"""Zero-downtime surge upgrade and rollback of the node agent (issue #20), with real agents on a
two-node test bed.

While short connections run at a steady rate (same-node, and cross-node in both directions) and
one long transfer streams hash-checked data across the nodes, on BOTH nodes a second agent is
started beside the running one with the same pin directory (the DaemonSet's `maxSurge: 1`). It
adopts the pinned links, enrolls the pods again (its listeners join the old ones' SO_REUSEPORT
groups, nm_inbound_v1 is switched to its own), takes identity ids from the shared pinned table,
and turns ready; then the old agent gets SIGTERM, closes its listeners (its accept queues move to
the new listeners: tcp_migrate_req), sends GOAWAY to its HBONE peers, finishes its open streams
(the long transfer among them) and exits. Afterwards: no failed connection, the transfer intact,
exactly one attachment per hook and one sk_lookup link per pod netns.

Rollback is the same replacement once more, the surge agent replaced by an agent started with
the first agent's command line (`kubectl rollout undo` starts the previous pod template). Here
both are the same code, so this exercises the mechanism in the other direction (state left by
the new agent adopted by another process, a third id-table user, the first command line again),
not compatibility with an older release: rolling back to a release without SO_REUSEPORT
listeners or the shared id maps would not overlap like this (its listeners could not bind
beside the new ones).

Unlike the DaemonSet, where every agent pod has its own network namespace, both agents of a node
run in the node's namespace here, so the surge agent serves readiness and metrics on other ports
(15121/15120, admin 15100).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prereq import require_tool
from support.agents import LiveMesh, live_mesh
from support.attachments import cgroup_attachments, sk_lookup_links

from agent.commands.demo import _wait_ready, agent_argv
from agent.datapath.programs import CGROUP_PROGRAMS
from agent.testbed import PodProcess
from agent.testbed.cluster import Node

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
kind: Workload
metadata: {name: a0, namespace: shop, labels: {app: a0}}
spec: {serviceAccount: a0, ips: [10.251.0.10], node: node0}
---
kind: Workload
metadata: {name: b0, namespace: shop, labels: {app: b0}}
spec: {serviceAccount: b0, ips: [10.251.0.11], node: node0}
---
kind: Workload
metadata: {name: a1, namespace: shop, labels: {app: a1}}
spec: {serviceAccount: a1, ips: [10.251.1.10], node: node1}
---
kind: Workload
metadata: {name: b1, namespace: shop, labels: {app: b1}}
spec: {serviceAccount: b1, ips: [10.251.1.11], node: node1}
"""

# Echo servers (support.agents' line-echo "<name> got <n> bytes from <peer>"): b0 and b1 on 8080.
SERVERS = [(0, 1, "b0", "8080"), (1, 1, "b1", "8080")]
DRAIN = "120"  # far above what the drain needs: the test ends the transfer, not the deadline
SURGE_PORTS = ["--readiness-addr", "0.0.0.0:15121", "--metrics-addr", "0.0.0.0:15120",
               "--admin-addr", "127.0.0.1:15100"]

# Short connections at a steady rate until "stop" on stdin: one line per connection,
# "ok <monotonic>" or "err <monotonic> <why>".
LOAD = """
import errno, socket, sys, threading, time
ip, port, name, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
while not stop.is_set():
    s = socket.socket(); s.settimeout(60)
    try:
        s.connect((ip, port)); s.sendall(b"ping"); s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        if got.startswith(name.encode() + b" got 4 bytes"):
            print("ok %f" % time.monotonic(), flush=True)
        else:
            print("err %f reply %r" % (time.monotonic(), got[:80]), flush=True)
    except OSError as e:
        print("err %f %s" % (time.monotonic(), errno.errorcode.get(e.errno or 0) or e), flush=True)
    finally:
        s.close()
    time.sleep(interval)
print("done", flush=True)
"""

# The long transfer's server: frames of random bytes (4-byte length + payload) until the client
# half-closes, then a zero-length frame and the SHA-256 of every payload byte sent.
TRANSFER_SERVER = """
import hashlib, os, select, socket, sys, time
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
c, _ = srv.accept()
h, sent = hashlib.sha256(), 0
while not select.select([c], [], [], 0)[0]:
    chunk = os.urandom(32768)
    c.sendall(len(chunk).to_bytes(4, "big") + chunk)
    h.update(chunk); sent += len(chunk)
    time.sleep(0.01)
assert c.recv(1) == b""
c.sendall((0).to_bytes(4, "big") + h.digest())
c.close()
print(sent, flush=True)
"""

# Its client: prints "started" at the first frame, half-closes on "finish" (stdin), then prints
# {"bytes": n, "intact": digest matches, "error": ...}.
TRANSFER_CLIENT = """
import hashlib, json, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)
threading.Thread(target=lambda: (sys.stdin.readline(), s.shutdown(socket.SHUT_WR)),
                 daemon=True).start()
def exact(n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("EOF after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf
h, got, first = hashlib.sha256(), 0, True
try:
    while True:
        n = int.from_bytes(exact(4), "big")
        if n == 0:
            print(json.dumps({"bytes": got, "intact": exact(32) == h.digest(), "error": ""}))
            break
        h.update(exact(n)); got += n
        if first:
            print("started", flush=True); first = False
except OSError as e:
    print(json.dumps({"bytes": got, "intact": False, "error": repr(e)}))
"""


@dataclass
class Load:
    """One short-connection generator and what it reported so far."""

    what: str
    proc: PodProcess
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.popen is not None and self.proc.popen.stdout is not None
        for raw in self.proc.popen.stdout:
            self.lines.append(raw.decode().strip())

    def oks_since(self, t: float) -> int:
        return sum(1 for ln in list(self.lines) if ln.startswith("ok ") and float(ln[3:]) > t)

    def failures(self) -> list[str]:
        return [ln for ln in list(self.lines) if ln.startswith("err ")]

    def stop(self) -> None:
        assert self.proc.popen is not None and self.proc.popen.stdin is not None
        try:
            self.proc.popen.stdin.write(b"stop\n")
            self.proc.popen.stdin.flush()
        except BrokenPipeError:  # it died: what it printed says why (failures() below)
            self.lines.append(f"err 0 generator exited with {self.proc.popen.wait()}")
        else:
            wait_for(lambda: "done" in self.lines, f"{self.what} to stop", 120)
        self.proc.wait(60)
        self._reader.join(10)
        self.proc.stop()  # closes its pipes


def wait_for(cond: object, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Transfer:
    """The long transfer: server in node0's a0, client in node1's b1 (through both tunnels)."""

    def __init__(self, live: LiveMesh, port: int) -> None:
        c = live.cluster
        self.server = c.pod(0, 0).python(TRANSFER_SERVER, str(port), stdout=subprocess.PIPE)
        assert self.server.popen is not None and self.server.popen.stdout is not None
        assert self.server.popen.stdout.readline().strip() == b"ready"
        self.client = c.pod(1, 1).python(TRANSFER_CLIENT, str(c.pod(0, 0).ip), str(port),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.client.popen is not None and self.client.popen.stdout is not None
        assert self.client.popen.stdout.readline().strip() == b"started"

    def finish(self) -> dict[str, object]:
        """Ask for the end; the transfer's result once both sides are done."""
        cli, srv = self.client.popen, self.server.popen
        assert cli is not None and cli.stdin is not None and srv is not None
        with contextlib.suppress(BrokenPipeError):  # it ended on its own: its output says why
            cli.stdin.write(b"finish\n")
            cli.stdin.flush()
        out, _ = cli.communicate(timeout=180)
        sent, _ = srv.communicate(timeout=60)
        result = dict(json.loads(out.decode().strip().splitlines()[-1]))
        result["sent"] = int(sent.decode().strip())
        return result


def spawn(live: LiveMesh, node: Node, tag: str, extra: Sequence[str]) -> PodProcess:
    argv = agent_argv(live.cluster, node, live.mesh, live.pins[node.index], live.work,
                      extra=["--drain-seconds", DRAIN, *extra])
    with (live.work / f"agent-n{node.index}-{tag}.log").open("w") as log:
        return node.spawn(argv, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveMesh]:
    require_tool("bpftool")
    with live_mesh(tmp_path, "upgrade test", mesh_text=MESH, servers=SERVERS,
                   extra=["--drain-seconds", DRAIN]) as mesh:
        yield mesh


def replace_agents(live: LiveMesh, old: list[PodProcess], tag: str, *, extra: Sequence[str],
                   ready_port: int, loads: list[Load], transfer: Transfer) -> list[PodProcess]:
    """Surge on both nodes: new agents beside the old, ready, then the old ones drain and exit
    while traffic runs. Returns the new agents."""
    nodes = live.cluster.nodes
    new = [spawn(live, node, tag, extra) for node in nodes]
    try:
        for node in nodes:
            assert _wait_ready(node, ready_port, timeout=240), (
                live.work / f"agent-n{node.index}-{tag}.log").read_text()[-3000:]
        overlap = time.monotonic()
        for load in loads:  # both agents serving: traffic goes on
            wait_for(lambda ld=load: ld.oks_since(overlap) >= 3, f"{load.what} during overlap")
        term = time.monotonic()
        for agent in old:
            assert agent.popen is not None
            agent.popen.send_signal(signal.SIGTERM)
        for load in loads:  # the old agents draining: traffic goes on
            wait_for(lambda ld=load: ld.oks_since(term) >= 5, f"{load.what} during drain")
        result = transfer.finish()
        assert result["error"] == "" and result["intact"] is True, result
        assert result["bytes"] == result["sent"] and int(str(result["bytes"])) > 0, result
        for agent in old:
            assert agent.wait(timeout=240) == 0
        exited = time.monotonic()
        for load in loads:  # only the new agents: traffic goes on
            wait_for(lambda ld=load: ld.oks_since(exited) >= 3, f"{load.what} after the exit")
    except BaseException:
        for agent in new:
            agent.stop(grace=10)
        raise
    return new


def test_surge_upgrade_and_rollback_drop_no_connection(live: LiveMesh) -> None:
    c = live.cluster
    a0, b0, a1, b1 = c.pod(0, 0), c.pod(0, 1), c.pod(1, 0), c.pod(1, 1)
    flows = [("same-node a0->b0", a0, b0, "b0"), ("cross-node a1->b0", a1, b0, "b0"),
             ("cross-node a0->b1", a0, b1, "b1")]
    loads = [Load(what, src.python(LOAD, str(dst.ip), "8080", name, "0.05",
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE))
             for what, src, dst, name in flows]
    running: list[PodProcess] = []
    try:
        wait_for(lambda: all(ld.oks_since(0) >= 3 for ld in loads), "traffic before the upgrade")
        first = Transfer(live, 9000)
        surge = replace_agents(live, live.agents, "surge", extra=SURGE_PORTS, ready_port=15121,
                               loads=loads, transfer=first)
        running = surge
        check_single_attachments(live, "surge")
        # Rollback: the surge agents replaced by the first agents' command line.
        second = Transfer(live, 9001)
        rollback = replace_agents(live, surge, "rollback", extra=[], ready_port=15021,
                                  loads=loads, transfer=second)
        running = rollback
        check_single_attachments(live, "rollback")
    finally:
        for load in loads:
            if load.proc.poll() is None:
                load.stop()
        for agent in running:
            agent.stop(grace=60)
    for agent in running:  # drained and exited on SIGTERM
        assert agent.popen is not None and agent.popen.returncode == 0
    for load in loads:
        assert load.failures() == [], (load.what, load.failures()[:5])
        assert load.oks_since(0) > 0
    for node in c.nodes:  # the drains finished before their deadline
        for tag in ("", "-surge"):
            text = (live.work / f"agent-n{node.index}{tag}.log").read_text()
            assert "drain deadline passed" not in text


def check_single_attachments(live: LiveMesh, tag: str) -> None:
    c = live.cluster
    for node in c.nodes:
        assert cgroup_attachments(node) == {p.name: 1 for p in CGROUP_PROGRAMS}, tag
        log = (live.work / f"agent-n{node.index}-{tag}.log").read_text()
        for p in CGROUP_PROGRAMS:
            assert f"adopted {p.name}" in log, (tag, p.name)
    for n in range(2):
        for p in range(2):
            assert sk_lookup_links(c.pod(n, p)) == 1, (tag, n, p)
