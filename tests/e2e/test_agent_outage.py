"""Fail closed while a node's agent is down: a real `nodemesh run` agent is SIGKILLed on the node
of a STRICT pod, plaintext to that pod from the underlay and from unenrolled processes is refused
for the whole outage (and recorded once the agent is back), and a restarted agent serves mesh
traffic again with no duplicate attachments.

Test bed: two nodes, three pods per node. The demo mesh file puts frontend (node0 pod0) and
backend (node0 pod1, namespace shop: STRICT) in the mesh; node0 pod2 is not in the mesh.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prereq import require_tool
from support.agents import live_mesh as live_agents
from support.attachments import cgroup_attachments, sk_lookup_links

from agent.commands.demo import (
    _run_client,
    _wait_ready,
    agent_argv,
    http_get,
)
from agent.datapath.datapath import CGROUP_PROGRAMS
from agent.testbed import Cluster, PodProcess
from agent.testbed.cluster import Node, Place

# A plaintext client with a short timeout: prints "OK <reply>" or "ERR <errno name>".
PLAIN = """
import errno, socket, sys
s = socket.socket(); s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); s.sendall(b"plaintext"); s.shutdown(socket.SHUT_WR)
    print("OK " + s.recv(4096).decode())
except OSError as e:
    print("ERR " + (errno.errorcode.get(e.errno or 0) or "timeout"))
"""


def plain(place: Place, ip: object, port: int) -> str:
    cli = place.python(PLAIN, str(ip), str(port), stdout=subprocess.PIPE)
    assert cli.popen is not None
    out, _ = cli.popen.communicate(timeout=30)
    return str(out.decode().strip())


def spawn_agent(
    node: Node, c: Cluster, *, mesh: Path, work: Path, pin: Path, tag: str
) -> PodProcess:
    """The same `nodemesh run` command the other agents run, for one node."""
    with (work / f"agent-n{node.index}-{tag}.log").open("w") as log:
        return node.spawn(agent_argv(c, node, mesh, pin, work), stdout=log,
                          stderr=subprocess.STDOUT)


@pytest.fixture
def mesh_bed(tmp_path: Path) -> Iterator[tuple[Cluster, list[PodProcess], list[Path], Path]]:
    require_tool("bpftool")
    with live_agents(tmp_path, "agent outage test", pods_per_node=3) as live:
        yield live.cluster, live.agents, live.pins, tmp_path


def test_strict_pod_stays_closed_while_its_agent_is_killed_and_recovers_after_restart(
    mesh_bed: tuple[Cluster, list[PodProcess], list[Path], Path],
) -> None:
    c, agents, pins, work = mesh_bed
    node0, node1 = c.nodes
    frontend, backend, outsider = c.pod(0, 0), c.pod(0, 1), c.pod(0, 2)
    # Plaintext sources: another node across the underlay, this node's host netns, and a pod on
    # this node that is not in the mesh.
    sources: list[Place] = [node1, node0, outsider]
    assert _run_client(frontend, str(backend.ip), 8080, "x").startswith("OK backend got")
    for src in sources:  # STRICT with the agent up: the tunnel refuses plaintext
        assert not plain(src, backend.ip, 8080).startswith("OK backend")

    agents[0].popen.kill()  # type: ignore[union-attr]
    agents[0].wait()
    outage: list[str] = []
    for _round in range(4):  # spread over the outage
        outage += [plain(src, backend.ip, 8080) for src in sources]
        time.sleep(0.5)
    # Refused every time, at once (sk_lookup's drop makes TCP reset the SYN); the app saw none.
    assert outage == ["ERR ECONNREFUSED"] * len(outage), outage
    # Mesh traffic from the node's pods is captured and finds no tunnel: refused, not plaintext.
    assert _run_client(frontend, str(backend.ip), 8080, "x") == "ERR ECONNREFUSED"

    agents[0] = spawn_agent(node0, c, mesh=work / "mesh.yaml", work=work, pin=pins[0],
                            tag="restart")
    assert _wait_ready(node0, 15021), (work / "agent-n0-restart.log").read_text()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # enrollment and listeners come back with readiness
        out = _run_client(frontend, str(backend.ip), 8080, "x")
        if out.startswith("OK backend got"):
            break
        time.sleep(0.2)
    assert out.startswith("OK backend got"), out
    for src in sources:
        assert not plain(src, backend.ip, 8080).startswith("OK backend")
    assert cgroup_attachments(node0) == {p.name: 1 for p in CGROUP_PROGRAMS}
    for pod in (frontend, backend):
        assert sk_lookup_links(pod) == 1
    assert "adopted nm_connect4" in (work / "agent-n0-restart.log").read_text()
    # The drops during the outage waited in the pinned ring; the restarted agent logged them.
    deadline = time.monotonic() + 10
    drops: list[dict[str, object]] = []
    while time.monotonic() < deadline and len(drops) < len(outage):
        lines = (work / "flows-n0.log").read_text().splitlines()
        drops = [r for r in map(json.loads, lines) if r.get("reason") == "no_tunnel"]
        time.sleep(0.2)
    assert len(drops) >= len(outage), drops[-3:]
    assert {r["destination"]["workload"] for r in drops} == {"backend"}  # type: ignore[index]
    # The kernel's counters live in a pinned map too: the metric covers the whole outage.
    metrics = http_get(node0.netns, 15020, "/metrics")
    assert metrics is not None
    line = 'nodemesh_bpf_drops_total{reason="inbound_no_tunnel"} '
    counted = [float(x[len(line):]) for x in metrics.splitlines() if x.startswith(line)]
    assert counted and counted[0] >= len(outage), counted
