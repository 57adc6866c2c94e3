"""KubernetesLocator: a pod's netns and cgroup on a real node, found from its processes.

The agent runs with the host PID namespace (DaemonSet `hostPID: true`), so every pod's processes
are in /proc. A process whose /proc/<pid>/cgroup names the pod's UID (see podcgroup) belongs to
the pod; all of a pod's containers share one netns, so any of them will do (the pause process or
an app container alike) and /proc/<pid>/ns/net is the pod's netns. Two kinds of process share the
pod's cgroup but not its netns and are skipped: runtime helpers (CRI-O's conmon) and anything in
the host netns (an in-mesh pod never uses the host network).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

from agent.enroll.placement import LocateError, PodPlacement
from agent.enroll.podcgroup import PodMatch, is_runtime_helper, kubelet_match, unified_path
from agent.host import cgroup
from agent.model.mesh import Workload

log = logging.getLogger(__name__)

MatchFor = Callable[[Workload], PodMatch]


def match_by_pod_uid(workload: Workload) -> PodMatch:
    """The kubelet's layout: the pod cgroup is named after the pod's metadata.uid."""
    if not workload.k8s_uid:
        raise LocateError(f"workload {workload.ref} has no Kubernetes pod UID (it does not come "
                          "from the Kubernetes source), so its processes cannot be recognised")
    return kubelet_match(workload.k8s_uid)


class KubernetesLocator:
    def __init__(self, *, match_for: MatchFor = match_by_pod_uid, proc: Path = Path("/proc"),
                 cgroup_mount: Path | None = None,
                 pids: Callable[[], Iterable[int]] = psutil.pids) -> None:
        """`match_for` says which cgroup paths are the workload's pod (kubelet layout by
        default); `proc`, `cgroup_mount` and `pids` are the host's unless a test gives others."""
        self.match_for = match_for
        self.proc = proc
        self._mount = cgroup_mount
        self._pids = pids

    def locate(self, workload: Workload) -> PodPlacement | None:
        return self.find(self.match_for(workload))

    def find(self, match: PodMatch) -> PodPlacement | None:
        """The first live process (lowest PID) that `match` accepts and that is in a netns other
        than the host's; None if there is none yet."""
        host = self._netns_id(1)
        for pid in sorted(self._pids()):
            try:
                text = (self.proc / str(pid) / "cgroup").read_text(encoding="utf-8")
            except OSError:
                continue  # exited meanwhile
            path = unified_path(text)
            if path is None or is_runtime_helper(path):
                continue
            pod_cgroup = match(path)
            if pod_cgroup is None:
                continue
            ns = self._netns_id(pid)
            if ns is None or ns == host:
                continue  # exiting (its netns is gone), or a helper in the host netns
            return PodPlacement(str(self.proc / str(pid) / "ns" / "net"),
                                self._resolve(pod_cgroup), pid)
        return None

    def _netns_id(self, pid: int) -> tuple[int, int] | None:
        try:
            st = os.stat(self.proc / str(pid) / "ns" / "net")
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _mount_point(self) -> Path | None:
        if self._mount is None:
            try:
                self._mount = cgroup.mount_point()
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                return None
        return self._mount

    def _resolve(self, pod_cgroup: str) -> Path | None:
        """The pod cgroup's directory. A path seen through a private cgroup namespace starts
        with ".." components (relative to the agent's own cgroup); then the pod's directory is
        looked for at most two levels below the root, where the kubelet puts it."""
        mount = self._mount_point()
        if mount is None:
            return None
        parts = [p for p in pod_cgroup.split("/") if p]
        if ".." not in parts:
            return mount.joinpath(*parts)
        tail = [p for p in parts if p != ".."]
        for base in (mount, *mount.glob("*/"), *mount.glob("*/*/")):
            candidate = base.joinpath(*tail)
            if candidate.is_dir():
                return candidate
        log.warning("pod cgroup %s (seen from a private cgroup namespace) not found under %s; "
                    "run the agent in the host cgroup namespace", pod_cgroup, mount)
        return None
