"""Kubernetes list/watch client parts: configuration, a sans-IO object cache and watch decoder,
backoff, metrics. `agent.sources.kubernetes` puts them together."""
