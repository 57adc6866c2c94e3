"""The node agent at run time: state, policy, datapath, identity, tunnel and telemetry together."""
