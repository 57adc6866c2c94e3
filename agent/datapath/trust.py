"""Who may use the tunnel mark: cgroup ids of agent processes, each with the process that
registered it.

The kernel honours the mark only on sockets connected by a task in one of these cgroups
(bpf/lib/trust.h). An entry names its owner by PID and start time, so a restarted agent drops
the entries of agents that are gone (a SIGKILLed one, or one that moved to another cgroup) and
keeps those of an agent still running next to it (a surge upgrade).
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.datapath.layouts import TrustedEntry
from agent.host import cgroup


def cgroup_id(path: Path) -> int:
    """The id bpf_get_current_cgroup_id() returns for tasks in a cgroup-v2 directory."""
    return os.stat(path).st_ino


def process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (/proc/<pid>/stat field 22)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return int(text[text.rindex(")") + 2 :].split()[19])


def this_process() -> TrustedEntry:
    pid = os.getpid()
    start = process_start(pid)
    if start is None:
        raise RuntimeError("/proc/self/stat is unreadable")
    return TrustedEntry(pid, start)


def own_cgroup() -> Path:
    return cgroup.of_process(os.getpid())


def owner_alive(entry: TrustedEntry) -> bool:
    """The registering process still runs (same PID and start time: not a reused PID)."""
    return process_start(entry.owner_pid) == entry.owner_start
