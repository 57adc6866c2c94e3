"""Every class in the product code has a name of its own.

Two classes called `Verdict` (the policy evaluator's, the kernel's, a flow record's) read alike at
every import site and need an alias to tell apart; a unique name says which one it is.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("agent", "ztunnel")


def _classes() -> dict[str, list[str]]:
    """Class name -> every `path:line` that defines it (nested classes included)."""
    where: dict[str, list[str]] = defaultdict(list)
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "proto" in path.parts and path.name.endswith("_pb2.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef):
                    where[node.name].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return where


def test_no_two_classes_share_a_name() -> None:
    shared = {name: places for name, places in _classes().items() if len(places) > 1}
    assert not shared, "classes sharing a name: " + "; ".join(
        f"{name} at {', '.join(places)}" for name, places in sorted(shared.items()))


def test_the_scan_sees_the_classes() -> None:
    # A scan that found nothing would pass the test above without checking anything.
    found = _classes()
    assert "PolicyVerdict" in found and "KernelVerdict" in found and "FlowVerdict" in found
