"""Recognising a pod's processes by their cgroup (pure: parses /proc/<pid>/cgroup text).

The kubelet puts every pod in a cgroup named after the pod's UID, below its QoS class:

- cgroupfs driver: /kubepods/pod<uid>/<container> (Guaranteed),
  /kubepods/burstable/pod<uid>/..., /kubepods/besteffort/pod<uid>/...
- systemd driver: /kubepods.slice/kubepods-pod<uid_>.slice/<runtime>-<id>.scope (Guaranteed),
  /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/..., likewise
  besteffort; systemd unit names cannot hold "-" inside a component, so the UID's dashes
  become underscores.

A match function takes a process's cgroup v2 path (as /proc/<pid>/cgroup shows it) and returns
the pod's own cgroup (that path cut after the pod's component), or None if the process is not
the pod's. `kubelet_match` serves real nodes, `subtree_match` any fixed layout (the test bed).
"""

from __future__ import annotations

import re
from collections.abc import Callable

PodMatch = Callable[[str], str | None]

_SYSTEMD_POD = re.compile(r"kubepods(?:-besteffort|-burstable)?-pod([0-9A-Za-z_]+)\.slice")
_CGROUPFS_POD = re.compile(r"pod([0-9A-Za-z-]+)")
# Runtime helpers that may live in the pod's cgroup but not in its netns (CRI-O's conmon with
# conmon_cgroup = "pod").
HELPER_PREFIXES = ("crio-conmon-",)


def unified_path(proc_cgroup: str) -> str | None:
    """The cgroup v2 path from /proc/<pid>/cgroup text (its `0::` line); None if there is none
    (a cgroup v1 only host, which nodemesh does not support)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return None


def pod_uid_of(path: str) -> str | None:
    """The pod UID named in a cgroup v2 path (dashed form), None outside any pod cgroup.

    The pod component must sit below a kubepods one, or below ".." (a path seen from a private
    cgroup namespace, where the kubepods ancestors are not shown)."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if not any(p.startswith("kubepods") or p == ".." for p in parts[:i]):
            continue
        m = _SYSTEMD_POD.fullmatch(part)
        if m:
            return m.group(1).replace("_", "-")
        m = _CGROUPFS_POD.fullmatch(part)
        if m:
            return m.group(1)
    return None


def kubelet_match(uid: str) -> PodMatch:
    """Processes of the pod with this Kubernetes UID, under either cgroup driver."""
    if not re.fullmatch(r"[0-9A-Za-z-]+", uid):
        raise ValueError(f"{uid!r} is not a Kubernetes pod UID")
    cgroupfs, systemd_suffix = f"pod{uid}", f"-pod{uid.replace('-', '_')}.slice"

    def match(path: str) -> str | None:
        parts = path.split("/")
        for i, part in enumerate(parts):
            if part == cgroupfs or (part.endswith(systemd_suffix) and _SYSTEMD_POD.fullmatch(part)):
                return "/".join(parts[: i + 1])
        return None

    return match


def subtree_match(pod_cgroup: str) -> PodMatch:
    """Processes in the cgroup `pod_cgroup` (a v2 path such as "/nm-abc123/n0/p1") or below."""
    pod_cgroup = "/" + pod_cgroup.strip("/")

    def match(path: str) -> str | None:
        return pod_cgroup if path == pod_cgroup or path.startswith(pod_cgroup + "/") else None

    return match


def is_runtime_helper(path: str) -> bool:
    """A container runtime's helper process, which shares the pod's cgroup but not its netns."""
    leaf = path.rsplit("/", 1)[-1]
    return leaf.startswith(HELPER_PREFIXES)
