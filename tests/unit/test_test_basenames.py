"""Test modules have no packages (no __init__.py): pytest imports each by its basename, so two
files with one basename in different tiers break collection of the full suite."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_basename_is_unique() -> None:
    names = Counter(p.name for p in TESTS.rglob("*.py") if p.name != "conftest.py")
    assert len(names) > 50  # the scan sees the tree
    assert [n for n, count in names.items() if count > 1] == []
