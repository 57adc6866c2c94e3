"""The repeat limiter: a flood of identical warnings becomes a few lines plus a count."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from ztunnel.lograte import RepeatLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited(
        caplog: pytest.LogCaptureFixture) -> Iterator[tuple[logging.Logger, RepeatLimiter, Clock]]:
    clock = Clock()
    limiter = RepeatLimiter(burst=3, window=60.0, max_keys=4, clock=clock)
    logger = logging.getLogger("test.lograte")
    logger.addFilter(limiter)
    caplog.set_level(logging.INFO, logger="test.lograte")
    yield logger, limiter, clock
    logger.removeFilter(limiter)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.lograte"]


def test_a_flood_of_identical_lines_is_bounded_and_counted(
        limited: tuple[logging.Logger, RepeatLimiter, Clock],
        caplog: pytest.LogCaptureFixture) -> None:
    logger, limiter, clock = limited
    for port in range(1000):  # the source port differs; the line is the same refusal
        logger.warning("refused %s:%d to pod %s: %s", "10.0.0.9", 40000 + port, "db", "STRICT")
    assert len(messages(caplog)) == 3
    assert limiter.suppressed_total == 997
    # The next line after the window carries the count.
    clock.now += 61
    logger.warning("refused %s:%d to pod %s: %s", "10.0.0.9", 1, "db", "STRICT")
    last = messages(caplog)[-1]
    assert last.startswith("refused 10.0.0.9:1 to pod db: STRICT [997 similar lines suppressed")


def test_distinct_lines_and_info_are_not_limited(
        limited: tuple[logging.Logger, RepeatLimiter, Clock],
        caplog: pytest.LogCaptureFixture) -> None:
    logger, limiter, _ = limited
    for _ in range(10):
        logger.info("enrolled pod %s", "same")
    for cause in ("expired", "self-signed", "wrong domain"):
        for _ in range(3):
            logger.warning("rejected: %s", cause)
    assert len(messages(caplog)) == 10 + 9
    assert limiter.suppressed_total == 0


def test_flush_and_the_window_sweep_report_counts_for_lines_that_stopped(
        limited: tuple[logging.Logger, RepeatLimiter, Clock],
        caplog: pytest.LogCaptureFixture) -> None:
    logger, limiter, clock = limited
    for _ in range(10):
        logger.warning("flood %s", "a")
    for _ in range(5):
        logger.warning("flood %s", "b")
    assert limiter.flush() == 7 + 2
    summaries = [m for m in messages(caplog) if "suppressed" in m]
    assert summaries == ["7 similar lines suppressed in 0s, like: flood a",
                         "2 similar lines suppressed in 0s, like: flood b"]
    # After a flush the limiter starts over.
    logger.warning("flood %s", "a")
    assert messages(caplog)[-1] == "flood a"
    # A flood that stops is reported by the first line of anything once its window is over.
    for _ in range(10):
        logger.warning("flood %s", "c")
    clock.now += 61
    logger.warning("unrelated")
    assert "7 similar lines suppressed in 61s, like: flood c" in messages(caplog)


def test_the_key_table_is_bounded(limited: tuple[logging.Logger, RepeatLimiter, Clock],
                                  caplog: pytest.LogCaptureFixture) -> None:
    logger, limiter, _ = limited
    for i in range(10):
        logger.warning("line %s", str(i))
    assert len(messages(caplog)) == 4  # max_keys distinct lines
    assert limiter.overflow == 6
    assert limiter.flush() == 6
    assert any("6 log lines suppressed: more than 4 distinct" in r.getMessage()
               for r in caplog.records)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="burst"):
        RepeatLimiter(burst=0)
