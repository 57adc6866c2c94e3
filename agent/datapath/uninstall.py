"""Removing an agent instance's pins: detach every pinned link, unpin every map, remove the
directory. Shared by `nodemesh uninstall` and the test bed's cleanup of dead runs."""

from __future__ import annotations

from pathlib import Path

from agent.datapath.datapath import Datapath
from agent.datapath.options import BuildOptions
from agent.host import cgroup


class UninstallError(Exception):
    """The requested directory is not one nodemesh could have made; nothing was removed."""


def filesystem_of(path: Path, mounts: str = "/proc/mounts") -> str:
    """The type of the filesystem that holds path (the longest mount point above it)."""
    best, fstype = "", ""
    resolved = str(path.resolve())
    with open(mounts, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            point = fields[1].replace("\\040", " ")
            inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, fstype = point, fields[2]
    return fstype


def check_on_bpffs(path: Path, mounts: str = "/proc/mounts") -> None:
    """Refuse anything outside a bpf filesystem: uninstall deletes the directory it is given."""
    fstype = filesystem_of(path, mounts)
    if fstype != "bpf":
        raise UninstallError(
            f"{path} is on a {fstype or 'unknown'} filesystem, not bpffs: nodemesh pins only "
            "under a bpf mount (is /sys/fs/bpf mounted, and is this the agent's --pin-dir?)")


def instances(pin_root: Path) -> list[Path]:
    """Every agent instance's pin directory under the root (one per --pin-dir in use)."""
    if not pin_root.is_dir():
        return []
    return sorted(p for p in pin_root.iterdir() if p.is_dir())


def uninstall(pin_dir: Path) -> list[str]:
    """Detach and unpin one instance. The cgroup is not needed to detach pinned links."""
    try:
        root = cgroup.mount_point()
    except cgroup.CgroupError:
        root = Path("/sys/fs/cgroup")  # unused by uninstall(); a cgroup-v1 host still cleans up
    return Datapath(root, BuildOptions(pin_dir=pin_dir)).uninstall()
