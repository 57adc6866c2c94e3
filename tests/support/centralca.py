"""A central `nodemesh ca serve` on the test bed, for agents that hold no signing key."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.testbed import Cluster, PodProcess

CA_PORT = 15012


@dataclass
class CentralCa:
    """`nodemesh ca serve` in a node's netns (tokens.yaml, placement.yaml in work); restartable."""

    work: Path
    root_cert: Path
    root_key: Path
    trust_domain: str = "cluster.local"
    node: int = 0  # whose netns it runs in, on that node's underlay address
    # How callers are authenticated and placed; default: the static tokens.yaml/placement.yaml
    # in work. The Istio-compatible mode passes --kube and its settings instead.
    mode_args: list[str] | None = None
    cluster: Cluster | None = None
    proc: PodProcess | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        assert self.cluster is not None
        return f"{self.cluster.nodes[self.node].ip}:{CA_PORT}"

    def log(self, n: int) -> str:
        return (self.work / f"ca-{n}.log").read_text()

    def start(self) -> None:
        assert self.cluster is not None and self.proc is None
        self.starts += 1
        argv = [sys.executable, "-m", "agent.cli", "ca", "serve", "--listen", self.address,
                "--root-cert", str(self.root_cert), "--root-key", str(self.root_key),
                "--trust-domain", self.trust_domain,
                *(self.mode_args if self.mode_args is not None else
                  ["--tokens", str(self.work / "tokens.yaml"),
                   "--workloads", str(self.work / "placement.yaml")])]
        with (self.work / f"ca-{self.starts}.log").open("w") as out:
            self.proc = self.cluster.nodes[self.node].spawn(argv, stdout=out,
                                                            stderr=subprocess.STDOUT)
        wait_for(lambda: "listening on" in self.log(self.starts), "the CA to listen",
                 lambda: self.log(self.starts))

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.stop(grace=10)
        self.proc = None


def wait_for(cond: Callable[[], bool], what: str, detail: Callable[[], str] = lambda: "",
             timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"gave up waiting for {what}: {detail()}"
        time.sleep(0.2)
