"""Scenarios: flow and audit log lines validate against the schemas documented in
docs/telemetry.md; records survive a JSON round trip; logs rotate by size; malformed records
are rejected with the field named."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from telemetry_samples import OUTSIDER, REVIEWS, SLEEP, T0

from agent.telemetry.flow import (
    FLOW_SCHEMA,
    REFUSAL_KINDS,
    RESPONSE_FLAGS,
    FlowEndpoint,
    FlowEventKind,
    FlowRecord,
    FlowRecordError,
    FlowVerdict,
    Reporter,
    SecurityPolicy,
    rfc3339,
)
from agent.telemetry.flowlog import AUDIT_SCHEMA, AuditLog, RotatingFile
from agent.telemetry.pipeline import Telemetry, TelemetryConfig

DOC = Path(__file__).resolve().parents[3] / "docs/telemetry.md"


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


FLOW = validator(FLOW_SCHEMA)
AUDIT = validator(AUDIT_SCHEMA)


def doc_blocks(kind: str, schema_id: str) -> list[Any]:
    pattern = rf"<!-- {kind} {re.escape(schema_id)} -->\n```json\n(.*?)\n```"
    return [json.loads(b) for b in re.findall(pattern, DOC.read_text(), re.DOTALL)]


def test_documented_schemas_are_the_ones_in_code() -> None:
    assert doc_blocks("schema", "nodemesh.flow/v2") == [FLOW_SCHEMA]
    assert doc_blocks("schema", "nodemesh.audit/v1") == [AUDIT_SCHEMA]


def test_documented_examples_validate() -> None:
    flows = doc_blocks("example", "nodemesh.flow/v2")
    audits = doc_blocks("example", "nodemesh.audit/v1")
    assert flows and audits
    for ex in flows:
        FLOW.validate(ex)
        FlowRecord.from_dict(ex)
    for ex in audits:
        AUDIT.validate(ex)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_flow_and_audit_logs_validate_against_the_schemas(
        tmp_path: Path, records: list[FlowRecord]) -> None:
    tel = Telemetry(TelemetryConfig(node="node-1", flow_log=tmp_path / "flows.log",
                                    audit_log=tmp_path / "audit.log"))
    try:
        for rec in records:
            tel.emit(rec)
    finally:
        tel.close()

    flows = read_lines(tmp_path / "flows.log")
    terminal = [r for r in records if r.kind is not FlowEventKind.OPEN]
    assert len(flows) == len(terminal) == 5
    for line, rec in zip(flows, terminal, strict=True):
        FLOW.validate(line)
        assert FlowRecord.from_dict(line) == rec

    audits = read_lines(tmp_path / "audit.log")
    assert [a["event"] for a in audits] == ["policy_deny", "policy_deny", "auth_failure"]
    for a in audits:
        AUDIT.validate(a)
    first, _, auth = audits
    assert first["ts"] == "2026-03-04T05:06:07.123456Z"
    assert first["severity"] == "warning" and auth["severity"] == "error"
    assert first["node"] == "node-1"
    assert first["source"] == {"identity": "spiffe://cluster.local/ns/default/sa/sleep",
                               "workload": "sleep", "namespace": "default", "ip": "10.0.1.5",
                               "port": 40312}
    assert (first["policy"], first["rule"], first["reason"], first["reason_code"]) == (
        "prod/deny-sleep", "0", "policy_deny", 1)
    assert auth["source"] == {"identity": None, "workload": None, "namespace": None,
                              "ip": "192.0.2.9", "port": 51000}
    assert auth["response_flags"] == "TLS_FAILURE"
    assert (tmp_path / "audit.log").stat().st_mode & 0o777 == 0o640


def test_schema_catches_what_a_sloppy_writer_would_get_wrong(records: list[FlowRecord]) -> None:
    good = records[1].to_dict()
    for bad in ({**good, "time": "2026-03-04 05:06:07"}, {**good, "bytes_sent": -1},
                {**good, "response_flags": "NOPE"}, {**good, "extra": 1},
                {k: v for k, v in good.items() if k != "reporter"}):
        assert not FLOW.is_valid(bad)


def test_logs_rotate_by_size_keeping_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, node="node-1", max_bytes=2000, backups=2)
    deny = FlowRecord(FlowEventKind.DENY, Reporter.DESTINATION, SLEEP, REVIEWS, time=T0,
                      verdict=FlowVerdict.DENIED, reason="policy_deny")
    try:
        for i in range(40):
            log.write(replace(deny, time=T0 + timedelta(seconds=i)))
    finally:
        log.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["audit.log", "audit.log.1", "audit.log.2"]
    times: list[str] = []
    for f in (tmp_path / "audit.log.2", tmp_path / "audit.log.1", path):
        assert f.stat().st_size <= 2000
        lines = read_lines(f)
        assert lines
        for line in lines:
            AUDIT.validate(line)
        times += [line["ts"] for line in lines]
    # What is kept is the newest run of lines, in order, ending with the last one written.
    assert times == sorted(times)
    assert times[-1] == "2026-03-04T05:06:46.123456Z"


def test_a_failed_write_is_counted_not_raised(tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    f = RotatingFile(logdir / "flows.log", max_bytes=10, backups=1)
    assert f.write_line("x" * 20)  # first line always goes in, even past the limit
    (logdir / "flows.log").unlink()
    logdir.rmdir()  # rotation now has nowhere to go
    assert not f.write_line("y")
    assert not f.write_line("z")
    assert f.errors == 2
    f.close()


def test_missing_log_directory_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="directory does not exist"):
        RotatingFile(tmp_path / "nope" / "flows.log")


@pytest.mark.parametrize(("change", "message"), [
    ({"schema": "nodemesh.flow/v0"}, "different versions"),
    ({"kind": "opened"}, "kind: 'opened' is not one of"),
    ({"bytes_sent": "12"}, "bytes_sent: wrong type"),
    ({"tunneled": 1}, "tunneled: wrong type"),
    ({"reason_code": True}, "reason_code: wrong type"),
    ({"time": "2026-03-04T05:06:07"}, "no time zone"),
    ({"response_flags": "UF"}, "not an Istio flag"),
    ({"verdict": "denied"}, "verdict denied needs kind deny"),
    ({"surprise": 1}, "unknown fields"),
])
def test_malformed_json_records_name_the_problem(
        records: list[FlowRecord], change: dict[str, Any], message: str) -> None:
    data = {**records[1].to_dict(), **change}
    with pytest.raises(FlowRecordError, match=re.escape(message)):
        FlowRecord.from_dict(data)


def test_endpoint_and_record_invariants() -> None:
    with pytest.raises(FlowRecordError, match="SPIFFE URI"):
        FlowEndpoint(principal="cluster.local/ns/a/sa/b")
    with pytest.raises(FlowRecordError, match="not an IPv4/IPv6 address"):
        FlowEndpoint(ip="10.0.0.300")
    with pytest.raises(FlowRecordError, match="port 70000"):
        FlowEndpoint(port=70000)
    with pytest.raises(FlowRecordError, match="timezone-aware"):
        FlowRecord(FlowEventKind.OPEN, Reporter.SOURCE, SLEEP, REVIEWS, time=datetime(2026, 1, 1))
    with pytest.raises(FlowRecordError, match="must have verdict denied"):
        FlowRecord(FlowEventKind.DENY, Reporter.SOURCE, SLEEP, REVIEWS)
    # Enums given as strings are stored as enums; other time zones are normalised to UTC.
    plus2 = timezone(timedelta(hours=2))
    rec = FlowRecord("close", "source", OUTSIDER, REVIEWS,  # type: ignore[arg-type]  # producers may pass table strings
                     time=T0.astimezone(plus2))
    assert rec.kind is FlowEventKind.CLOSE and rec.reporter is Reporter.SOURCE
    assert rec.time == T0 and rec.time.tzinfo == UTC


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", max_size=20)
_endpoints = st.builds(
    FlowEndpoint, workload=_names, namespace=_names,
    principal=st.sampled_from(["", "spiffe://cluster.local/ns/a/sa/b"]),
    ip=st.ip_addresses().map(str) | st.just(""), port=st.integers(0, 65535), service=_names,
    canonical_service=_names, canonical_revision=_names, app=_names, version=_names,
    cluster=_names)


@st.composite
def _records(draw: st.DrawFn) -> FlowRecord:
    kind = draw(st.sampled_from(list(FlowEventKind)))
    refused = kind in REFUSAL_KINDS
    return FlowRecord(
        kind, draw(st.sampled_from(list(Reporter))), draw(_endpoints), draw(_endpoints),
        time=draw(st.datetimes(timezones=st.just(UTC))),
        verdict=FlowVerdict.DENIED if refused else FlowVerdict.ALLOWED,
        reason=draw(st.from_regex(r"[A-Za-z0-9_]{0,64}", fullmatch=True)),
        reason_code=draw(st.none() | st.integers(0, 2**31)),
        response_flags=draw(st.sampled_from(sorted(RESPONSE_FLAGS))),
        bytes_sent=draw(st.integers(0, 2**63)), bytes_received=draw(st.integers(0, 2**63)),
        duration=draw(st.floats(0, 1e9, allow_nan=False)), tunneled=draw(st.booleans()),
        connection_security_policy=draw(st.sampled_from(list(SecurityPolicy))),
        policy=draw(_names), rule=draw(_names))


_text = st.text(max_size=12)  # any characters: quotes, controls, non-ASCII, surrogates


@given(_records(), st.builds(FlowEndpoint, workload=_text, namespace=_text, service=_text,
                             canonical_service=_text, canonical_revision=_text, app=_text,
                             version=_text, cluster=_text, ip=st.ip_addresses().map(str)),
       _text, _text, st.text(min_size=1, max_size=12))
def test_the_json_line_is_what_json_dumps_writes(rec: FlowRecord, ep: FlowEndpoint,
                                                 policy: str, rule: str, protocol: str) -> None:
    odd = replace(rec, source=ep, policy=policy, rule=rule, protocol=protocol)
    for r in (rec, odd, replace(odd, destination=ep.at("10.0.0.1", 7))):
        assert r.to_json() == json.dumps(r.to_dict(), separators=(",", ":"))
    naive = rec.time.astimezone(UTC).replace(tzinfo=None)
    assert rfc3339(rec.time) == naive.isoformat(timespec="microseconds") + "Z"


@given(_records())
def test_any_record_round_trips_and_validates(rec: FlowRecord) -> None:
    line = rec.to_json()
    assert "\n" not in line
    FLOW.validate(json.loads(line))
    assert FlowRecord.from_json(line) == rec
