"""One node's `nodemesh run` agent as a replaceable process, and `replace_agent`.

The soak (benchmarks/soak.py) replaces a running agent once. Two ways:
  surge  (default; DaemonSet maxSurge 1, maxUnavailable 0): a new agent starts beside the old one
         with the same pin directory, becomes ready, then the old one gets SIGTERM and drains.
         Both run in the node's netns, so the new one gets its own admin/metrics/readiness ports.
  plain  SIGTERM the old agent, wait until it has exited, then start the new one: connections in
         between are refused (fail closed), the caller counts them as "during restart".
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from agent.commands.demo import _wait_ready, agent_argv, http_get
from agent.testbed import Cluster, PodProcess
from agent.testbed.cluster import Node

RESTART_MODES = ("surge", "plain")


class AgentError(RuntimeError):
    """An agent did not start, become ready or stop."""


@dataclass(frozen=True)
class Ports:
    """The node-netns ports one agent answers on."""

    admin: int = 15000
    metrics: int = 15020
    ready: int = 15021

    def shifted(self) -> Ports:
        """Another set, so an agent can run beside this one in the same netns (surge)."""
        step = 100 if self.admin == 15000 else -100
        return Ports(self.admin + step, self.metrics + step, self.ready + step)

    def flags(self) -> list[str]:
        return ["--admin-addr", f"127.0.0.1:{self.admin}",
                "--metrics-addr", f"0.0.0.0:{self.metrics}",
                "--readiness-addr", f"0.0.0.0:{self.ready}"]


@dataclass(frozen=True)
class AgentSpec:
    """Everything a node's agent is started with; a replacement reuses it (same pin dir)."""

    cluster: Cluster
    node: Node
    mesh: Path
    pin: Path
    work: Path
    extra: tuple[str, ...] = ()
    drain_seconds: float = 5.0


@dataclass
class RunningAgent:
    spec: AgentSpec
    proc: PodProcess
    ports: Ports
    log: Path
    started: float  # time.monotonic()

    def metrics(self) -> str | None:
        return http_get(self.spec.node.netns, self.ports.metrics, "/metrics")

    def stop(self) -> None:
        """SIGTERM; SIGKILL only if the drain did not end well after its deadline."""
        self.proc.stop(grace=self.spec.drain_seconds + 15)


def spawn_agent(spec: AgentSpec, ports: Ports = Ports(), tag: str = "") -> RunningAgent:
    """Start the node's agent (the demo's command line plus `spec.extra`); not yet ready."""
    log = spec.work / f"agent-n{spec.node.index}{tag}.log"
    argv = agent_argv(spec.cluster, spec.node, spec.mesh, spec.pin, spec.work,
                      extra=[*spec.extra, "--drain-seconds", str(spec.drain_seconds),
                             *ports.flags()])
    with log.open("w") as out:
        proc = spec.node.spawn(argv, stdout=out, stderr=subprocess.STDOUT)
    return RunningAgent(spec, proc, ports, log, time.monotonic())


def wait_ready(agent: RunningAgent, timeout: float = 120) -> None:
    """Until the agent's /healthz/ready answers 200; stops it and raises AgentError if not."""
    if _wait_ready(agent.spec.node, agent.ports.ready, timeout=timeout):
        return
    code = agent.proc.poll()
    agent.proc.stop(grace=5)
    state = f"exited {code}" if code is not None else f"not ready in {timeout:.0f}s"
    raise AgentError(f"agent on node{agent.spec.node.index} {state}; its log:\n"
                     f"{agent.log.read_text()[-3000:]}")


def start_agents(specs: Sequence[AgentSpec]) -> list[RunningAgent]:
    """One agent per spec, all started before waiting for any (they come up in parallel)."""
    agents = [spawn_agent(spec) for spec in specs]
    try:
        for a in agents:
            wait_ready(a)
    except AgentError:
        for a in agents:
            a.stop()
        raise
    return agents


@dataclass(frozen=True)
class Replacement:
    """A finished replacement; times from time.monotonic()."""

    agent: RunningAgent  # the new one
    began: float
    ready: float  # the new agent answered ready
    ended: float  # and the old one has exited


def replace_agent(old: RunningAgent, mode: str = "surge", tag: str = "-new",
                  extra: Sequence[str] | None = None,
                  on_spawn: Callable[[RunningAgent], None] = lambda _: None) -> Replacement:
    """Replace `old` by a new agent on the same node with the same pin dir (`extra` replaces the
    command line's extra flags, e.g. a previous version's for a rollback; `on_spawn` sees the new
    agent as soon as its process exists). A surge whose new agent never becomes ready leaves the
    old one running and raises AgentError."""
    if mode not in RESTART_MODES:
        raise ValueError(f"restart mode {mode!r}: want one of {', '.join(RESTART_MODES)}")
    spec = old.spec if extra is None else replace(old.spec, extra=tuple(extra))
    began = time.monotonic()
    if mode == "surge":
        new = spawn_agent(spec, old.ports.shifted(), tag)
        on_spawn(new)
        wait_ready(new)
        ready = time.monotonic()
        old.stop()
        return Replacement(new, began, ready, time.monotonic())
    old.stop()
    new = spawn_agent(spec, old.ports, tag)
    on_spawn(new)
    wait_ready(new)
    ended = time.monotonic()
    return Replacement(new, began, ended, ended)


__all__ = ["RESTART_MODES", "AgentError", "AgentSpec", "Ports", "Replacement", "RunningAgent",
           "replace_agent", "spawn_agent", "start_agents", "wait_ready"]
