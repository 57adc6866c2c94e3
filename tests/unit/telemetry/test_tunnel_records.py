"""TunnelRecords (the control process's per-event path) gives exactly the records, log lines and
metric labels `from_tunnel` gives, for every shape of event; what varies per connection varies."""

from __future__ import annotations

import dataclasses
import ipaddress
import math

import pytest

from agent.dataplane import wire
from agent.identity.spiffe import Identity
from agent.model.mesh import Workload
from agent.runtime import flows
from agent.telemetry.flow import FlowEndpoint, FlowRecord, FlowRecordError
from agent.telemetry.metrics import traffic_labels
from ztunnel.events import (
    Cause,
    ConnectionEvent,
    Phase,
    ResponseFlag,
    TransportFlag,
    TunnelDirection,
)

SLEEP = Workload("sleep", "default", "sleep", (ipaddress.ip_address("10.0.1.5"),))
DB = Workload("db", "prod", "db", (ipaddress.ip_address("10.0.2.7"),))
SLEEP_ID = Identity.parse("spiffe://cluster.local/ns/default/sa/sleep")
DB_ID = Identity.parse("spiffe://cluster.local/ns/prod/sa/db")
HBONE = TransportFlag.CONNECT | TransportFlag.HBONE
VIPS = {"10.96.0.20": "db.prod.svc.cluster.local"}


def _endpoint_service(ip: str, port: int) -> str:
    return "db.prod.svc.cluster.local" if (ip, port) == ("10.0.2.7", 5432) else ""


def _events(port: int) -> list[ConnectionEvent]:
    """One connection's events on both nodes, plus refusals, Service connects and strangers."""
    out = ConnectionEvent(Phase.OPEN, TunnelDirection.OUTBOUND, "10.0.1.5", port, "10.0.2.7",
                          5432, dst_identity=DB_ID, flags=HBONE)
    inb = dataclasses.replace(out, direction=TunnelDirection.INBOUND, src_identity=SLEEP_ID)
    svc = dataclasses.replace(out, svc_ip="10.96.0.20", svc_port=80)
    stranger = ConnectionEvent(Phase.OPEN, TunnelDirection.INBOUND_PLAINTEXT,
                               f"192.0.2.{port % 200}", port, "10.0.2.7", 5432,
                               flags=TransportFlag.CONNECT)
    evs = [out, out.closed(bytes_sent=port, bytes_received=2 * port), inb,
           inb.closed(bytes_sent=port, bytes_received=0), svc, svc.closed(bytes_sent=1),
           stranger, stranger.closed(bytes_received=port),
           out.refused(ResponseFlag.CONNECT, Cause.UPSTREAM, TransportFlag.UPSTREAM_FAILURE,
                       "503"),
           inb.refused(ResponseFlag.DENY, Cause.STRICT_MTLS, TransportFlag.DENY, "strict"),
           inb.refused(ResponseFlag.IDENTITY_ERROR, Cause.PEER_IDENTITY,
                       TransportFlag.TLS_FAILURE, "who")]
    # As the control process sees them: decoded from the wire (identities are shared objects).
    return [wire.event_from_wire(wire.event_to_wire(ev)) for ev in evs]


def _same(fast: FlowRecord, slow: FlowRecord) -> None:
    assert dataclasses.replace(fast, time=slow.time) == slow
    fast_json, slow_json = fast.to_dict(), slow.to_dict()
    del fast_json["time"], slow_json["time"]
    assert fast_json == slow_json
    assert traffic_labels(fast) == traffic_labels(slow)
    assert fast.time.tzinfo is slow.time.tzinfo  # UTC, as every record's


@pytest.mark.parametrize("ejected", [False, True])
def test_each_event_is_the_record_from_tunnel_gives(ejected: bool) -> None:
    by_ip = {"10.0.1.5": SLEEP, "10.0.2.7": DB}.get
    records = flows.TunnelRecords(by_ip, VIPS.get, _endpoint_service)
    seen: set[tuple[str, int]] = set()
    for port in (40000, 40001, 40002):  # the first builds each shape, the others copy it
        for ev in _events(port):
            fast = records.record(ev, ejected)
            slow = flows.from_tunnel(ev, by_ip, VIPS.get, _endpoint_service, ejected)
            _same(fast, slow)
            seen.add((fast.source.ip, fast.source.port))
    assert ("10.0.1.5", 40002) in seen and ("192.0.2.2", 40002) in seen


def test_a_changed_workload_is_a_new_shape() -> None:
    table = {"10.0.1.5": SLEEP, "10.0.2.7": DB}
    records = flows.TunnelRecords(table.get)
    ev = _events(40000)[0]
    assert records.record(ev).source.workload == "sleep"
    table["10.0.1.5"] = dataclasses.replace(SLEEP, name="sleep-v2")
    assert records.record(ev).source.workload == "sleep-v2"
    del table["10.0.1.5"]
    unknown = records.record(ev).source
    assert (unknown.workload, unknown.principal, unknown.ip) == ("", "", "10.0.1.5")


def test_a_copied_record_is_checked_like_a_built_one() -> None:
    records = flows.TunnelRecords({"10.0.1.5": SLEEP, "10.0.2.7": DB}.get)
    ev = _events(40000)[1]
    records.record(ev)
    for bad in ({"src_ip": "not-an-ip"}, {"src_port": 70000}, {"bytes_sent": -1},
                {"duration": math.inf}):
        with pytest.raises(FlowRecordError):
            records.record(dataclasses.replace(ev, **bad))  # type: ignore[arg-type]


def test_an_endpoint_at_another_address_keeps_only_its_identity() -> None:
    ep = FlowEndpoint(workload="db", namespace="prod", principal=DB_ID.uri, ip="10.0.2.7",
                      port=5432, service="db.prod.svc.cluster.local")
    assert ep.to_dict()["ip"] == ep.to_json().split('"ip":"')[1].split('"')[0] == "10.0.2.7"
    moved = ep.at("10.0.2.8", 1)  # after the caches are filled: the copy shares them
    assert "10.0.2.7" not in str(vars(moved)), vars(moved)  # no cached value keeps the old address
    assert moved == dataclasses.replace(ep, ip="10.0.2.8", port=1)
    assert moved.to_dict() == dataclasses.replace(ep, ip="10.0.2.8", port=1).to_dict()
    assert moved.istio_attributes == ep.istio_attributes


def test_a_full_shape_cache_is_emptied_counted_and_records_stay_exact() -> None:
    # Distinct workloads make distinct shapes (a flood of new peers): the cache never grows past
    # SHAPES, what it dropped is counted (nodemesh_telemetry_cache_evictions), records stay right.
    workloads: dict[str, Workload] = {}
    records = flows.TunnelRecords(workloads.get)
    n = flows.SHAPES + 10
    for i in range(n):
        ip = f"10.{8 + i // 65536}.{i // 256 % 256}.{i % 256}"
        workloads[ip] = Workload(f"w{i}", "default", f"w{i}", (ipaddress.ip_address(ip),))
        ev = ConnectionEvent(Phase.OPEN, TunnelDirection.OUTBOUND, ip, 40000, "10.0.2.7", 5432,
                             dst_identity=DB_ID, flags=HBONE)
        assert records.record(ev).source.workload == f"w{i}"
        assert len(records) <= flows.SHAPES
    assert records.evicted == flows.SHAPES and len(records) == n - flows.SHAPES
