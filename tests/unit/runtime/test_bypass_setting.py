"""The same-node bypass switch: on by default, on|off from env or flag, anything else refused
with the setting's name and origin; bypassed kernel flows become one source-side record."""

from __future__ import annotations

import ipaddress

import pytest

from agent import config
from agent.datapath.layouts import FLOW_EVENT, FLOW_EVENT_FLAGS_OFFSET, FlowEvent
from agent.datapath.verdicts import KernelEventKind
from agent.runtime import flows
from agent.telemetry.flow import Reporter, SecurityPolicy

pytestmark = pytest.mark.unit


def test_switch_defaults_on_and_takes_on_or_off() -> None:
    assert config.build({"NODEMESH_CONFIG": "m.yaml"}).same_node_bypass is True
    env = {"NODEMESH_CONFIG": "m.yaml", "NODEMESH_SAME_NODE_BYPASS": "off"}
    assert config.build(env).same_node_bypass is False
    assert config.build(env, {"same_node_bypass": "ON"}).same_node_bypass is True
    with pytest.raises(config.ConfigError, match="same_node_bypass from flag --same-node-bypass"):
        config.build({"NODEMESH_CONFIG": "m.yaml"}, {"same_node_bypass": "yes"})


def _event(kind: KernelEventKind, flags: int) -> FlowEvent:
    raw = bytearray(FLOW_EVENT.pack(1, 2, 3, 40, 50, 6, b"\n\xfb\0\n", b"\n\xfb\0\x0b", 40000,
                                    8080, 7, 0, 0, int(kind), 1, 0, 1, b"\0\0\0\0", 0))
    raw += bytes(88 - len(raw))
    raw[FLOW_EVENT_FLAGS_OFFSET] = flags
    return FlowEvent.unpack(bytes(raw))


def test_bypassed_close_is_one_untunnelled_source_record() -> None:
    ev = _event(KernelEventKind.CLOSE, 1)
    assert ev.bypass and ev.dst_ip == ipaddress.IPv4Address("10.251.0.11")
    rec = flows.from_kernel(ev, lambda _ip: None, lambda _p: "")
    assert (rec.reporter, rec.tunneled, rec.bytes_sent, rec.bytes_received) == (
        Reporter.SOURCE, False, 40, 50)
    assert rec.connection_security_policy == SecurityPolicy.UNKNOWN
    plain = flows.from_kernel(_event(KernelEventKind.CLOSE, 0), lambda _ip: None, lambda _p: "")
    assert not _event(KernelEventKind.CLOSE, 0).bypass and plain.tunneled
