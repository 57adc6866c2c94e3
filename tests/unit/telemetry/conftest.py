"""Fixtures for the telemetry tests."""

from __future__ import annotations

import pytest
from telemetry_samples import sample_records

from agent.telemetry.flow import FlowRecord


@pytest.fixture
def records() -> list[FlowRecord]:
    return sample_records()
