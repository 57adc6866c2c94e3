"""Scrape-time readers are typed by shape: a labelled metric's reader returns a value per label,
an unlabelled one a single number; the wrong shape fails mypy --strict (as a reader answering a
bare count for the labelled nodemesh_ringbuf_drops once did, losing its samples at run time)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api
from prometheus_client import CollectorRegistry

from agent.telemetry.metrics import AgentMetrics, ScrapeLabelled

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]

WIRING = """
from agent.telemetry.metrics import AgentMetrics

def wire(m: AgentMetrics, n: int) -> None:
    m.ringbuf_drops.set_reader(lambda: {{"flows": n}})
    m.enrolled_pods.set_reader(lambda: n)
    {wrong}
"""


def _mypy(tmp_path: Path, wrong: str) -> tuple[str, int]:
    src = tmp_path / "wiring.py"
    src.write_text(WIRING.format(wrong=wrong))
    out, _err, status = api.run(["--strict", "--cache-dir", str(tmp_path / "cache"),
                                 "--python-version", "3.11", str(src)])
    return out, status


@pytest.mark.parametrize("wrong", ["m.ringbuf_drops.set_reader(lambda: n)",
                                   'm.enrolled_pods.set_reader(lambda: {"pods": n})'])
def test_a_reader_of_the_wrong_shape_does_not_type_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wrong: str) -> None:
    monkeypatch.chdir(ROOT)
    out, status = _mypy(tmp_path, "pass")
    assert status == 0, out
    out, status = _mypy(tmp_path, wrong)
    assert status == 1 and "set_reader" in out, out


def test_the_shapes_at_run_time() -> None:
    m = AgentMetrics(CollectorRegistry())
    m.ringbuf_drops.set_reader(lambda: {"flows": 3})
    m.enrolled_pods.set_reader(lambda: 2)
    assert [s.value for f in m.ringbuf_drops.collect() for s in f.samples] == [3.0]
    assert [s.value for f in m.enrolled_pods.collect() for s in f.samples] == [2.0]
    with pytest.raises(ValueError, match="needs label names"):
        ScrapeLabelled(CollectorRegistry(), "x", "x", "gauge", ())
