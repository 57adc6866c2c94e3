"""Fuzz: flow-event decoding, from the ring buffer's bytes to the NDJSON a reader parses.

- `FlowEvent.unpack` (a nm_events_v1 record): decoded, or a ValueError naming what is wrong;
- `flows.from_kernel` turns every decodable event into a valid FlowRecord;
- `FlowRecord.from_json` (a line of `GET /flows`, read by `nodemesh flows`): a record that
  round-trips, or a FlowRecordError;
- `FlowFilter.from_query` (the endpoint's query string): a filter or a FilterError.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from agent.datapath.layouts import FLOW_EVENT, FlowEvent
from agent.datapath.verdicts import KernelDirection, KernelEventKind, KernelVerdict, Reason
from agent.model.mesh import Labels, Workload
from agent.runtime import flows
from agent.telemetry.flow import FlowEndpoint, FlowEventKind, FlowRecord, FlowRecordError
from agent.telemetry.stream import FilterError, FlowFilter

FIELDS = ("ts", "cookie", "netns", "sent", "recv", "dur", "sip", "dip", "sport", "dport", "sid",
          "policy", "rule", "kind", "verdict", "reason", "direction", "svc_ip", "svc_port")
U64, U32, U16, U8 = 2**64 - 1, 2**32 - 1, 2**16 - 1, 2**8 - 1

WEB = Workload(name="web", namespace="shop", service_account="web",
               ips=(ipaddress.ip_address("10.0.0.1"),), labels=Labels({}))


def by_ip(ip: str) -> Workload | None:
    return WEB if ip == "10.0.0.1" else None


def _decode(raw: bytes) -> FlowEvent | None:
    try:
        ev = FlowEvent.unpack(raw)
    except ValueError as e:
        assert str(e).strip()
        return None
    rec = flows.from_kernel(ev, by_ip, lambda i: f"shop/policy-{i}")
    assert rec.kind in (FlowEventKind.OPEN, FlowEventKind.CLOSE, FlowEventKind.DENY)
    assert FlowRecord.from_json(rec.to_json()) == rec
    return ev


@given(st.binary(max_size=3 * FLOW_EVENT.size))
@example(b"")
@example(b"\x00" * FLOW_EVENT.size)  # kind 0: no such event
def test_arbitrary_bytes_decode_or_are_refused(raw: bytes) -> None:
    _decode(raw)


def _fields(draw: st.DrawFn) -> tuple[int, ...]:
    small = st.sampled_from  # enum fields: mostly valid values, sometimes not
    return (
        draw(st.integers(0, U64)), draw(st.integers(0, U64)), draw(st.integers(0, U64)),
        draw(st.integers(0, U64)), draw(st.integers(0, U64)), draw(st.integers(0, U64)),
        draw(st.binary(min_size=4, max_size=4)), draw(st.binary(min_size=4, max_size=4)),
        draw(st.integers(0, U16)), draw(st.integers(0, U16)), draw(st.integers(0, U32)),
        draw(st.integers(0, U32)), draw(st.integers(0, U16)),
        draw(small([*map(int, KernelEventKind), 0, 4, U8])),
        draw(small([*map(int, KernelVerdict), 0, 3, U8])),
        draw(small([*map(int, Reason), 99, U8])),
        draw(small([*map(int, KernelDirection), 0, 3, U8])),
        draw(st.binary(min_size=4, max_size=4)), draw(st.integers(0, U16)),  # Service VIP:port
    )


@st.composite
def packed_events(draw: st.DrawFn) -> bytes:
    return FLOW_EVENT.pack(*_fields(draw)) + draw(st.binary(max_size=8))


@given(packed_events())
@example(FLOW_EVENT.pack(1, 2, 3, U64, U64, U64, b"\n\0\0\1", b"\n\0\0\2", 1, 2, 3, 0, 0,
                         KernelEventKind.DENY, KernelVerdict.DENY, Reason.POLICY_DENY,
                             KernelDirection.EGRESS,
                         b"\n\x60\0\x14", 80))
def test_well_formed_events_decode_to_valid_flow_records(raw: bytes) -> None:
    _decode(raw)


@given(packed_events())
def test_every_decoded_event_is_the_kernel_record(raw: bytes) -> None:
    values = dict(zip(FIELDS, FLOW_EVENT.unpack(raw[: FLOW_EVENT.size]), strict=True))
    ev = _decode(raw)
    enums_known = (values["kind"] in set(KernelEventKind)
                   and values["verdict"] in set(KernelVerdict)
                   and values["reason"] in set(Reason)
                   and values["direction"] in set(KernelDirection))
    assert (ev is not None) == enums_known
    if ev is not None:
        assert (ev.bytes_sent, ev.src_port, ev.kind) == (values["sent"], values["sport"],
                                                         values["kind"])


RECORD = FlowRecord(
    FlowEventKind.DENY, "destination", FlowEndpoint(workload="web", namespace="shop",
        ip="10.0.0.1", port=80,
                                       principal="spiffe://cluster.local/ns/shop/sa/web"),
    FlowEndpoint(ip="fd00::1", port=443), verdict="denied", reason="policy_deny", reason_code=1,
    bytes_sent=10, duration=1.5, policy="shop/p", rule="0").to_dict()

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
           | st.sampled_from(["", "open", "close", "deny", "auth_failure", "allowed", "denied",
                              "source", "destination", "-", "DENY", "tcp", "10.0.0.1", "::1",
                              "spiffe://td/ns/a/sa/b", "2025-01-02T03:04:05Z",
                              "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00",
                              "2025-01-02T03:04:05", RECORD["schema"]]))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=8)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    return out


@st.composite
def mutated_records(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(RECORD)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        if draw(st.booleans()):
            parent[path[-1]] = draw(json_values)
        else:
            del parent[path[-1]]
    return doc


def _parse(line: str | bytes) -> None:
    try:
        rec = FlowRecord.from_json(line)
    except FlowRecordError as e:
        assert str(e).strip()
        return
    assert FlowRecord.from_json(rec.to_json()) == rec


@given(st.binary(max_size=200) | st.text(max_size=200) | json_values.map(json.dumps))
@example(b"\xff")
@example("NaN")
def test_arbitrary_lines_parse_or_are_refused(line: str | bytes) -> None:
    _parse(line)


@given(mutated_records())
@example({**RECORD, "duration": 10**400})  # float() overflows
@example({**RECORD, "time": "9999-12-31T23:59:59-14:00"})  # past datetime.max in UTC
@example({**RECORD, "time": "0001-01-01T00:00:00+14:00"})  # before datetime.min in UTC
@example({**RECORD, "duration": float("nan")})
@example({**RECORD, "bytes_sent": 2**70})
def test_mutated_records_parse_or_are_refused(doc: dict[str, Any]) -> None:
    _parse(json.dumps(doc))


@given(st.dictionaries(st.sampled_from(["from", "to", "verdict", "namespace", "follow", "x"]),
                       st.text(max_size=40) | scalars.filter(lambda v: isinstance(v, str))))
@example({"from": "9999-12-31T23:59:59-14:00"})
@example({"from": "2025-01-02T03:04:05Z", "to": "2025-01-02T03:04:05+01:00"})
def test_flow_filter_queries_parse_or_are_refused(query: dict[str, str]) -> None:
    try:
        FlowFilter.from_query(query)
    except FilterError as e:
        assert str(e).strip()
