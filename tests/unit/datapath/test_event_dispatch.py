"""Flow events reach subscribers from BCC's C callback: failures there are counted, not raised."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.datapath.datapath import Datapath
from agent.datapath.layouts import FlowEvent
from agent.datapath.options import BuildOptions

pytestmark = pytest.mark.unit


def test_an_undecodable_record_or_failing_subscriber_is_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    dp = Datapath(tmp_path, BuildOptions(pin_dir=tmp_path / "pins"))
    got: list[FlowEvent] = []
    dp._subscribers.append(got.append)
    with caplog.at_level(logging.ERROR, logger="agent.datapath.datapath"):
        for _ in range(5):
            dp._dispatch(b"\x00" * 3)  # short record: does not decode

    def broken(_ev: FlowEvent) -> None:
        raise RuntimeError("subscriber bug")

    dp._subscribers[:] = [broken]
    dp._dispatch(b"\x00" * 3)
    assert dp.event_errors == 6
    assert got == []
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "flow event not delivered (1 so far)" in lines[0].getMessage()
    assert lines[0].exc_info is None  # one bounded line, no traceback at ERROR
