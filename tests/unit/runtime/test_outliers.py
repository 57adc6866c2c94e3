"""Outlier detection for Service endpoints: consecutive failures eject, the backoff doubles and
is capped, a success resets, the last endpoint of a Service port is never ejected, and the
backend set written to the kernel is the compiled one minus what is ejected now."""

from __future__ import annotations

from ipaddress import IPv4Address as Ip

import pytest

from agent import config
from agent.datapath.layouts import Backend, Frontend
from agent.runtime.outliers import OutlierDetector, OutlierSettings

FE = Frontend(Ip("10.96.0.20"), 80)
OTHER = Frontend(Ip("10.96.0.21"), 80)
A, B, C = (Backend(Ip(f"10.1.0.{i}"), 8080) for i in (1, 2, 3))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def detector(clock: Clock, failures: int = 3) -> OutlierDetector:
    d = OutlierDetector(OutlierSettings(failures, 10.0, 35.0), clock)
    d.set_table({FE: (A, B, C), OTHER: (A,)})
    return d


def fail(d: OutlierDetector, be: Backend, n: int, fe: Frontend = FE) -> list[object]:
    return [d.observe(fe, be, ok=False) for _ in range(n)]


def test_consecutive_failures_eject_for_a_doubling_capped_backoff() -> None:
    clock = Clock()
    d = detector(clock)
    assert fail(d, A, 2) == [None, None]
    ej = d.observe(FE, A, ok=False)
    assert ej is not None and (ej.backend, ej.seconds, ej.ejections) == (A, 10.0, 1)
    assert d.filter({FE: (A, B, C)}) == {FE: (B, C)}
    assert d.next_return() == pytest.approx(10.0)
    # Connects chosen before the ejection reached the kernel still fail: not counted again.
    assert fail(d, A, 5) == [None] * 5
    clock.now += 10.0
    assert d.filter({FE: (A, B, C)}) == {FE: (A, B, C)} and d.next_return() is None
    # Back, and still failing: the next ejection is twice as long, then capped at 35.
    *_, ej = fail(d, A, 3)
    assert ej is not None and (ej.seconds, ej.ejections) == (20.0, 2)
    clock.now += 20.0
    *_, ej = fail(d, A, 3)
    assert ej is not None and ej.seconds == 35.0
    assert d.ejections_total == {(FE, A): 3}


def test_a_success_resets_the_count_and_after_returning_the_backoff() -> None:
    clock = Clock()
    d = detector(clock)
    fail(d, B, 2)
    assert d.observe(FE, B, ok=True) is None
    assert fail(d, B, 2) == [None, None]  # the run restarted
    *_, ej = fail(d, B, 1)
    assert ej is not None and ej.ejections == 1
    clock.now += 10.0
    d.observe(FE, B, ok=True)  # healthy after returning: the next ejection starts over
    *_, ej = fail(d, B, 3)
    assert ej is not None and (ej.seconds, ej.ejections) == (10.0, 1)


def test_the_last_endpoint_in_service_is_never_ejected() -> None:
    clock = Clock()
    d = detector(clock)
    assert fail(d, A, 3, OTHER) == [None] * 3  # OTHER has only A
    assert d.filter({OTHER: (A,)}) == {OTHER: (A,)}
    assert fail(d, A, 3)[-1] is not None
    assert fail(d, B, 3)[-1] is not None
    assert fail(d, C, 10) == [None] * 10  # the last one of FE stays
    assert d.filter({FE: (A, B, C)}) == {FE: (C,)}
    # Per Service port: A ejected from FE is still A in OTHER.
    assert d.filter({FE: (A, B, C), OTHER: (A,)})[OTHER] == (A,)


def test_state_follows_the_compiled_table() -> None:
    clock = Clock()
    d = detector(clock)
    fail(d, A, 3)
    d.set_table({FE: (B, C), OTHER: (A,)})  # A left FE (its slice dropped it)
    assert d.ejected() == {} and d.ejections_total == {}
    assert d.observe(FE, A, ok=False) is None  # an old version's endpoint: ignored
    # Filtering never empties a frontend even if the table shrank to ejected endpoints only.
    fail(d, B, 3)
    assert d.filter({FE: (B,)}) == {FE: (B,)}


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        OutlierSettings(0)
    with pytest.raises(ValueError, match="base_ejection"):
        OutlierSettings(5, 10.0, 5.0)


def test_the_agent_settings_reach_the_detector_and_are_checked() -> None:
    cfg = config.build({"NODEMESH_CONFIG": "m.yaml", "NODEMESH_OUTLIER_FAILURES": "2"},
                       {"outlier_ejection_seconds": "4", "outlier_max_ejection_seconds": "16"})
    assert (cfg.outlier_failures, cfg.outlier_ejection_seconds,
            cfg.outlier_max_ejection_seconds) == (2, 4.0, 16.0)
    assert config.build({"NODEMESH_CONFIG": "m.yaml"}).outlier_failures == 5
    with pytest.raises(config.ConfigError, match="outlier_failures 0"):
        config.build({"NODEMESH_CONFIG": "m.yaml", "NODEMESH_OUTLIER_FAILURES": "0"})
    with pytest.raises(config.ConfigError, match="want 0 < ejection <= max"):
        config.build({"NODEMESH_CONFIG": "m.yaml"}, {"outlier_ejection_seconds": "400"})


def test_outside_mesh_is_a_setting_with_two_values() -> None:
    base = {"NODEMESH_CONFIG": "m.yaml"}
    assert config.build(base).outside_mesh == "passthrough"
    assert config.build({**base, "NODEMESH_OUTSIDE_MESH": "refuse"}).outside_mesh == "refuse"
    cfg = config.build(base, {"outside_mesh": "refuse"})
    assert cfg.outside_mesh == "refuse" and cfg.origins["outside_mesh"] == "flag --outside-mesh"
    with pytest.raises(config.ConfigError, match="outside_mesh: 'drop' is not one of"):
        config.build({**base, "NODEMESH_OUTSIDE_MESH": "drop"})
