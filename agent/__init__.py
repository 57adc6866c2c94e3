"""nodemesh agent: control side of the node (state, policy, identity, datapath, telemetry)."""

__version__ = "0.1.0"
