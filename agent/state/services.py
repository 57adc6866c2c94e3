"""A Service port's ready endpoints, each with its target port resolved (named or numeric).

Shared by the kernel load-balancer compiler (agent/datapath/servicemap.py) and
`nodemesh policy check`, so both resolve a Service the same way.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from agent.model.mesh import Service, ServicePort, Workload
from agent.state.snapshot import MeshState


@dataclass(frozen=True)
class Endpoint:
    workload: Workload
    ip: ipaddress.IPv4Address
    port: int  # the resolved target port


def endpoints(state: MeshState, service: Service, port: ServicePort) -> list[Endpoint]:
    """The ready endpoints of one service port, ordered by address. A named targetPort is
    looked up in each endpoint's named ports; an endpoint without it is not an endpoint of this
    port (as in Kubernetes)."""
    out = []
    for w in state.service_endpoints(service):
        if not w.ready:
            continue
        target = w.resolve_target_port(port.target_port)
        ip = next((a for a in w.ips if isinstance(a, ipaddress.IPv4Address)), None)
        if target is not None and ip is not None:
            out.append(Endpoint(w, ip, target))
    return sorted(out, key=lambda e: (e.ip, e.port))
