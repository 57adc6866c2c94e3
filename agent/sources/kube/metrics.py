"""Prometheus counters for the Kubernetes source. Without a registry they still count (tests
read them) but are exported nowhere."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class KubeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.events = Counter(
            "nodemesh_kube_events", "Object changes delivered to the state store",
            ["resource", "type"], registry=registry,
        )
        self.relists = Counter(
            "nodemesh_kube_relists", "Lists after the first, forced by 410 Gone",
            ["resource"], registry=registry,
        )
        self.watch_restarts = Counter(
            "nodemesh_kube_watch_restarts",
            "Watches re-opened; reason: closed (server timeout), dropped, expired (410), error",
            ["resource", "reason"], registry=registry,
        )
