"""Real agents on a test bed: one `nodemesh run` per node of a fresh Cluster, reading one mesh
file in the test's work directory that the test may rewrite.

Pins come from `Cluster.pin_dir`, so a crashed run's pins are found by `testbed cleanup`; on the
way out the agents are stopped and every pin directory is uninstalled.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prereq import require_root

from agent.commands.demo import EXAMPLE, SERVER, _wait_ready, agent_argv
from agent.datapath.datapath import Datapath
from agent.datapath.options import BuildOptions
from agent.runtime.certs import load_or_create_authority
from agent.testbed import Cluster, PodProcess

# (node, pod, name, port) of a line-echo server started once the agents are ready.
Server = tuple[int, int, str, str]
BACKEND: Server = (0, 1, "backend", "8080")


@dataclass
class LiveMesh:
    cluster: Cluster
    mesh: Path  # the file the agents read
    work: Path  # agent-n<i>.log, flows-n<i>.log, ca/
    agents: list[PodProcess]
    pins: list[Path]

    def log(self, node: int) -> str:
        return (self.work / f"agent-n{node}.log").read_text()


@contextmanager
def live_mesh(work: Path, description: str, *, mesh_text: str | None = None,
              pods_per_node: int = 2, extra: Sequence[str] = (),
              per_node: Callable[[int], Sequence[str]] = lambda _: (),
              servers: Sequence[Server] = (BACKEND,), embedded_ca: bool = True,
              before_agents: Callable[[Cluster], None] = lambda _: None) -> Iterator[LiveMesh]:
    """Two agents (the demo's command line plus `extra` and `per_node(i)`) on a two-node test
    bed, ready, with `servers` listening; the mesh file is the demo's unless `mesh_text`.
    Without `embedded_ca` no root key is made: `before_agents` (run once the bed is up) starts
    the CA the agents are pointed at and writes its root to work/ca/root-cert.pem."""
    require_root()
    mesh = work / "mesh.yaml"
    mesh.write_text(EXAMPLE.read_text() if mesh_text is None else mesh_text)
    ca_cert = work / "ca" / "root-cert.pem"
    if embedded_ca:
        load_or_create_authority(ca_cert, ca_cert.with_name("root-key.pem"), "cluster.local")
    with Cluster(nodes=2, pods_per_node=pods_per_node, description=description) as c:
        pins = [c.pin_dir(n.index, "demo") for n in c.nodes]
        agents: list[PodProcess] = []
        try:
            before_agents(c)
            for node, pin in zip(c.nodes, pins, strict=True):
                argv = agent_argv(c, node, mesh, pin, work, extra=[*extra, *per_node(node.index)])
                with (work / f"agent-n{node.index}.log").open("w") as log:
                    agents.append(node.spawn(argv, stdout=log, stderr=subprocess.STDOUT))
            for node in c.nodes:
                assert _wait_ready(node, 15021), (work / f"agent-n{node.index}.log").read_text()
            for n, p, name, port in servers:
                server = c.pod(n, p).python(SERVER, name, port, stdout=subprocess.PIPE)
                assert server.popen is not None and server.popen.stdout is not None
                server.popen.stdout.readline()
            yield LiveMesh(c, mesh, work, agents, pins)
        finally:
            for a in agents:
                a.stop(grace=10)
            for pin in pins:
                Datapath(c.nodes[0].cgroup_root, BuildOptions(pin_dir=pin)).uninstall()
