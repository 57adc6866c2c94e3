"""Prometheus metrics: Istio's L4 traffic metrics fed by flow records, plus the agent's own.

Values held in Python are prometheus_client's own Counter and Histogram; counters that live in
BPF maps are read at scrape time (ScrapeCollector) instead of being copied into the process on a
timer. The exposed names must be exactly Istio's (`istio_tcp_sent_bytes_total`, no extra
`*_created` series): importing this module turns prometheus_client's `_created` samples off for
the whole process (`disable_created_metrics`), so every metric of the agent exposes the same way.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final, Generic, Literal, TypeVar

from prometheus_client import Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from agent import __version__
from agent.telemetry.flow import NO_FLAGS, UNKNOWN_LABEL, FlowEventKind, FlowRecord

log = logging.getLogger(__name__)
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

UNKNOWN: Final = UNKNOWN_LABEL

# Istio's CommonTrafficLabels, in ztunnel's order (locality labels are left out: the agent does not
# know node locality).
TRAFFIC_LABELS: Final = (
    "reporter",
    "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_cluster",
    "destination_service", "destination_service_namespace", "destination_service_name",
    "destination_workload", "destination_canonical_service", "destination_canonical_revision",
    "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_cluster",
    "request_protocol", "response_flags", "connection_security_policy",
)
# Security events carry fewer labels: enough to find the identity behind a spike of refusals.
SECURITY_LABELS: Final = (
    "reporter", "reason", "source_principal", "source_workload", "source_workload_namespace",
    "destination_workload", "destination_workload_namespace",
)
# Connection rate limit refusals: the limit (ns/name) in place of the reason.
RATE_LIMIT_LABELS: Final = (
    "reporter", "limit", "source_principal", "source_workload", "source_workload_namespace",
    "destination_workload", "destination_workload_namespace",
)
RATE_LIMITED_REASON: Final = "rate_limited"  # the kernel's Reason.RATE_LIMITED label

# Family names as given to prometheus_client: counters without `_total`, which the exposition
# appends (passing `..._total` would also work: CounterMetricFamily strips it).
OPENED: Final = "istio_tcp_connections_opened"
CLOSED: Final = "istio_tcp_connections_closed"
FAILED: Final = "istio_tcp_connections_failed"
SENT: Final = "istio_tcp_sent_bytes"
RECEIVED: Final = "istio_tcp_received_bytes"
DENIES: Final = "nodemesh_policy_denies"
AUTH_FAILURES: Final = "nodemesh_auth_failures"
RATE_LIMITED: Final = "nodemesh_rate_limited"

# Policy updates are map writes: sub-millisecond normally, up to seconds for a full recompile.
POLICY_UPDATE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                1.0, 2.5, 5.0, 10.0)

Labels = tuple[str, ...]
CHILD_CACHE: Final = 4096  # traffic counter children kept at hand (FlowMetrics._child)


def _known(value: str) -> str:
    return value or UNKNOWN


def traffic_labels(rec: FlowRecord) -> Labels:
    """Istio's traffic label values for a record, `unknown` where the record has nothing (each
    side's from FlowEndpoint.istio_attributes, computed once per endpoint)."""
    return (rec.reporter.value, *rec.source.istio_attributes[3:],
            *rec.destination.istio_attributes,
            _known(rec.protocol), rec.response_flags, rec.connection_security_policy.value)


def security_labels(rec: FlowRecord) -> Labels:
    return (rec.reporter.value, _known(rec.reason or rec.response_flags),
            _known(rec.source.principal), _known(rec.source.workload),
            _known(rec.source.namespace), _known(rec.destination.workload),
            _known(rec.destination.namespace))


def rate_limit_labels(rec: FlowRecord) -> Labels:
    return (rec.reporter.value, _known(rec.policy), _known(rec.source.principal),
            _known(rec.source.workload), _known(rec.source.namespace),
            _known(rec.destination.workload), _known(rec.destination.namespace))


