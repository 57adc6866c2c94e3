"""Prerequisite checks shared by every tier: skip locally, fail in CI (CI env var set)."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = bool(os.environ.get("CI"))


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
