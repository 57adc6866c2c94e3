"""cgroup v2: find the unified mount, create and remove groups, move and list processes.

The unified hierarchy is at /sys/fs/cgroup on most Kubernetes nodes and at
/sys/fs/cgroup/unified on hybrid hosts, so it is read from /proc/mounts, never assumed.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path


class CgroupError(OSError):
    """cgroup v2 is missing or an operation on it failed."""


def mount_point(mounts: str = "/proc/mounts") -> Path:
    with open(mounts, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                return Path(fields[1])
    raise CgroupError(errno.ENOENT, "no cgroup2 mount in /proc/mounts: nodemesh needs cgroup v2")


def create(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def procs(path: Path) -> list[int]:
    """PIDs in the group and all groups below it."""
    found: list[int] = []
    for dirpath, _dirs, _files in os.walk(path):
        try:
            text = (Path(dirpath) / "cgroup.procs").read_text(encoding="ascii")
        except FileNotFoundError:
            continue
        found.extend(int(x) for x in text.split())
    return found


def of_process(pid: int) -> Path:
    """The cgroup v2 directory of a process."""
    with open(f"/proc/{pid}/cgroup", encoding="ascii") as f:
        for line in f:
            if line.startswith("0::"):
                return mount_point() / line[3:].strip().lstrip("/")
    raise CgroupError(errno.ENOENT, f"process {pid} has no cgroup v2 entry")


def remove_tree(path: Path, timeout: float = 5.0) -> None:
    """rmdir the group and its children, deepest first; waits briefly for exiting processes."""
    if not path.exists():
        return
    dirs = sorted(
        (Path(d) for d, _s, _f in os.walk(path)), key=lambda p: len(p.parts), reverse=True
    )
    deadline = time.monotonic() + timeout
    for d in dirs:
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # EBUSY while zombies are being reaped: wait for the kernel to release the group.
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(
                        exc.errno, f"cannot remove cgroup {d}: {exc.strerror}"
                    ) from exc
                time.sleep(0.02)
