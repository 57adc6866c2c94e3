"""`nodemesh uninstall` after an agent died: every pin goes, the cgroup has no programs left,
the kernel frees what the agent loaded, and the pod's traffic flows unmeshed again."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import AGENT, CLIENT, SERVER
from prereq import require_root, require_tool, requires

from agent.cli import main
from agent.datapath.datapath import CGROUP_PROGRAMS
from agent.testbed import Cluster


def bpftool(*args: str) -> object:
    out = subprocess.run(
        ["bpftool", "-j", *args], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip() or "[]")


def ids(kind: str) -> set[int]:
    listed = bpftool(kind, "show")
    assert isinstance(listed, list)
    return {int(o["id"]) for o in listed}


def cgroup_programs(cg: Path) -> list[object]:
    listed = bpftool("cgroup", "show", str(cg))
    assert isinstance(listed, list)
    return listed


@pytest.fixture
def bed() -> Iterator[Cluster]:
    require_root()
    require_tool("bpftool")
    requires(Path("/sys/fs/bpf").is_mount(), "bpffs is not mounted at /sys/fs/bpf")
    with Cluster(nodes=1, pods_per_node=2, description="uninstall cli test") as c:
        yield c


def connect(c: Cluster) -> dict[str, str]:
    cli = c.pod(0, 0).python(CLIENT, str(c.pod(0, 1).ip), "8080", "x", stdout=subprocess.PIPE)
    assert cli.popen is not None
    out, _ = cli.popen.communicate(timeout=20)
    return dict(json.loads(out))


def test_uninstall_pin_dir_removes_what_a_killed_agent_left(
    bed: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    c = bed
    cg = c.nodes[0].cgroup_root
    root = Path("/sys/fs/bpf") / f"nodemesh-uninstall-{c.run_id}"
    pin = root / "default"
    server = c.pod(0, 1).python(SERVER, "p1", "8080", stdout=subprocess.PIPE)
    assert server.popen is not None and server.popen.stdout is not None
    assert server.popen.stdout.readline().strip() == b"ready"
    before = {k: ids(k) for k in ("prog", "map", "link")}
    # The agent installs, enrolls pod 0 (an sk_lookup link in its netns), denies pod 1, dies.
    agent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            AGENT,
            str(cg),
            str(pin),
            c.pod(0, 0).netns,
            str(c.pod(0, 0).ip),
            str(c.pod(0, 1).ip),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        assert "attached nm_connect4" in agent.stdout.readline()
        agent.kill()
        agent.wait(10)
        assert connect(c) == {"errno": "EPERM"}  # the pins keep enforcing without the agent
        assert len(cgroup_programs(cg)) == len(CGROUP_PROGRAMS)
        links = sorted(p.name for p in (pin / "links").iterdir())
        assert any(n.startswith("sklookup-") for n in links)

        capsys.readouterr()
        assert main(["uninstall", "--pin-dir", str(pin)]) == 0
        out = capsys.readouterr().out
        for name in links:
            assert f"link {name}" in out
        assert "map " in out

        assert not pin.exists()
        assert cgroup_programs(cg) == []
        assert connect(c)["reply"].startswith("p1|")  # plain traffic again
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # programs, maps, links are freed after RCU
            after = {k: ids(k) for k in ("prog", "map", "link")}
            if after == before:
                break
            time.sleep(0.1)
        assert after == before

        # --all finds nothing left under this root and removes the empty root itself.
        assert main(["uninstall", "--all", "--pin-root", str(root)]) == 0
        assert "no nodemesh instances" in capsys.readouterr().out
        assert not root.exists()
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait()
        assert agent.stdout is not None
        agent.stdout.close()
        if pin.exists():  # a failed assertion above: leave no pins behind
            main(["uninstall", "--pin-dir", str(pin)])
        if root.exists():
            root.rmdir()


def test_uninstall_refuses_a_directory_outside_bpffs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = tmp_path / "default" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("not a pin")
    assert main(["uninstall", "--pin-dir", str(keep.parent)]) == 2
    assert "not bpffs" in capsys.readouterr().err
    assert main(["uninstall", "--all", "--pin-root", str(tmp_path)]) == 2
    assert keep.read_text() == "not a pin"  # nothing deleted
