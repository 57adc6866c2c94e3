"""The CI soak: `python -m benchmarks.soak` for 3 minutes on the two-node test bed with real
agents (mixed traffic, policy changes, minute-long certificates, one agent replacement), and its
verdict asserted: no fd or RSS growth of the agents beyond 5 % between the window after the
warm-up and the last window, zero unexpected failed connections, and proof that the schedule
happened (the probe's DENY refused it, certificates were renewed, the agent was replaced).

No timing thresholds: latency is reported, never asserted. Takes about 3.5 minutes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from prereq import require_root

from agent.config import DEFAULT_PIN_ROOT
from agent.host import cgroup

REPO = Path(__file__).resolve().parents[2]
SECONDS = 180
# How node1's agent is replaced halfway: surge, the zero-downtime upgrade (new agent beside the
# old one, then SIGTERM the old), so no failure is expected anywhere in the run.
RESTART = "surge"


@pytest.mark.timeout(SECONDS + 600)
def test_three_minute_soak_holds_steady(tmp_path: Path) -> None:
    require_root()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.soak", "--seconds", str(SECONDS),
         "--restart", RESTART, "--out", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        out, _ = proc.communicate(timeout=SECONDS + 420)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the soak's context managers tear the test bed down
        out, _ = proc.communicate(timeout=120)
        raise
    log = out.decode(errors="replace")
    assert (tmp_path / "soak.json").exists(), log[-4000:]
    r = json.loads((tmp_path / "soak.json").read_text())

    f = r["failures"]
    assert f["unexpected"] == 0, f["examples"]
    for node, g in r["growth"].items():
        for key in ("fds", "rss_mib"):
            assert g[key]["ok"], (node, key, g[key])
    v = r["verdict"]
    assert v["pass"], (v, log[-4000:])
    assert proc.returncode == 0, log[-4000:]
    # The traffic really ran, every payload checked, and the schedule happened.
    assert all(t["ok"] > 0 for t in r["totals"].values()), r["totals"]
    assert r["totals"]["streams"]["ok"] >= 100
    assert r["deny_windows"] and all(w["denied_probes"] > 0 for w in r["deny_windows"])
    assert any(a["renewals"] > 0 for a in r["renewals"]), r["renewals"]
    assert r["restart"]["mode"] == RESTART and "ended" in r["restart"], r["restart"]
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| zero unexpected failures | yes |" in (tmp_path / "soak.md").read_text()

    # Everything the run made is gone: namespaces, cgroups, pins.
    run_id = r["run_id"]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout
    assert run_id not in netns
    assert not list(cgroup.mount_point().glob(f"*{run_id}*"))
    assert not list(DEFAULT_PIN_ROOT.glob(f"*{run_id}*"))
