"""L4 identity policy: Istio AuthorizationPolicy and PeerAuthentication, and the reference
evaluator (`agent.policy.evaluator`). Built on `agent.model`; knows nothing of the state store."""
