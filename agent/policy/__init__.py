"""L4 identity policy: Istio AuthorizationPolicy and PeerAuthentication, and the reference
evaluator (`agent.policy.evaluator`). Import the submodules directly (see `agent.state`)."""
