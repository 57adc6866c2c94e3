"""Fail closed on the way out: long-running commands stopped with SIGTERM tear down as on Ctrl-C,
and `nodemesh testbed cleanup` removes everything a SIGKILLed run left, its pins and the programs
linked there included.

A run's objects are told apart from other runs on the machine by its run id (netns, cgroup, pin
names) and, for BPF links, by the cgroup ids and netns inodes of that run.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil
import pytest
from prereq import require_root, require_tool, requires

from agent.commands.demo import EXAMPLE, _start_agents, _wait_ready
from agent.host import cgroup, netns
from agent.testbed import Cluster, registry
from agent.testbed.addressing import PREFIX

NODEMESH = [sys.executable, "-m", "agent.cli"]


@pytest.fixture(autouse=True)
def _prereqs() -> None:
    require_root()
    require_tool("bpftool")
    requires(Path("/sys/fs/bpf").is_mount(), "bpffs is not mounted at /sys/fs/bpf")


def bpftool(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True,
                         check=True).stdout
    listed = json.loads(out.strip() or "[]")
    assert isinstance(listed, list)
    return listed


class Lines:
    """A child's output, read by a thread, so waits for a line are bounded."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._t = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._t.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float = 240.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(self.seen)}")

    def rest(self) -> str:
        self._t.join(timeout=30)
        while (line := self._q.get_nowait() if not self._q.empty() else None) is not None:
            self.seen.append(line)
        return "".join(self.seen)


# Listings race with the teardown they watch: what vanished meanwhile counts as gone.
def _procs(cg: Path) -> list[int]:
    try:
        return cgroup.procs(cg)
    except OSError:
        return []


