"""How many workers: --workers/NODEMESH_WORKERS (at least 1, else a named error), by default the
CPUs the agent may use (affinity capped by the cgroup's cpu.max quota, rounded up)."""

from __future__ import annotations

import os

import pytest

from agent import config
from agent.host import cpus

pytestmark = pytest.mark.unit


def test_cpu_max_quota_reads_as_cpus() -> None:
    assert cpus.quota_cpus("max 100000\n") is None
    assert cpus.quota_cpus("150000 100000\n") == 1.5
    assert cpus.quota_cpus("garbage") is None
    assert 1 <= cpus.usable() <= len(os.sched_getaffinity(0))


def test_workers_setting_wants_at_least_one() -> None:
    base = {"NODEMESH_CONFIG": "m.yaml"}
    assert config.build(base).workers == 0  # resolved from the CPUs at start
    assert config.build({**base, "NODEMESH_WORKERS": "3"}).workers == 3
    assert config.build(base, {"workers": "2"}).workers == 2
    with pytest.raises(config.ConfigError, match="workers 0 from flag --workers"):
        config.build(base, {"workers": "0"})
    with pytest.raises(config.ConfigError, match="workers from env NODEMESH_WORKERS"):
        config.build({**base, "NODEMESH_WORKERS": "two"})
