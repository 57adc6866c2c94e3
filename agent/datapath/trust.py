"""Who may use the tunnel mark: cgroup ids of agent processes, each with the process that
registered it.

The kernel honours the mark only on sockets connected by a task in one of these cgroups
(bpf/lib/trust.h). An entry names its owner by PID and start time, so a restarted agent drops
the entries of agents that are gone (a SIGKILLed one, or one that moved to another cgroup) and
keeps those of an agent still running next to it (a surge upgrade).
"""

from __future__ import annotations

import os
import re
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


def cgroup2_ns_root(mountinfo: str) -> Path:
    """A cgroup2 mount showing this process's cgroup-namespace root at its top (mountinfo root
    field "/"). In a DaemonSet pod the host's hierarchy is also mounted (for attaching at the
    host root); its root field is outside the namespace ("/../.."), so /proc/self/cgroup paths,
    which are relative to the namespace root, resolve only under the namespaced mount."""
    for line in mountinfo.splitlines():
        pre, _sep, post = line.partition(" - ")
        fields = pre.split()
        if post.split()[:1] == ["cgroup2"] and len(fields) >= 5 and fields[3] == "/":
            return Path(_unescape(fields[4]))
    raise cgroup.CgroupError(2, "no cgroup2 mount of this cgroup namespace's root in mountinfo")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def own_cgroup() -> Path:
    """This process's cgroup-v2 directory, read through a mount where its path is valid."""
    with open("/proc/self/cgroup", encoding="ascii") as f:
        rel = next((ln[3:].strip() for ln in f if ln.startswith("0::")), None)
    if rel is None:
        raise cgroup.CgroupError(2, "this process has no cgroup v2 entry")
    root = cgroup2_ns_root(Path("/proc/self/mountinfo").read_text(encoding="utf-8"))
    return root / rel.lstrip("/")


def owner_alive(entry: TrustedEntry) -> bool:
    """The registering process still runs (same PID and start time: not a reused PID)."""
    return process_start(entry.owner_pid) == entry.owner_start
