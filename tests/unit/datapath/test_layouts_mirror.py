"""Every struct the agent packs for a map or reads from the ring buffer has its size asserted in
C (`_Static_assert` in bpf/lib/*.h, so the compile fails on a drift) and that size is the one
agent/datapath/layouts.py packs."""

from __future__ import annotations

import re
import struct

import pytest

from agent.datapath import layouts
from agent.datapath.source import bpf_dir

pytestmark = pytest.mark.unit

ASSERT = re.compile(r'_Static_assert\(sizeof\(struct (\w+)\) == (\d+), "layouts\.py (\w+)"\);')
EXPECTED = {"conn_entry", "conn_tuple", "upstream_key", "upstream_entry", "enroll_entry",
            "flow_event", "ipcache_key", "ipcache_entry", "policy_key", "policy_entry",
            "trusted_entry", "lb4_active", "rl_cfg_key", "rl_cfg", "rl_key", "rl_state",
            "bypass_entry"}


def _asserts() -> dict[str, tuple[int, str]]:
    found: dict[str, tuple[int, str]] = {}
    for header in sorted((bpf_dir() / "lib").glob("*.h")):
        for m in ASSERT.finditer(header.read_text()):
            found[m[1]] = (int(m[2]), m[3])
    return found


def test_each_struct_size_is_asserted_in_c_and_matches_layouts() -> None:
    found = _asserts()
    assert set(found) == EXPECTED
    for name, (size, layout) in found.items():
        value = getattr(layouts, layout)
        python_size = value.size if isinstance(value, struct.Struct) else value
        assert python_size == size, f"struct {name}: C {size}, layouts.{layout} {python_size}"
