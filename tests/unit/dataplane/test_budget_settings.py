"""The tunnel's budgets travel from agent settings to every worker's TunnelConfig unchanged,
except the per-node handshake caps, which the workers share."""

from __future__ import annotations

import dataclasses

import pytest

from agent import config
from agent.dataplane.supervisor import TunnelBudgets
from agent.dataplane.worker import _tunnel_budgets
from ztunnel import hbone


def test_the_agent_defaults_are_the_cores_defaults() -> None:
    cores = dataclasses.asdict(hbone.Budgets())
    assert {f"h2_{k}": v for k, v in cores.items()} == config.H2_BUDGET_DEFAULTS


def test_frame_budgets_reach_both_sides_and_handshake_caps_are_shared() -> None:
    cfg = config.build({"NODEMESH_H2_RESETS_PER_S": "7", "NODEMESH_MAX_PENDING_HANDSHAKES": "100",
                        "NODEMESH_CONFIG": "/dev/null"})
    budgets = TunnelBudgets(max_pending_handshakes=cfg.max_pending_handshakes,
                            h2={n.removeprefix("h2_"): getattr(cfg, n) for n in config.H2_BUDGETS})
    fields = _tunnel_budgets(budgets.per_worker(3))
    assert fields["max_pending_handshakes"] == 34  # 100 over 3 workers, rounded up
    for side in (fields["settings"], fields["client_settings"]):
        assert side.budgets.resets_per_s == 7
        assert side.budgets.streams_per_s == hbone.Budgets().streams_per_s


def test_a_budget_below_one_is_refused_by_name() -> None:
    with pytest.raises(config.ConfigError, match="h2_streams_per_s"):
        config.build({"NODEMESH_H2_STREAMS_PER_S": "0", "NODEMESH_CONFIG": "/dev/null"})
