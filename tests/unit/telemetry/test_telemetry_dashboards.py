"""Scenarios: the Grafana dashboard is well-formed Grafana JSON, and every PromQL expression in it
and in the alert rules names only metrics the agent really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.registry import CollectorRegistry

from agent.identity.metrics import CertificateMetrics
from agent.telemetry.metrics import SECURITY_LABELS, exposed_names
from agent.telemetry.pipeline import Telemetry, TelemetryConfig

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "daemonset/grafana/nodemesh-dashboard.json"
ALERTS = ROOT / "daemonset/prometheus/nodemesh-alerts.yaml"

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"row", "stat", "timeseries", "table", "gauge", "bargauge", "heatmap", "text"}
# Keywords and modifiers: identifiers in PromQL that are not metric names (functions are told
# apart by the parenthesis that follows them).
PROMQL_WORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (a small lexer, enough for our rules)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def balanced(expr: str) -> bool:
    depth = 0
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', "", expr):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def test_the_lexer_finds_metrics_and_only_metrics() -> None:
    expr = ('topk(10, sum by (reason) (rate(foo_total{a="b{c}", d=~"$x"}[$__rate_interval] '
            'offset 5m)) > 3 * bar) unless on (le) histogram_quantile(0.9, baz_bucket) '
            'and time() - qux_seconds > 1e3')
    assert metric_names(expr) == {"foo_total", "bar", "baz_bucket", "qux_seconds"}
    assert balanced(expr) and not balanced("sum(rate(x[5m])")


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """The names a node agent exposes: telemetry plus the identity subsystem's metrics."""
    registry = CollectorRegistry()
    Telemetry(TelemetryConfig(node="node-1"), registry)
    CertificateMetrics(registry)
    return exposed_names(registry)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            # label_values(<selector>, <label>): the selector is PromQL, the label is not.
            q = var["query"]["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            assert m, f"unexpected variable query {q!r}"
            exprs.append(m.group(1))
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"]
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def test_dashboard_is_grafana_json_with_datasource_refs() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        assert p["type"] in PANEL_TYPES, p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
    for p in panels():
        assert p["datasource"] == DATASOURCE_REF, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE_REF
            assert t["expr"].strip() and balanced(t["expr"]), t["expr"]
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var in GRAFANA_BUILTINS, f"undefined ${var}"


def test_dashboard_covers_traffic_security_and_certificates() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert {"istio_tcp_connections_opened_total", "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total", "nodemesh_policy_denies_total",
            "nodemesh_certificate_expiry_timestamp_seconds"} <= used
    titles = {p["title"] for p in panels()}
    assert "Top talkers (bytes/s, both directions)" in titles
    assert "Policy denies by reason" in titles


def test_every_dashboard_expression_names_exported_metrics(exported: set[str]) -> None:
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= exported, f"{sorted(names - exported)} are not exported ({expr!r})"


def test_alert_rules_are_well_formed_and_name_exported_metrics(exported: set[str]) -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules)
    for r in rules:
        assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"])
        assert r["labels"]["severity"] in {"info", "warning", "critical"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        for text in r["annotations"].values():
            for ref in re.findall(r"\{\{(.*?)\}\}", text):
                assert re.fullmatch(r"\s*\$(value|labels\.\w+)( \| humanize)?\s*", ref), ref
        assert balanced(r["expr"]), r["alert"]
        names = metric_names(r["expr"])
        assert names and names <= exported, f"{r['alert']}: {sorted(names - exported)}"


def test_anomaly_alerts_are_per_identity_on_deny_and_auth_failure_counters() -> None:
    spikes = {r["alert"]: r["expr"] for r in alert_rules() if r["alert"].endswith("Spike")}
    assert metric_names(spikes["NodemeshDenySpike"]) == {"nodemesh_policy_denies_total"}
    assert metric_names(spikes["NodemeshAuthFailureSpike"]) == {"nodemesh_auth_failures_total"}
    assert "source_principal" in SECURITY_LABELS
    for expr in spikes.values():
        groupings = re.findall(r"by \(([^)]*)\)", expr)
        assert groupings and all(g == "source_principal" for g in groupings)
        assert "[5m]" in expr and "[1h] offset 5m" in expr