def _started(pid: int) -> tuple[int, float] | None:
    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _ino(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


@dataclass
class RunObjects:
    """What one test-bed run has on the machine now."""

    run_id: str
    netns: set[str] = field(default_factory=set)
    cgroups: set[Path] = field(default_factory=set)
    pins: set[str] = field(default_factory=set)
    links: dict[int, int] = field(default_factory=dict)  # link id -> program id
    pids: set[tuple[int, float]] = field(default_factory=set)  # (pid, start time)
    state_file: bool = False

    @classmethod
    def now(cls, run_id: str, known: RunObjects | None = None) -> RunObjects:
        """The run's objects; links also by the cgroup ids / netns inodes in `known` (a listing
        taken while the run was up: after teardown its cgroups and netns are gone)."""
        ns = {n for n in netns.list_named() if n.startswith(f"{PREFIX}{run_id}")}
        top = cgroup.mount_point() / f"{PREFIX}{run_id}"
        cgs = {Path(d) for d, _sub, _files in os.walk(top)}  # os.walk skips what vanishes
        pins = ({p.name for p in registry.PIN_ROOT.iterdir() if run_id in p.name}
                if registry.PIN_ROOT.is_dir() else set())
        pids = {p for cg in cgs for pid in _procs(cg) if (p := _started(pid))}
        cg_ids = {i for c in cgs if (i := _ino(c))} | (known.cgroup_ids if known else set())
        ns_inos = {i for n in ns if (i := _ino(netns.path_of(n)))} | (
            known.netns_inos if known else set())
        links = {int(str(lk["id"])): int(str(lk["prog_id"])) for lk in bpftool("link", "show")
                 if lk.get("cgroup_id") in cg_ids or lk.get("netns_ino") in ns_inos}
        if known is not None:  # a link whose cgroup or netns went away shows neither field
            live = {int(str(lk["id"])) for lk in bpftool("link", "show")}
            links.update({i: p for i, p in known.links.items() if i in live})
        rec = cls(run_id, ns, cgs, pins, links, pids, registry.record_path(run_id).exists())
        rec.cgroup_ids, rec.netns_inos = cg_ids, ns_inos
        return rec

    cgroup_ids: set[int] = field(default_factory=set)
    netns_inos: set[int] = field(default_factory=set)

    def live_pids(self) -> set[int]:
        alive = set()
        for pid, started in self.pids:
            try:
                if psutil.Process(pid).create_time() == started:
                    alive.add(pid)
            except psutil.NoSuchProcess:
                continue
        return alive

    def assert_gone(self, during: RunObjects) -> None:
        assert not self.netns, self.netns
        assert not self.cgroups, self.cgroups
        assert not self.pins, self.pins
        assert not self.links, self.links
        assert not self.state_file
        assert not during.live_pids(), during.live_pids()
        # Programs the run's links held are freed once the links are (after an RCU grace).
        deadline = time.monotonic() + 20
        progs = set(during.links.values())
        while time.monotonic() < deadline:
            left = progs & {int(str(p["id"])) for p in bpftool("prog", "show")}
            if not left:
                break
            time.sleep(0.2)
        assert not left, f"programs still loaded: {left}"


def machine() -> dict[str, set[str]]:
    pins = set(os.listdir(registry.PIN_ROOT)) if registry.PIN_ROOT.is_dir() else set()
    return {"netns": set(netns.list_named()), "pins": pins,
            "cgroups": {d.name for d in cgroup.mount_point().iterdir() if d.is_dir()}}


def nothing_new_of(run_id: str, before: dict[str, set[str]]) -> None:
    """Compared with the listing before: nothing of this run was added (other helpers' runs may
    come and go on the machine meanwhile)."""
    after = machine()
    for kind, names in after.items():
        assert not {n for n in names - before[kind] if run_id in n}, (kind, names - before[kind])


@pytest.fixture
def demo() -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    """`nodemesh demo --keep`, up and idle; killed (and its run cleaned up) if a test fails."""
    proc = subprocess.Popen([*NODEMESH, "demo", "--keep"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = Lines(proc.stdout)
    run_id = ""
    try:
        run_id = lines.wait_for(r"^test bed (\w+):").group(1)
        lines.wait_for(r"kept running")
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
        proc.stdout.close()
        if run_id:
            registry.teardown_run(run_id)


def test_demo_keep_sigterm_tears_everything_down(
        demo: tuple[subprocess.Popen[str], Lines]) -> None:
    proc, lines = demo
    run_id = re.search(r"test bed (\w+):", "".join(lines.seen)).group(1)  # type: ignore[union-attr]
    before = machine()
    during = RunObjects.now(run_id)
    assert len(during.netns) == 7 and during.cgroups  # underlay, 2 nodes, 4 pods
    assert during.pins == {f"demo-{run_id}-n0", f"demo-{run_id}-n1"}
    assert any(lk for lk in during.links), "the agents' links are attached"
    assert during.pids, "agents and servers run in the run's cgroups"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(180) == 0, lines.rest()  # exits by itself, 0 as after Ctrl-C
    out = lines.rest()
    assert "demo passed" in out
    assert "Traceback" not in out
    RunObjects.now(run_id, during).assert_gone(during)
    nothing_new_of(run_id, before)


def test_demo_sigterm_while_starting_tears_down_and_exits_143() -> None:
    """A signal before the demo is up (agents starting, steps running) also tears down."""
    before = machine()
    proc = subprocess.Popen([*NODEMESH, "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = Lines(proc.stdout)
    run_id = ""
    try:
        run_id = lines.wait_for(r"^test bed (\w+):").group(1)
        during = RunObjects.now(run_id)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(180) == 128 + signal.SIGTERM, lines.rest()
        out = lines.rest()
        assert "demo stopped by SIGTERM; torn down" in out
        assert "Traceback" not in out
        RunObjects.now(run_id, during).assert_gone(during)
        nothing_new_of(run_id, before)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
        proc.stdout.close()
        if run_id:
            registry.teardown_run(run_id)


def test_sigkilled_demo_is_removed_by_testbed_cleanup_pins_and_links_included(
        demo: tuple[subprocess.Popen[str], Lines]) -> None:
    proc, lines = demo
    run_id = re.search(r"test bed (\w+):", "".join(lines.seen)).group(1)  # type: ignore[union-attr]
    before = machine()
    during = RunObjects.now(run_id)
    assert during.pins and during.links and during.pids

    proc.kill()  # no teardown at all: everything of the run stays
    proc.wait(30)
    left = RunObjects.now(run_id, during)
    assert left.pins == during.pins and left.links and left.live_pids()
    # Found even without the state file: by name, and the pins by their owner marker.
    registry.forget(run_id)

    done = subprocess.run([*NODEMESH, "testbed", "cleanup"], capture_output=True, text=True,
                          check=False, timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"run {run_id}: removed" in done.stdout
    for pin in during.pins:
        assert f"pins {registry.PIN_ROOT / pin}" in done.stdout
    assert "link " in done.stdout
    RunObjects.now(run_id, during).assert_gone(during)
    nothing_new_of(run_id, before)


def test_testbed_up_sigterm_mid_build_removes_the_partial_cluster() -> None:
    before = machine()
    # A big cluster, so the build is still going when the signal comes.
    proc = subprocess.Popen([*NODEMESH, "testbed", "up", "--nodes", "12", "--pods-per-node",
                             "12"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = ""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not run_id and proc.poll() is None:
            new = {n for n in netns.list_named() if n.startswith(PREFIX)} - before["netns"]
            run_id = next(iter(new), "")[len(PREFIX):len(PREFIX) + 6]
            time.sleep(0.02)
        assert run_id, "the build never started"
        during = RunObjects.now(run_id)
        assert during.netns
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 128 + signal.SIGTERM, (out, err)
        assert f"stopped by SIGTERM; run {run_id} removed" in err
        assert "Traceback" not in err
        RunObjects.now(run_id, during).assert_gone(during)
        nothing_new_of(run_id, before)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if run_id:
            registry.teardown_run(run_id)


def test_run_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    """`nodemesh run` exits 0 by itself after its drain; its pins stay by design (they keep
    enforcing across restarts) and go with the run's teardown."""
    with Cluster(nodes=1, pods_per_node=2, description="run sigterm test") as c:
        pin = c.pin_dir(0, "sigterm")
        (agent,) = _start_agents(c, argparse.Namespace(config=EXAMPLE), tmp_path, [pin],
                                 ("--drain-seconds", "1"))
        log = tmp_path / "agent-n0.log"
        try:
            assert _wait_ready(c.nodes[0], 15021), log.read_text()
            os.kill(agent.pid, signal.SIGTERM)
            assert agent.wait(60) == 0, log.read_text()
            text = log.read_text()
            assert "shutting down: draining the tunnel" in text
            assert "Traceback" not in text
            assert pin.is_dir()
        finally:
            agent.stop(grace=10)
        during = RunObjects.now(c.run_id)
        assert during.pins == {pin.name} and during.links
    RunObjects.now(c.run_id, during).assert_gone(during)
