"""The agent runtime on the test bed: the demo end to end, and live policy file changes."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prereq import require_root

from agent.cli import main
from agent.config import DEFAULT_PIN_ROOT
from agent.datapath.datapath import Datapath
from agent.datapath.options import BuildOptions
from agent.host import cgroup, netns
from agent.runtime.demo import EXAMPLE, SERVER, _run_client, _start_agents, _wait_ready
from agent.testbed import Cluster


def leftovers() -> dict[str, set[str]]:
    pins = set(os.listdir(DEFAULT_PIN_ROOT)) if DEFAULT_PIN_ROOT.exists() else set()
    return {"netns": set(netns.list_named()), "pins": {p for p in pins if p.startswith("demo-")},
            "cgroups": {d.name for d in cgroup.mount_point().iterdir() if d.is_dir()}}


def test_demo_passes_and_leaves_nothing_behind(capsys: pytest.CaptureFixture[str]) -> None:
    require_root()
    before = leftovers()
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "demo passed" in out
    assert "ENCRYPTED" in out
    results = re.findall(r"^\S+ -> \S+\s+(allowed|denied)\s", out, re.MULTILINE)
    assert results == ["allowed", "allowed", "denied", "denied", "denied"]
    assert leftovers() == before


@pytest.fixture
def live_mesh(tmp_path: Path) -> Iterator[tuple[Cluster, Path, Path]]:
    """Two agents on a two-node test bed, reading a mesh file the test may rewrite."""
    require_root()
    mesh = tmp_path / "mesh.yaml"
    shutil.copy(EXAMPLE, mesh)
    with Cluster(nodes=2, pods_per_node=2, description="runtime test") as c:
        pins = [DEFAULT_PIN_ROOT / f"demo-{c.run_id}-n{n.index}" for n in c.nodes]
        agents = _start_agents(c, argparse.Namespace(config=mesh), tmp_path, pins)
        try:
            for node in c.nodes:
                assert _wait_ready(node, 15021), (tmp_path / f"agent-n{node.index}.log").read_text()
            server = c.pod(0, 1).python(SERVER, "backend", "8080", stdout=subprocess.PIPE)
            assert server.popen is not None and server.popen.stdout is not None
            server.popen.stdout.readline()
            yield c, mesh, tmp_path
        finally:
            for a in agents:
                a.stop(grace=10)
            for pin in pins:
                Datapath(c.nodes[0].cgroup_root, BuildOptions(pin_dir=pin)).uninstall()


def until(c: Cluster, want: str, limit: float = 20.0) -> float:
    """Seconds until frontend->backend gives `want` (polled; the limit only stops a hang)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        out = _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x")
        if out.startswith(want):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"frontend->backend never became {want!r}; last: {out}")


def test_policy_file_changes_apply_and_a_broken_file_keeps_the_last_good_policy(
        live_mesh: tuple[Cluster, Path, Path]) -> None:
    c, mesh, work = live_mesh
    assert _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x").startswith("OK")
    good = mesh.read_text()
    # Drop the rule that lets frontend in: frontend -> backend becomes denied (EPERM).
    assert "backend-allow-frontend" in good
    denied = good.replace("name: backend-allow-frontend", "name: backend-allow-nobody").replace(
        '"cluster.local/ns/shop/sa/frontend"', '"cluster.local/ns/x/sa/y"')
    assert denied != good
    mesh.write_text(denied)
    took = until(c, "ERR EPERM")
    print(f"policy change enforced after {took:.2f}s")
    # A broken file: rejected with a logged error, the last good policy (deny) stays.
    mesh.write_text(denied + "\n---\nkind: AuthorizationPolicy\nbroken: [\n")
    time.sleep(1.5)
    assert _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x") == "ERR EPERM"
    log = (work / "agent-n0.log").read_text()
    assert "mesh.yaml" in log and "error" in log.lower()
    # Fixing the file restores the allow.
    mesh.write_text(good)
    until(c, "OK")
