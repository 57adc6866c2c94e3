"""Test tiers by folder, and the rule that a kernel/e2e test never skips silently in CI.

tests/unit: no privileges, never imports bcc. tests/kernel: root + BCC. tests/e2e: root + netns.
`requires(...)` skips locally when a privilege or tool is missing but fails when CI is set, so
a missing prerequisite in CI shows up as a failure instead of a pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prereq import IN_CI, require_root, require_tool, requires

from agent.testbed import Cluster

__all__ = ["IN_CI", "require_root", "require_tool", "requires"]

TIERS = ("unit", "kernel", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        rel = Path(str(item.fspath)).relative_to(root)
        tier = rel.parts[0] if rel.parts else ""
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture
def root() -> None:
    require_root()


@pytest.fixture
def cluster() -> Iterator[object]:
    """A fresh 2-node, 2-pods-per-node test-bed cluster, torn down even when the test fails."""
    require_root()
    with Cluster(nodes=2, pods_per_node=2, description="pytest") as c:
        yield c
