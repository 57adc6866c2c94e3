"""Robustness: denies survive a SIGKILLed agent, a restart adopts the pinned state without
duplicate attachments, and uninstall leaves the kernel as it was before the install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from peers import AGENT, CLIENT, SERVER
from prereq import require_tool

from agent.datapath import bpfsys, trust
from agent.datapath.datapath import CGROUP_PROGRAMS, Datapath
from agent.datapath.options import DEFAULT_PIN_ROOT, BuildOptions
from agent.testbed import Cluster


def bpftool_ids(kind: str) -> set[int]:
    out = subprocess.run(
        ["bpftool", "-j", kind, "show"], capture_output=True, text=True, check=True
    ).stdout
    return {int(o["id"]) for o in json.loads(out or "[]")}


def attached(cluster: Cluster) -> dict[str, int]:
    fd = os.open(cluster.nodes[0].cgroup_root, os.O_RDONLY)
    try:
        return {p.name: len(bpfsys.prog_query(fd, p.attach_type)) for p in CGROUP_PROGRAMS}
    finally:
        os.close(fd)


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    with Cluster(nodes=1, pods_per_node=2, description="restart test") as c:
        yield c


def start_agent(c: Cluster, pin: str) -> tuple[subprocess.Popen[str], str]:
    pod, target = c.pod(0, 0), c.pod(0, 1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            AGENT,
            str(c.nodes[0].cgroup_root),
            pin,
            pod.netns,
            str(pod.ip),
            str(target.ip),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def connect(c: Cluster) -> dict[str, str]:
    cli = c.pod(0, 0).python(CLIENT, str(c.pod(0, 1).ip), "8080", "x", stdout=subprocess.PIPE)
    assert cli.popen is not None
    out, _ = cli.popen.communicate(timeout=20)
    return dict(json.loads(out))


def test_sigkill_restart_adopt_and_uninstall(own_cluster: Cluster, datapath: Datapath) -> None:
    require_tool("bpftool")
    c = own_cluster
    server = c.pod(0, 1).python(SERVER, "p1", "8080", stdout=subprocess.PIPE)
    assert server.popen is not None and server.popen.stdout is not None
    assert server.popen.stdout.readline().strip() == b"ready"
    assert connect(c)["reply"].startswith("p1|")
    before = {k: bpftool_ids(k) for k in ("prog", "map")}
    pin = str(DEFAULT_PIN_ROOT / f"restart-{c.run_id}")
    procs = []
    try:
        first, actions = start_agent(c, pin)
        procs.append(first)
        n = len(CGROUP_PROGRAMS)
        assert actions.split(",")[:n] == [f"attached {p.name}" for p in CGROUP_PROGRAMS]
        assert connect(c) == {"errno": "EPERM"}
        first.kill()
        first.wait(10)
        # The agent is gone; pinned links and maps keep enforcing.
        assert connect(c) == {"errno": "EPERM"}
        second, actions = start_agent(c, pin)
        procs.append(second)
        n = len(CGROUP_PROGRAMS)
        assert actions.split(",")[:n] == [f"adopted {p.name}" for p in CGROUP_PROGRAMS]
        assert "adopted sklookup-" in actions
        # The killed agent's cgroup trust is replaced by the new agent's (same cgroup here).
        own_cg = trust.cgroup_id(trust.own_cgroup())
        assert f"untrusted cgroup {own_cg} of gone pid {first.pid}" in actions.split(",")
        assert actions.split(",")[-1] == f"trusted cgroup {own_cg}"
        assert attached(c) == {p.name: 1 for p in CGROUP_PROGRAMS}  # no duplicates
        assert connect(c) == {"errno": "EPERM"}
        second.kill()
        second.wait(10)
        removed = Datapath(
            c.nodes[0].cgroup_root, BuildOptions(pin_dir=DEFAULT_PIN_ROOT / f"restart-{c.run_id}")
        ).uninstall()
        assert any(r.startswith("link nm_connect4") for r in removed)
        assert attached(c) == {p.name: 0 for p in CGROUP_PROGRAMS}
        assert connect(c)["reply"].startswith("p1|")  # plain traffic again
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # programs and maps are freed after an RCU period
            after = {k: bpftool_ids(k) for k in ("prog", "map")}
            if after == before:
                break
            time.sleep(0.1)
        assert after == before
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            assert p.stdout is not None
            p.stdout.close()
