"""Operator views of a running mesh (real agents on the test bed): `nodemesh posture` against the
admin endpoint, and the live flow map in a headless browser."""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prereq import require_root

from agent.cli import main
from agent.config import DEFAULT_PIN_ROOT
from agent.datapath.datapath import Datapath
from agent.datapath.options import BuildOptions
from agent.host import netns
from agent.runtime.demo import EXAMPLE, SERVER, _run_client, _start_agents, _wait_ready
from agent.testbed import Cluster


@dataclass
class Mesh:
    cluster: Cluster
    work: Path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The demo mesh on two nodes with backend:8080 and db:5432 serving."""
    require_root()
    work = tmp_path_factory.mktemp("operator-views")
    with Cluster(nodes=2, pods_per_node=2, description="operator views e2e") as c:
        pins = [DEFAULT_PIN_ROOT / f"demo-{c.run_id}-n{n.index}" for n in c.nodes]
        agents = _start_agents(c, argparse.Namespace(config=EXAMPLE), work, pins)
        try:
            for node in c.nodes:
                assert _wait_ready(node, 15021), (work / f"agent-n{node.index}.log").read_text()
            for pod, name, port in ((c.pod(0, 1), "backend", "8080"), (c.pod(1, 0), "db", "5432")):
                server = pod.python(SERVER, name, port, stdout=subprocess.PIPE)
                assert server.popen is not None and server.popen.stdout is not None
                server.popen.stdout.readline()
            yield Mesh(c, work)
        finally:
            for a in agents:
                a.stop(grace=10)
            for pin in pins:
                Datapath(c.nodes[0].cgroup_root, BuildOptions(pin_dir=pin)).uninstall()


def test_posture_of_a_running_agent(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    c = mesh.cluster
    assert _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x").startswith("OK")
    assert _run_client(c.pod(0, 0), str(c.pod(1, 0).ip), 5432, "x") == "ERR EPERM"
    with netns.entered(c.nodes[0].netns):
        rc = main(["posture", "--json"])  # the default admin address, as an operator runs it
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out)
    assert report["source"] == {"kind": "agent", "node": "node0"}
    assert {(f["check"], f["subject"]) for f in report["findings"]} == {
        ("mtls-permissive", "tools"),
        ("open-workload", "shop/frontend"),
        ("open-workload", "tools/debug"),
        ("recent-denies", "shop/frontend -> shop/db:5432"),
    }
    # node0 runs frontend and backend: their certificates, and the embedded CA's root.
    certs = {(x["kind"], x["subject"], x["state"]) for x in report["certificates"]}
    assert ("workload", "spiffe://cluster.local/ns/shop/sa/frontend", "ok") in certs
    assert ("workload", "spiffe://cluster.local/ns/shop/sa/backend", "ok") in certs
    assert [k for k, _, _ in certs].count("root") == 1
    assert report["rate_limits"] == {"supported": False, "in_force": []}
    assert report["inventory"]["flows_examined"] >= 2
    with netns.entered(c.nodes[0].netns):
        assert main(["posture", "--admin", "127.0.0.1:15000"]) == 0
    assert "[INFO] 1 connection(s) refused shop/frontend -> shop/db:5432" in \
        capsys.readouterr().out
