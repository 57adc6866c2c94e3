"""Policy update latency with a large policy: mesh file change -> enforced in the kernel.

A probe in the client pod connects to the server every 2 ms (denied = EPERM from the kernel);
the suite atomically replaces the mesh file (os.replace) and notes CLOCK_MONOTONIC, the probe
notes when its result flips. The latency covers everything on the way: the file source's inotify
wake-up, parsing and validating the YAML, compiling, and the map update.

What a reload costs traffic already flowing: a 1-byte request/response exchange over one open
connection through both agents (open connections keep their admission, so a deny does not cut
it) runs PINGPONG_ROUND_TRIPS round trips (about a second) while the file is replaced, and the same
without a change; the p99s are compared.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import meshfile, programs
from benchmarks.bed import ECHO_PORT, Bed, BedError, config_dump

T = TypeVar("T")

PROBE_GAP = 0.002
PINGPONG_ROUND_TRIPS = 4000
PINGPONG_WARMUP = 200


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


def _pingpong_p99(bed: Bed, text: str | None) -> float:
    """p99 (us) of 1-byte round trips client -> server while `text` replaces the mesh file
    (None: no change)."""
    c = bed.cluster
    proc = c.pod(0, 0).python(
        programs.PINGPONG, str(c.pod(1, 0).ip), str(ECHO_PORT), str(PINGPONG_ROUND_TRIPS),
        str(PINGPONG_WARMUP), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.popen is not None
    try:
        time.sleep(0.2)  # connected (before a deny lands) and past its warm-up
        if text is not None:
            _replace(bed.mesh_file, text)
        out, err = proc.popen.communicate(timeout=120)
    finally:
        proc.stop()
    if proc.popen.returncode != 0:
        raise BedError(f"pingpong probe failed: {err.decode()[-800:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    if not result["verified"]:
        raise BedError("pingpong probe: echoed bytes differ")
    return float(result["p99_us"])


def _wait_updates(bed: Bed, before: int, limit: float, node: int = 0) -> float:
    """Seconds until a node's agent (node0's by default) has applied another policy
    generation."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            if config_dump(bed.cluster.nodes[node])["policy"]["updates"] > before:
                return time.monotonic() - start
        except BedError:
            pass  # the agent is busy parsing and compiling: its admin endpoint answers later
        time.sleep(0.02)
    raise BedError(f"the agent did not apply the new mesh file within {limit:.0f}s")


def _on_all(bed: Bed, limit: float, change: Callable[[], T]) -> T:
    """Run `change` (which replaces the mesh file) and wait until every agent applied it."""
    befores = [config_dump(n)["policy"]["updates"] for n in bed.cluster.nodes]
    out = change()
    for i, before in enumerate(befores):
        _wait_updates(bed, before, limit, i)
    return out


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
    quiet_p99: list[float] = []
    reload_p99: list[float] = []

    # Each agent reloads the file on its own: wait for both, so the server's agent allows again
    # before the next probe connects.
    _on_all(bed, limit, lambda: _replace(bed.mesh_file, deny))
    _on_all(bed, limit, lambda: _replace(bed.mesh_file, allow))
    for _ in range(reps):
        quiet_p99.append(_pingpong_p99(bed, None))
        reload_p99.append(_on_all(bed, limit, lambda: _pingpong_p99(bed, deny)))
        _on_all(bed, limit, lambda: _replace(bed.mesh_file, allow))
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
        "probe_p99_quiet_us": statistics.median(quiet_p99),
        "probe_p99_reload_us": statistics.median(reload_p99),
        "probe_p99_ratio": statistics.median(reload_p99) / statistics.median(quiet_p99),
        "verified": len(secs) == reps and len(back) == reps,
    }
