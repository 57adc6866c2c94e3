"""bpf/lib/verdicts.h and agent/datapath/verdicts.py must say the same thing."""

from __future__ import annotations

import enum
import re

from agent.datapath import verdicts
from agent.datapath.source import bpf_dir

GROUPS: dict[str, type[enum.IntEnum]] = {
    "NM_VERDICT_": verdicts.KernelVerdict,
    "NM_REASON_": verdicts.Reason,
    "NM_EVENT_": verdicts.KernelEventKind,
    "NM_DIR_": verdicts.KernelDirection,
    "NM_CTR_": verdicts.Counter,
}


def header_defines() -> dict[str, int]:
    text = (bpf_dir() / "lib" / "verdicts.h").read_text()
    return {m[1]: int(m[2], 0) for m in re.finditer(r"^#define\s+(NM_\w+)\s+(\w+)", text, re.M)
            if m[2][0].isdigit()}


def test_every_header_value_is_mirrored_exactly() -> None:
    defines = header_defines()
    for prefix, enum_type in GROUPS.items():
        from_header = {k[len(prefix):]: v for k, v in defines.items()
                       if k.startswith(prefix) and k != "NM_CTR_MAX"}
        from_python = {m.name: int(m.value) for m in enum_type}
        assert from_header == from_python, f"{prefix}* differs from {enum_type.__name__}"
    assert defines["NM_CTR_MAX"] == verdicts.COUNTER_SLOTS


def test_rate_limit_counters_are_mirrored_exactly() -> None:
    text = (bpf_dir() / "lib" / "ratelimit.h").read_text()
    defines = {m[1]: int(m[2]) for m in re.finditer(r"^#define\s+NM_RL_CTR_(\w+)\s+(\d+)", text,
                                                     re.M)}
    assert defines.pop("MAX") == verdicts.RATE_LIMIT_COUNTER_SLOTS
    assert defines == {m.name: int(m.value) for m in verdicts.RateLimitCounter}


def test_numbers_are_unique_within_each_registry() -> None:
    defines = header_defines()
    for prefix in GROUPS:
        values = [v for k, v in defines.items() if k.startswith(prefix) and k != "NM_CTR_MAX"]
        assert len(values) == len(set(values)), f"{prefix}* reuses a number"


def test_the_parser_sees_the_header() -> None:
    # Guards the test itself: an empty parse would make the comparisons vacuous.
    assert len(header_defines()) >= 15
