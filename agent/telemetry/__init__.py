"""Flow telemetry: the FlowRecord producers emit, and its sinks (Istio-compatible Prometheus
metrics, JSON flow and audit logs, the live flow stream). See docs/telemetry.md."""