class FlowMetrics:
    """Counters fed by flow records (`record`), exposed under Istio's names.

    open → connections_opened. Terminal events (close, deny, auth_failure, reject) →
    connections_closed
    for close only; bytes (Istio's convention: `received` is the request direction, source →
    destination, `sent` the response direction, whichever side reports); connections_failed when
    the record has a response flag. deny → nodemesh_policy_denies, auth_failure →
    nodemesh_auth_failures, both by reason and source principal (the anomaly alerts use them).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, labelnames: Sequence[str]) -> Counter:
            return Counter(name, _HELP[name], labelnames, registry=registry)

        self._traffic = {name: counter(name, TRAFFIC_LABELS)
                         for name in (OPENED, CLOSED, FAILED, SENT, RECEIVED)}
        self._security = {name: counter(name, SECURITY_LABELS) for name in (DENIES, AUTH_FAILURES)}
        self._security[RATE_LIMITED] = counter(RATE_LIMITED, RATE_LIMIT_LABELS)
        # The traffic counters' children by label values: prometheus_client's labels() checks
        # and converts 25 values under a lock on every call, and every connection needs two to
        # four of them. Bounded: emptied when full (the registry keeps the children).
        self._children: dict[tuple[str, Labels], Counter] = {}
        self.children_evicted = 0  # cache entries dropped because it was full (a metric)

    def _child(self, name: str, labels: Labels) -> Counter:
        child = self._children.get((name, labels))
        if child is None:
            if len(self._children) >= CHILD_CACHE:
                self.children_evicted += len(self._children)
                self._children.clear()
            child = self._children[(name, labels)] = self._traffic[name].labels(*labels)
        return child

    def children_cached(self) -> int:
        return len(self._children)

    def record(self, rec: FlowRecord) -> None:
        labels = traffic_labels(rec)
        if rec.kind is FlowEventKind.OPEN:
            self._child(OPENED, labels).inc()
            return
        if rec.kind is FlowEventKind.CLOSE:
            self._child(CLOSED, labels).inc()
        if rec.bytes_sent:
            self._child(RECEIVED, labels).inc(rec.bytes_sent)
        if rec.bytes_received:
            self._child(SENT, labels).inc(rec.bytes_received)
        if rec.response_flags != NO_FLAGS:
            self._child(FAILED, labels).inc()
        if rec.kind is FlowEventKind.DENY:
            self._security[DENIES].labels(*security_labels(rec)).inc()
            if rec.reason == RATE_LIMITED_REASON:
                self._security[RATE_LIMITED].labels(*rate_limit_labels(rec)).inc()
        elif rec.kind is FlowEventKind.AUTH_FAILURE:
            self._security[AUTH_FAILURES].labels(*security_labels(rec)).inc()


_HELP: Final = {
    OPENED: "TCP connections opened (Istio-compatible)",
    CLOSED: "TCP connections closed (Istio-compatible)",
    FAILED: "TCP connections that ended with a response flag (Istio-compatible)",
    SENT: "Bytes sent in the response direction, destination to source (Istio-compatible)",
    RECEIVED: "Bytes received in the request direction, source to destination (Istio-compatible)",
    DENIES: "Connections denied by L4 authorization policy, by reason and source identity",
    AUTH_FAILURES: "Connections refused for failed mTLS or identity checks, by source identity",
    RATE_LIMITED: "Connections refused by a ConnectionRateLimit (rate or concurrency), by limit "
                  "and source identity",
}

# What a scrape-time reader returns: one value (no labels), a mapping keyed by the single label's
# value, or a mapping keyed by a tuple of label values. ScrapeValue and ScrapeLabelled fix which,
# so a reader of the wrong shape does not type-check.
LabelledValues = Mapping[str, float] | Mapping[Labels, float]
ReadResult = float | LabelledValues
R = TypeVar("R", bound=ReadResult)
MetricKind = Literal["counter", "gauge"]


class ScrapeCollector(Collector, Generic[R]):
    """A counter or gauge whose values are read at scrape time by a callable, e.g. from a BPF map.

    The reader can be set later than construction (the datapath loads after metrics exist); until
    then the family is exposed without samples. A reader that raises costs its samples for that
    scrape, never the scrape itself, and counts in `errors`.
    """

    def __init__(self, registry: CollectorRegistry, name: str, documentation: str,
                 kind: MetricKind, labelnames: Sequence[str] = (), *,
                 read: Callable[[], R] | None = None) -> None:
        if kind == "counter" and name.endswith("_total"):
            name = name[: -len("_total")]
        self.name, self.documentation, self.kind = name, documentation, kind
        self.labelnames = tuple(labelnames)
        self._read = read
        self.errors = 0
        registry.register(self)

    def set_reader(self, read: Callable[[], R] | None) -> None:
        self._read = read

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        fam = self._family()
        read = self._read
        if read is not None:
            try:
                for labels, value in self._normalise(read()):
                    fam.add_metric(labels, value)
            except Exception as exc:  # a broken reader must not break the whole scrape
                self.errors += 1
                log.error("reading %s at scrape time failed; its samples are missing: %s: %.200s",
                          self.name, type(exc).__name__, exc)
                log.debug("scrape reader traceback", exc_info=True)
                fam = self._family()
        yield fam

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def _normalise(self, result: ReadResult) -> Iterable[tuple[Labels, float]]:
        if isinstance(result, int | float):
            if self.labelnames:
                raise TypeError(f"{self.name}: reader returned one value, want one per "
                                f"{self.labelnames}")
            return [((), float(result))]
        out: list[tuple[Labels, float]] = []
        for key, value in result.items():
            labels = key if isinstance(key, tuple) else (key,)
            if len(labels) != len(self.labelnames):
                raise TypeError(f"{self.name}: reader key {key!r} does not match labels "
                                f"{self.labelnames}")
            out.append((labels, float(value)))
        return out


class ScrapeValue(ScrapeCollector[float]):
    """A scrape-time metric without labels: its reader returns one number."""

    def __init__(self, registry: CollectorRegistry, name: str, documentation: str,
                 kind: MetricKind, *, read: Callable[[], float] | None = None) -> None:
        super().__init__(registry, name, documentation, kind, (), read=read)


class ScrapeLabelled(ScrapeCollector[LabelledValues]):
    """A scrape-time metric with labels: its reader returns a value per label value (or tuple)."""

    def __init__(self, registry: CollectorRegistry, name: str, documentation: str,
                 kind: MetricKind, labelnames: Sequence[str], *,
                 read: Callable[[], LabelledValues] | None = None) -> None:
        if not labelnames:
            raise ValueError(f"{name}: a labelled metric needs label names (else ScrapeValue)")
        super().__init__(registry, name, documentation, kind, labelnames, read=read)


class _BuildInfo(Collector):
    def __init__(self, registry: CollectorRegistry, version: str, tag: str,
                 compiled: bool | None) -> None:
        self.version, self.tag = version, tag
        # whether the tunnel's per-hop modules run mypyc-compiled ("unknown": not told)
        self.compiled = "unknown" if compiled is None else "yes" if compiled else "no"
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        istio = GaugeMetricFamily("istio_build", "Istio component build (Istio-compatible)",
                                  labels=("component", "tag"))
        istio.add_metric(("nodemesh", self.tag), 1)
        info = GaugeMetricFamily("nodemesh_build_info", "nodemesh build", labels=(
            "version", "tag", "python", "compiled"))
        info.add_metric((self.version, self.tag, platform.python_version(), self.compiled), 1)
        yield istio
        yield info

    describe = collect


class AgentMetrics:
    """The agent's own metrics. Scrape-time readers are attached by the parts that own the data:

    - `ringbuf_drops.set_reader(lambda: {"flows": n})` — events lost to a full ring buffer
    - `map_fill.set_reader(lambda: {"nodemesh_policy_v1": 0.4, ...})` — entries / max_entries
    - `datapath_drops.set_reader(lambda: {"policy_deny": n, ...})` — kernel drop reasons
    - `enrolled_pods.set_reader(lambda: len(pods))`
    - `stream_dropped.set_reader(hub.dropped_count)` — live-stream records dropped for slow readers
    - `service_connections` / `service_overflows.set_reader(lambda: {(svc, port): n})` — the
      kernel's open-connection count and cap refusals per Service port
    - `endpoint_ejections.set_reader(lambda: {(svc, endpoint): n})`, `endpoints_ejected` — outlier
      detection
    - `same_node_bypass.set_reader(lambda: {"connects": n, "fallback": n, ...})` — the kernel's
      same-node bypass counters
    - `hbone_connections`, `hbone_streams`, `hbone_dial_failures` — the tunnel's connection pool
    and `policy_update_seconds.observe(seconds)` after each policy map update. Certificate
    metrics belong to the identity subsystem (agent/identity/metrics.py).
    """

    def __init__(self, registry: CollectorRegistry, *, version: str = __version__,
                 tag: str | None = None, compiled: bool | None = None) -> None:
        self.ringbuf_drops = ScrapeLabelled(
            registry, "nodemesh_ringbuf_drops", "Flow events lost because a BPF ring buffer "
            "was full", "counter", ("ring",))
        self.map_fill = ScrapeLabelled(
            registry, "nodemesh_bpf_map_fill_ratio", "Entries in a BPF map over its maximum",
            "gauge", ("map",))
        self.datapath_drops = ScrapeLabelled(
            registry, "nodemesh_bpf_drops", "Connections dropped by the kernel datapath, by "
            "verdict reason", "counter", ("reason",))
        self.enrolled_pods = ScrapeValue(
            registry, "nodemesh_enrolled_pods", "Pods on this node enrolled in the mesh",
            "gauge")
        self.stream_dropped = ScrapeValue(
            registry, "nodemesh_flow_stream_dropped", "Flow records not delivered to a live "
            "stream subscriber that was too slow", "counter")
        self.service_connections = ScrapeLabelled(
            registry, "nodemesh_service_connections", "Connections open through a Service port "
            "(the kernel's count for its connection cap)", "gauge", ("service", "port"))
        self.service_overflows = ScrapeLabelled(
            registry, "nodemesh_service_overflows", "Connects to a Service port refused because "
            "its connection cap was reached", "counter", ("service", "port"))
        self.endpoint_ejections = ScrapeLabelled(
            registry, "nodemesh_endpoint_ejections", "Times a Service endpoint was ejected after "
            "consecutive failed connects (outlier detection)", "counter",
            ("service", "port", "endpoint"))
        self.endpoints_ejected = ScrapeLabelled(
            registry, "nodemesh_endpoints_ejected", "Service endpoints ejected now", "gauge",
            ("service", "port"))
        self.same_node_bypass = ScrapeLabelled(
            registry, "nodemesh_same_node_bypass", "Same-node bypass events the kernel counted: "
            "connects sent socket to socket, SYNs let in for them, directions that fell back to "
            "TCP, sockets the sockhash refused", "counter", ("event",))
        self.hbone_connections = ScrapeValue(
            registry, "nodemesh_hbone_connections_opened", "HBONE (mTLS) connections the "
            "tunnel's pool dialed", "counter")
        self.hbone_streams = ScrapeValue(
            registry, "nodemesh_hbone_streams_opened", "CONNECT streams opened on pooled HBONE "
            "connections", "counter")
        self.hbone_dial_failures = ScrapeValue(
            registry, "nodemesh_hbone_dial_failures", "HBONE connections the tunnel's pool "
            "could not dial", "counter")
        self.policy_update_seconds = Histogram(
            "nodemesh_policy_update_duration_seconds", "Time from a policy change to its BPF "
            "maps being updated", buckets=POLICY_UPDATE_BUCKETS, registry=registry)
        self.build = _BuildInfo(registry, version, tag or version, compiled)


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a scrape of the registry can contain (counters with `_total`,
    histograms with `_bucket`/`_sum`/`_count`), whether or not it has samples yet."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"), "info": ("_info",)}
    names: set[str] = set()
    for fam in registry.collect():
        names.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
    return names
