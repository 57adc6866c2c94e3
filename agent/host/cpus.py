"""How many CPUs this process may use: its affinity mask, capped by its cgroup's cpu.max quota."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def quota_cpus(cpu_max: str) -> float | None:
    """cpu.max "QUOTA PERIOD" as CPUs ("max PERIOD": no limit -> None)."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    quota, period = int(parts[0]), int(parts[1])
    return quota / period if quota > 0 and period > 0 else None


def _own_cgroup() -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return CGROUP_ROOT / line[3:].lstrip("/")
    except OSError:
        return None
    return None


def usable() -> int:
    """At least 1: affinity, then the tightest cpu.max from our cgroup up to the root,
    rounded up (a 1.5-CPU limit still runs two workers' worth of short bursts)."""
    count = len(os.sched_getaffinity(0))
    d = _own_cgroup()
    while d is not None and d != CGROUP_ROOT.parent and CGROUP_ROOT in (d, *d.parents):
        try:
            limit = quota_cpus((d / "cpu.max").read_text())
        except (OSError, ValueError):
            limit = None
        if limit is not None:
            count = min(count, math.ceil(limit))
        if d == CGROUP_ROOT:
            break
        d = d.parent
    return max(1, count)
