"""Test tiers by folder, and the rule that a kernel/e2e test never skips silently in CI.

tests/unit: no privileges, never imports bcc. tests/kernel: root + BCC. tests/e2e: root + netns.
`requires(...)` skips locally when a privilege or tool is missing but fails when CI is set, so
a missing prerequisite in CI shows up as a failure instead of a pass.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

TIERS = ("unit", "kernel", "e2e")
IN_CI = bool(os.environ.get("CI"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        rel = Path(str(item.fspath)).relative_to(root)
        tier = rel.parts[0] if rel.parts else ""
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


def requires(condition: bool, why: str) -> None:
    """Skip (or, in CI, fail) when a prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI is set and a prerequisite is missing: {why}", pytrace=False)
    pytest.skip(why)


def require_root() -> None:
    requires(os.geteuid() == 0, "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    requires(path is not None, f"needs {name} on PATH")
    assert path is not None
    return path


@pytest.fixture
def root() -> None:
    require_root()


@pytest.fixture
def cluster() -> Iterator[object]:
    """A fresh 2-node, 2-pods-per-node test-bed cluster, torn down even when the test fails."""
    require_root()
    from agent.testbed import Cluster

    with Cluster(nodes=2, pods_per_node=2, description="pytest") as c:
        yield c
