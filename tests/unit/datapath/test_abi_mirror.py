"""agent/abi.py and bpf/lib/common.h state the same kernel contract (ports, mark layout,
reserved identity ids), and options.py hands the C side exactly these values."""

from __future__ import annotations

import re

import pytest

from agent import abi
from agent.datapath.options import BuildOptions
from agent.datapath.source import bpf_dir

pytestmark = pytest.mark.unit


def _defines() -> dict[str, int]:
    text = (bpf_dir() / "lib" / "common.h").read_text()
    return {m[1]: int(m[2], 0) for m in re.finditer(r"^#define\s+(NM_\w+)\s+(0x[0-9a-f]+|\d+)\s*$",
                                                    text, re.M | re.I)}


def test_common_h_matches_abi() -> None:
    d = _defines()
    assert (d["NM_OUTBOUND_PORT"], d["NM_INBOUND_PORT"], d["NM_HBONE_PORT"]) == (
        abi.OUTBOUND_PORT, abi.INBOUND_PORT, abi.HBONE_PORT)
    assert (d["NM_MARK_MAGIC"], d["NM_MARK_MASK"], d["NM_MARK_ID_SHIFT"]) == (
        abi.MARK_MAGIC, abi.MARK_MASK, abi.MARK_ID_SHIFT)
    assert (d["NM_ID_PLAINTEXT"], d["NM_ID_TUNNEL"]) == (abi.ID_PLAINTEXT, abi.ID_TUNNEL)
    assert abi.MARK_ID_SHIFT + abi.IDENTITY_BITS == 32
    assert abi.MARK_MAGIC & ~abi.MARK_MASK == 0


def test_build_options_default_to_the_abi() -> None:
    flags = " ".join(BuildOptions().cflags())
    for name, value in (("NM_OUTBOUND_PORT", abi.OUTBOUND_PORT), ("NM_INBOUND_PORT",
                        abi.INBOUND_PORT), ("NM_HBONE_PORT", abi.HBONE_PORT)):
        assert f"-D{name}={value}" in flags
    assert abi.mark(7) == (7 << 12) | 0x539


def test_the_service_dst_option_matches_the_getsockopt_program() -> None:
    text = (bpf_dir() / "sockopt_origdst.c").read_text()
    m = re.search(r"#define NM_SO_SERVICE_DST (0x[0-9a-f]+|\d+)", text)
    assert m is not None and int(m[1], 0) == abi.SO_SERVICE_DST
