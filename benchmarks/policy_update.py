"""Policy update latency with a large policy: mesh file change -> enforced in the kernel.

A probe in the client pod connects to the server every 2 ms (denied = EPERM from the kernel);
the suite atomically replaces the mesh file (os.replace) and notes CLOCK_MONOTONIC, the probe
notes when its result flips. The latency covers everything on the way: the file source's inotify
wake-up, parsing and validating the YAML, compiling, and the map update.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks import meshfile, programs
from benchmarks.bed import ECHO_PORT, Bed, BedError, config_dump

PROBE_GAP = 0.002


def _replace(path: Path, text: str) -> float:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return time.monotonic()


def _flip(bed: Bed, text: str, want: str, limit: float) -> dict[str, Any]:
    c = bed.cluster
    probe = c.pod(0, 0).python(
        programs.PROBE, str(c.pod(1, 0).ip), str(ECHO_PORT), want, str(limit), str(PROBE_GAP),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert probe.popen is not None and probe.popen.stdin is not None
    assert probe.popen.stdout is not None
    try:
        first = probe.popen.stdout.readline().decode().split()
        if first[:1] != ["ready"] or first[1:] == [want]:
            raise BedError(f"policy probe started as {first!r}; a flip to {want} means nothing")
        probe.popen.stdin.write(b"go\n")
        probe.popen.stdin.flush()
        t0 = _replace(bed.mesh_file, text)
        line = probe.popen.stdout.readline().decode()
    finally:
        probe.stop()
    if not line:
        raise BedError("the policy probe exited without a result")
    seen = json.loads(line)
    if seen["seen_at"] is None:
        return {"seconds": None, "attempts": seen["attempts"], "broken": seen["broken"],
                "verified": False}
    return {"seconds": seen["seen_at"] - t0, "attempts": seen["attempts"],
            "broken": seen["broken"], "verified": True}


def _wait_updates(bed: Bed, before: int, limit: float) -> float:
    """Seconds until node0's agent has applied another policy generation."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            if config_dump(bed.cluster.nodes[0])["policy"]["updates"] > before:
                return time.monotonic() - start
        except BedError:
            pass  # the agent is busy parsing and compiling: its admin endpoint answers later
        time.sleep(0.02)
    raise BedError(f"the agent did not apply the new mesh file within {limit:.0f}s")


def measure(bed: Bed, rules: int, reps: int, limit: float = 120) -> dict[str, Any]:
    allow = meshfile.with_rules(rules, deny_client=False)
    deny = meshfile.with_rules(rules, deny_client=True)
    node0 = bed.cluster.nodes[0]
    before = config_dump(node0)["policy"]["updates"]
    _replace(bed.mesh_file, allow)
    load = _wait_updates(bed, before, limit)
    to_deny: list[dict[str, Any]] = []
    to_allow: list[dict[str, Any]] = []
    for _ in range(reps):
        to_deny.append(_flip(bed, deny, "denied", limit))
        to_allow.append(_flip(bed, allow, "allowed", limit))
    dump = config_dump(node0)
    _replace(bed.mesh_file, meshfile.pair())  # back to the plain pair for later sections
    secs = [r["seconds"] for r in to_deny if r["seconds"] is not None]
    back = [r["seconds"] for r in to_allow if r["seconds"] is not None]
    return {
        "rules": rules,
        "mesh_file_bytes": len(deny.encode()),
        "kernel_entries": dump["policy"]["entries"],
        "initial_load_s": load,
        "allowed_to_denied": to_deny,
        "denied_to_allowed": to_allow,
        "median_s": statistics.median(secs) if secs else None,
        "min_s": min(secs) if secs else None,
        "max_s": max(secs) if secs else None,
        "restore_median_s": statistics.median(back) if back else None,
        "verified": len(secs) == reps and len(back) == reps,
    }
