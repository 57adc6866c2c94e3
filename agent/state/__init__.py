"""Mesh state: workloads, namespaces, services and policies, as immutable snapshots in a store.

Import the submodules directly (`agent.state.store`, `agent.state.model`, ...): this package and
`agent.policy` refer to each other's submodules, so neither re-exports here.
"""
