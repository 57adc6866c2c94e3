"""Flow events reach subscribers in batches read from the ring buffer: failures there are counted,
not raised, and do not cost the rest of the batch."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.datapath.datapath import Datapath
from agent.datapath.layouts import FLOW_EVENT, FLOW_EVENT_SIZE, FlowEvent
from agent.datapath.options import BuildOptions
from agent.datapath.verdicts import KernelDirection, KernelEventKind, KernelVerdict, Reason

pytestmark = pytest.mark.unit


def test_an_undecodable_record_or_failing_subscriber_is_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    dp = Datapath(tmp_path, BuildOptions(pin_dir=tmp_path / "pins"))
    got: list[FlowEvent] = []
    dp._subscribers.append(got.append)
    with caplog.at_level(logging.ERROR, logger="agent.datapath.datapath"):
        for _ in range(5):
            dp._dispatch(b"\x00" * 3, [0], [3])  # type: ignore[arg-type]  # short: no decode

    def broken(_ev: FlowEvent) -> None:
        raise RuntimeError("subscriber bug")

    dp._subscribers[:] = [broken]
    dp._dispatch(b"\x00" * 3, [0], [3])  # type: ignore[arg-type]
    assert dp.event_errors == 6
    assert got == []
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "flow event not delivered (1 so far)" in lines[0].getMessage()
    assert lines[0].exc_info is None  # one bounded line, no traceback at ERROR


def test_a_bad_record_does_not_cost_the_rest_of_its_batch(tmp_path: Path) -> None:
    dp = Datapath(tmp_path, BuildOptions(pin_dir=tmp_path / "pins"))
    got: list[FlowEvent] = []
    dp._subscribers.append(got.append)
    good = FLOW_EVENT.pack(1, 42, 7, 0, 0, 0, bytes(4), bytes(4), 1, 2, 3, 0, 0,
                           int(KernelEventKind.OPEN), int(KernelVerdict.ALLOW), int(Reason.NONE),
                           int(KernelDirection.EGRESS), bytes(4), 0)
    good += bytes(FLOW_EVENT_SIZE - len(good))  # the C struct is padded to 8 bytes
    buf = bytes(8) + good + good
    dp._dispatch(buf, [0, 8, 8 + FLOW_EVENT_SIZE], [3, FLOW_EVENT_SIZE, FLOW_EVENT_SIZE])  # type: ignore[arg-type]
    assert dp.event_errors == 1
    assert [e.cookie for e in got] == [42, 42]
