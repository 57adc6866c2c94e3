"""Where a local pod lives, and the protocol of the parts that find out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.model.mesh import Workload


class LocateError(LookupError):
    """A pod cannot be searched for at all (not merely "not there yet"); the message says why."""


@dataclass(frozen=True)
class PodPlacement:
    """A pod's network namespace and cgroup on this node.

    `netns_path` is a named netns (/var/run/netns/<name>) or /proc/<pid>/ns/net; the latter is
    valid only while that process lives, so open it (and hold the fd) promptly. `cgroup_path`
    is the pod-level cgroup v2 directory, None when it cannot be resolved. `pid`: a process of
    the pod, None when the pod has none yet (a test-bed pod before anything runs in it).
    """

    netns_path: str
    cgroup_path: Path | None
    pid: int | None

    # The names agent.runtime's Placement uses, so either shape can be handed on.
    @property
    def netns(self) -> str:
        return self.netns_path

    @property
    def cgroup(self) -> Path | None:
        return self.cgroup_path


class PodLocator(Protocol):
    def locate(self, workload: Workload) -> PodPlacement | None:
        """The pod's placement; None while it cannot be found yet (try again later)."""
        ...
