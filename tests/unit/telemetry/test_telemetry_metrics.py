"""Scenarios: records fed to the pipeline come out of a real HTTP scrape with Istio's names and
labels; BPF-map counters are read at scrape time; agent self-metrics are exposed."""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from agent.telemetry.flow import FlowRecord
from agent.telemetry.metrics import (
    CHILD_CACHE,
    OPENED,
    TRAFFIC_LABELS,
    AgentMetrics,
    FlowMetrics,
    ScrapeCollector,
)
from agent.telemetry.pipeline import Telemetry, TelemetryConfig
from agent.telemetry.server import MetricsServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: CollectorRegistry, path: str = "/metrics", accept: str = "") -> str:
    """Serve `registry` on an ephemeral loopback port and fetch `path` over real HTTP."""

    async def go() -> str:
        async with MetricsServer(registry, host="127.0.0.1", port=0) as server:
            assert server.port != 0
            headers = {"Accept": accept} if accept else {}
            async with aiohttp.ClientSession() as s, \
                    s.get(f"http://127.0.0.1:{server.port}{path}", headers=headers) as resp:
                assert resp.status == 200
                return await resp.text()

    return asyncio.run(go())


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def by_name(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def fed(records: list[FlowRecord]) -> Telemetry:
    tel = Telemetry(TelemetryConfig(node="node-1"))
    for rec in records:
        tel.emit(rec)
    return tel


SLEEP_TO_REVIEWS = {
    "reporter": "destination",
    "source_workload": "sleep", "source_canonical_service": "sleep",
    "source_canonical_revision": "v1", "source_workload_namespace": "default",
    "source_principal": "spiffe://cluster.local/ns/default/sa/sleep", "source_app": "sleep",
    "source_version": "v1", "source_cluster": "unknown",
    "destination_service": "reviews.prod.svc.cluster.local",
    "destination_service_namespace": "prod", "destination_service_name": "reviews",
    "destination_workload": "reviews-v2", "destination_canonical_service": "reviews",
    "destination_canonical_revision": "v2", "destination_workload_namespace": "prod",
    "destination_principal": "spiffe://cluster.local/ns/prod/sa/reviews",
    "destination_app": "reviews", "destination_version": "v2", "destination_cluster": "kind-a",
    "request_protocol": "tcp", "response_flags": "-",
    "connection_security_policy": "mutual_tls",
}


def labels(base: dict[str, str], **changes: str) -> frozenset[tuple[str, str]]:
    return frozenset({**base, **changes}.items())


def test_scraped_istio_metrics_equal_what_was_fed(records: list[FlowRecord]) -> None:
    samples = parse(scrape(fed(records).registry))
    assert set(SLEEP_TO_REVIEWS) == set(TRAFFIC_LABELS)

    ok = labels(SLEEP_TO_REVIEWS)
    connect = labels(SLEEP_TO_REVIEWS, response_flags="CONNECT")
    deny = labels(SLEEP_TO_REVIEWS, response_flags="DENY")
    source_side = labels(SLEEP_TO_REVIEWS, reporter="source",
                         connection_security_policy="unknown")
    outsider = {**SLEEP_TO_REVIEWS, "source_workload": "unknown",
                "source_canonical_service": "unknown", "source_canonical_revision": "unknown",
                "source_workload_namespace": "unknown", "source_principal": "unknown",
                "source_app": "unknown", "source_version": "unknown",
                "connection_security_policy": "unknown"}

    assert by_name(samples, "istio_tcp_connections_opened_total") == {ok: 2, source_side: 1}
    assert by_name(samples, "istio_tcp_connections_closed_total") == {ok: 1, connect: 1}
    # Istio's direction: received = request bytes (source → destination), sent = response.
    assert by_name(samples, "istio_tcp_received_bytes_total") == {ok: 1200, connect: 300}
    assert by_name(samples, "istio_tcp_sent_bytes_total") == {ok: 34000}
    assert by_name(samples, "istio_tcp_connections_failed_total") == {
        connect: 1, deny: 1, labels(outsider, response_flags="DENY"): 1,
        labels(outsider, response_flags="TLS_FAILURE"): 1}

    sec = {"reporter": "destination", "destination_workload": "reviews-v2",
           "destination_workload_namespace": "prod"}
    assert by_name(samples, "nodemesh_policy_denies_total") == {
        labels(sec, reason="policy_deny",
               source_principal="spiffe://cluster.local/ns/default/sa/sleep",
               source_workload="sleep", source_workload_namespace="default"): 1,
        labels(sec, reason="mtls_required", source_principal="unknown",
               source_workload="unknown", source_workload_namespace="unknown"): 1,
    }
    assert by_name(samples, "nodemesh_auth_failures_total") == {
        labels(sec, reason="TLS_HANDSHAKE", source_principal="unknown",
               source_workload="unknown", source_workload_namespace="unknown"): 1,
    }
    # Exactly Istio's names: no `_created` companions, no doubled `_total`.
    names = {name for name, _ in samples}
    assert not any(n.endswith(("_created", "_total_total")) for n in names)


def test_stats_prometheus_and_openmetrics_serve_the_same_values(
        records: list[FlowRecord]) -> None:
    registry = fed(records).registry
    plain = scrape(registry, "/metrics")
    assert scrape(registry, "/stats/prometheus") == plain
    om = scrape(registry, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert om.rstrip().endswith("# EOF")
    om_values = {k: v for k, v in parse(om.replace("# EOF", "")).items()}
    assert om_values == parse(plain)


def test_counts_accumulate_across_scrapes(records: list[FlowRecord]) -> None:
    tel = fed(records)
    first = by_name(parse(scrape(tel.registry)), "istio_tcp_connections_opened_total")
    tel.emit(records[0])
    second = by_name(parse(scrape(tel.registry)), "istio_tcp_connections_opened_total")
    key = labels(SLEEP_TO_REVIEWS)
    assert second[key] == first[key] + 1


def test_bpf_map_counters_are_read_at_scrape_time() -> None:
    registry = CollectorRegistry()
    m = AgentMetrics(registry, tag="1.2.3")
    drops = {"flows": 0}
    m.ringbuf_drops.set_reader(lambda: drops)
    m.map_fill.set_reader(lambda: {"nodemesh_policy_v1": 0.25, "nodemesh_ipcache_v1": 0.5})
    by_reason: dict[tuple[str, ...], float] = {("policy_deny",): 7}
    m.datapath_drops.set_reader(lambda: by_reason)
    m.enrolled_pods.set_reader(lambda: 3)
    m.policy_update_seconds.observe(0.002)
    m.policy_update_seconds.observe(0.3)
    m.policy_update_seconds.observe(60)

    drops["flows"] = 41  # the reader runs at scrape time, so the scrape sees the new value
    s = parse(scrape(registry))
    assert by_name(s, "nodemesh_ringbuf_drops_total") == {frozenset({("ring", "flows")}): 41}
    assert by_name(s, "nodemesh_bpf_map_fill_ratio") == {
        frozenset({("map", "nodemesh_policy_v1")}): 0.25,
        frozenset({("map", "nodemesh_ipcache_v1")}): 0.5}
    assert by_name(s, "nodemesh_bpf_drops_total") == {frozenset({("reason", "policy_deny")}): 7}
    assert by_name(s, "nodemesh_enrolled_pods") == {frozenset(): 3}
    buckets = {dict(k)["le"]: v for k, v in
               by_name(s, "nodemesh_policy_update_duration_seconds_bucket").items()}
    assert buckets["0.001"] == 0 and buckets["0.0025"] == 1
    assert buckets["0.25"] == 1 and buckets["0.5"] == 2
    assert buckets["10.0"] == 2 and buckets["+Inf"] == 3
    assert by_name(s, "nodemesh_policy_update_duration_seconds_count") == {frozenset(): 3}
    assert math.isclose(
        by_name(s, "nodemesh_policy_update_duration_seconds_sum")[frozenset()], 60.302)
    assert by_name(s, "istio_build") == {
        frozenset({("component", "nodemesh"), ("tag", "1.2.3")}): 1}
    (info,) = by_name(s, "nodemesh_build_info")
    assert dict(info)["tag"] == "1.2.3"
    assert dict(info)["compiled"] == "unknown"  # nobody said what the data path runs


@pytest.mark.parametrize(("compiled", "label"), [(True, "yes"), (False, "no")])
def test_build_info_says_whether_the_data_path_is_compiled(compiled: bool, label: str) -> None:
    tel = Telemetry(TelemetryConfig(node="node-1", compiled=compiled))
    (info,) = by_name(parse(scrape(tel.registry)), "nodemesh_build_info")
    assert dict(info)["compiled"] == label


def test_a_failing_reader_loses_only_its_own_samples(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    m = AgentMetrics(registry)

    def broken() -> dict[str, float]:
        raise OSError(9, "Bad file descriptor")

    m.map_fill.set_reader(broken)
    m.enrolled_pods.set_reader(lambda: 2)
    s = parse(scrape(registry))
    assert by_name(s, "nodemesh_bpf_map_fill_ratio") == {}
    assert by_name(s, "nodemesh_enrolled_pods") == {frozenset(): 2}
    assert m.map_fill.errors == 1
    assert "nodemesh_bpf_map_fill_ratio" in caplog.text


def test_reader_shape_must_match_the_labels() -> None:
    registry = CollectorRegistry()
    c = ScrapeCollector(registry, "nodemesh_test_things_total", "things", "counter", ("a", "b"),
                        read=lambda: {"only-one": 1})
    assert [s for fam in registry.collect() for s in fam.samples] == []
    assert c.errors == 1
    assert c.name == "nodemesh_test_things"  # `_total` is the exposition's to add


def test_registering_the_same_metrics_twice_is_refused() -> None:
    registry = CollectorRegistry()
    AgentMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        AgentMetrics(registry)


def test_a_sink_that_raises_does_not_stop_the_others(records: list[FlowRecord]) -> None:
    tel = Telemetry(TelemetryConfig(node="node-1"))
    seen: defaultdict[str, int] = defaultdict(int)

    def broken(_rec: FlowRecord) -> None:
        raise RuntimeError("sink bug")

    def counting(rec: FlowRecord) -> None:
        seen[rec.kind] += 1

    tel.sinks.insert(0, broken)
    tel.sinks.append(counting)
    for rec in records:
        tel.emit(rec)
    assert sum(seen.values()) == len(records)
    assert tel.sink_errors == len(records)
    assert len(tel.hub.recent()) == len(records)


def test_metrics_server_reports_a_busy_port_clearly() -> None:
    async def go() -> None:
        async with MetricsServer(CollectorRegistry(), host="127.0.0.1", port=0) as first:
            second = MetricsServer(CollectorRegistry(), host="127.0.0.1", port=first.port)
            with pytest.raises(OSError, match=r"cannot serve metrics on 127\.0\.0\.1"):
                await second.start()

    asyncio.run(go())


def test_the_label_children_cache_is_bounded_and_counts_what_it_dropped() -> None:
    registry = CollectorRegistry()
    fm = FlowMetrics(registry)
    for i in range(CHILD_CACHE + 5):
        fm._child(OPENED, tuple(f"v{i}" for _ in TRAFFIC_LABELS))
        assert fm.children_cached() <= CHILD_CACHE
    assert fm.children_evicted == CHILD_CACHE and fm.children_cached() == 5
    # the registry keeps every child: nothing counted was lost
    assert sum(1 for m in registry.collect() if m.name == OPENED
               for s in m.samples if s.name.endswith("_total")) == CHILD_CACHE + 5
