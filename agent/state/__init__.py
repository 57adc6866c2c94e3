"""Mesh state: compiled snapshots of workloads, services and policies, and the store that
publishes them. Sits above `agent.model` and `agent.policy`; nothing there imports it."""
