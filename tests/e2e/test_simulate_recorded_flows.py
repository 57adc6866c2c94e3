"""`nodemesh policy simulate` on a flow log the real agents recorded during the demo's traffic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prereq import require_root
from support.agents import live_mesh as live_agents

from agent.cli import main
from agent.commands.demo import (
    EXAMPLE,
    STEPS,
    _run_client,
    _run_steps,
)

# backend-allow-frontend's only rule; without it the policy allows nothing.
FRONTEND_RULE = """  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/frontend"]
    to:
    - operation:
        ports: ["8080"]
"""
EXTRA_CALLS = 3
# Connections the demo makes to backend:8080: the pod IP step and the Service VIP step (the
# kernel picks the endpoint, so the record names backend:8080).
DEMO_TO_BACKEND = sum(1 for s in STEPS if s.src == "shop/frontend" and s.dst == "shop/backend")


def record_demo_flows(work: Path) -> list[Path]:
    """The demo's steps plus EXTRA_CALLS more frontend -> backend:8080, on real agents;
    returns both nodes' flow logs once the agents have stopped (logs complete)."""
    with live_agents(work, "policy simulate e2e", servers=()) as live:
        c = live.cluster
        rows, *_ = _run_steps(c)
        assert [r[1] for r in rows] == [s.expect for s in STEPS]
        for i in range(EXTRA_CALLS):
            out = _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, f"again {i}")
            assert out.startswith("OK"), out
    return [work / f"flows-n{n}.log" for n in (0, 1)]


def simulate(capsys: pytest.CaptureFixture[str], logs: list[Path], config: Path,
             *extra: str) -> tuple[int, str]:
    args = ["policy", "simulate", "--config", str(config), *extra]
    for log in logs:
        args += ["--flows", str(log)]
    rc = main(args)
    out, err = capsys.readouterr()
    assert not err, err
    return rc, out


def test_simulate_replays_the_recorded_demo(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    require_root()
    logs = record_demo_flows(tmp_path)
    rc, out = simulate(capsys, logs, EXAMPLE, "--json")
    report = json.loads(out)
    assert rc == 0, out
    assert report["changed"] is False and report["unresolved"] == []
    # Every connection replayed once: the demo's steps + the extra calls.
    assert report["replayed"] == len(STEPS) + EXTRA_CALLS
    assert report["unchanged"] == len(STEPS) + EXTRA_CALLS

    text = EXAMPLE.read_text()
    assert text.count(FRONTEND_RULE) == 1
    proposed = tmp_path / "proposed.yaml"
    proposed.write_text(text.replace(FRONTEND_RULE, "  action: ALLOW\n  rules: []\n"))
    rc, out = simulate(capsys, logs, proposed, "--json")
    assert rc == 1, out
    report = json.loads(out)
    assert report["newly_allowed"] == [] and report["unresolved"] == []
    assert [(c["source"], c["destination"], c["port"], c["count"], c["proposed"]["verdict"])
            for c in report["newly_denied"]] == [
        ("shop/frontend", "shop/backend", 8080, DEMO_TO_BACKEND + EXTRA_CALLS, "deny")]
    assert "shop/backend-allow-frontend" in report["newly_denied"][0]["proposed"]["reason"]
    rc, out = simulate(capsys, logs, proposed)
    assert rc == 1
    print(out)
    assert f"shop/frontend -> shop/backend:8080  {DEMO_TO_BACKEND + EXTRA_CALLS:>5}x" in out
