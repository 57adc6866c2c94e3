"""The posture report of a running agent (served as GET /posture on the admin endpoint)."""

from __future__ import annotations

from typing import Any

from agent.identity.manager import CertificateManager
from agent.posture.certs import from_manager
from agent.posture.checks import Inputs, build_report
from agent.state.snapshot import MeshState
from agent.telemetry.stream import FlowHub


def live_report(state: MeshState, certs: CertificateManager, hub: FlowHub,
                node: str) -> dict[str, Any]:
    flows = tuple(hub.recent())
    return build_report(Inputs(
        state, {"kind": "agent", "node": node}, tuple(from_manager(certs)), flows,
        f"the agent's most recent {len(flows)} flow records"))
