"""The one entry point producers call: `Telemetry.emit(record)` fans a FlowRecord out to every
sink (metrics, flow log, audit log, live stream).

Producers (the ring-buffer reader, the tunnel) hold a Telemetry, or just its `emit` as a
`Callable[[FlowRecord], None]`. A sink that raises is logged and skipped for that record; the
producer never sees the error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.registry import CollectorRegistry

from agent.telemetry.flow import FlowRecord
from agent.telemetry.flowlog import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, AuditLog, FlowLog
from agent.telemetry.metrics import AgentMetrics, FlowMetrics
from agent.telemetry.stream import DEFAULT_QUEUE, DEFAULT_RECENT, FlowHub

log = logging.getLogger(__name__)

Sink = Callable[[FlowRecord], None]


@dataclass(frozen=True)
class TelemetryConfig:
    node: str
    flow_log: Path | None = None  # no file flow log when None
    audit_log: Path | None = None
    log_max_bytes: int = DEFAULT_MAX_BYTES
    log_backups: int = DEFAULT_BACKUPS
    recent: int = DEFAULT_RECENT  # records kept for `GET /flows` without follow
    stream_queue: int = DEFAULT_QUEUE  # per live subscriber
    build_tag: str | None = None
    compiled: bool | None = None  # the tunnel's data path runs mypyc-compiled (ztunnel)


class Telemetry:
    """All sinks wired together on one registry (a fresh one unless given)."""

    def __init__(self, config: TelemetryConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.flow_metrics = FlowMetrics(self.registry)
        self.agent_metrics = AgentMetrics(self.registry, tag=config.build_tag,
                                          compiled=config.compiled)
        self.hub = FlowHub(config.recent, config.stream_queue)
        self.agent_metrics.stream_dropped.set_reader(self.hub.dropped_count)
        self.flow_log = (FlowLog(config.flow_log, config.log_max_bytes, config.log_backups)
                         if config.flow_log else None)
        self.audit_log = (AuditLog(config.audit_log, config.node, config.log_max_bytes,
                                   config.log_backups) if config.audit_log else None)
        self.sinks: list[Sink] = [self.flow_metrics.record, self.hub.publish]
        if self.flow_log is not None:
            self.sinks.append(self.flow_log.write)
        if self.audit_log is not None:
            self.sinks.append(self.audit_log.write)
        self.sink_errors = 0

    def emit(self, rec: FlowRecord) -> None:
        for sink in self.sinks:
            try:
                sink(rec)
            except Exception as exc:  # one broken sink must not cost the others or the data path
                self.sink_errors += 1
                # Bounded: one line for the first failure and every 1000th; traceback at DEBUG.
                if self.sink_errors == 1 or self.sink_errors % 1000 == 0:
                    log.error("BUG: flow sink %s failed (%d failures so far): %s: %.200s",
                              getattr(sink, "__qualname__", sink), self.sink_errors,
                              type(exc).__name__, exc)
                    log.debug("flow sink traceback", exc_info=True)

    def close(self) -> None:
        for f in (self.flow_log, self.audit_log):
            if f is not None:
                f.close()
