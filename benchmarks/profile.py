"""Where the tunnel's time goes: py-spy samples both agents during a nodemesh bulk transfer,
with their worker processes (`--subprocesses`: the data plane runs in the workers, the agent's
own process is the control process).

py-spy (PyPI) reads the agent's stacks from outside the process. `--native` adds C frames
(OpenSSL, the socket calls) and needs the process paused for each sample, so the profiled run is
a little slower than the measured ones; `--idle` keeps the samples where a thread waits in epoll,
so the summary also says how busy the event loop was.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import workloads
from benchmarks.bed import Bed


def py_spy() -> str | None:
    venv = Path(sys.executable).parent / "py-spy"
    return str(venv) if venv.exists() else shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    """'send (ssl.py)' style: function and file name, no directories or line numbers."""
    func, _, where = frame.partition(" (")
    return f"{func} ({Path(where.rstrip(')').split(':')[0]).name})" if where else func


def summarize(raw: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive shares, within the event-loop thread, of the collapsed stacks py-spy
    wrote (`a;b;c count` lines); epoll_wait's share is the loop's idle time."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        if "run_forever" not in stack:
            continue  # only the event-loop thread: it runs the tunnel (others wait on events)
        frames = [_frame_name(f) for f in stack.split(";")]
        # The first frame is the thread ("process 123:"...); drop anything without a source.
        frames = [f for f in frames if "(" in f] or frames
        total += n
        self_time[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n

    def share(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": k, "pct": 100 * v / total} for k, v in c.most_common(top)]

    return {"samples": total, "self": share(self_time) if total else [],
            "inclusive": share(inclusive) if total else []}


def record(bed: Bed, seconds: float, out: Path) -> dict[str, Any]:
    """py-spy on both agents and their workers while a single-stream bulk transfer runs through
    the mesh."""
    exe = py_spy()
    if exe is None:
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    out.mkdir(parents=True, exist_ok=True)
    spies = []
    for i, agent in enumerate(bed.agents):
        raw = out / f"profile-node{i}.txt"
        argv = [exe, "record", "-p", str(agent.pid), "-d", str(int(seconds) + 1), "-r", "250",
                "-f", "raw", "--nolineno", "--idle", "--native", "--subprocesses", "-o", str(raw)]
        spies.append((raw, subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)))
    try:
        route = bed.routes["nodemesh"]
        run = workloads.iperf3(bed, route, seconds, 1)
    finally:
        errors = []
        for _, p in spies:
            try:
                _, err = p.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            errors.append(err.decode()[-300:])
    result: dict[str, Any] = {"gbit_s": run["value"], "seconds": seconds}
    for i, (raw, _) in enumerate(spies):
        role = "sender" if i == 0 else "receiver"
        if raw.exists():
            result[f"node{i} ({role})"] = summarize(raw)
        else:
            result[f"node{i} ({role})"] = {"error": errors[i]}
    return result
