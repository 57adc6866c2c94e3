"""Compiles Services into the kernel's socket load balancer (bpf/lib/lb.h).

Each (IPv4 VIP, service port) gets the ready endpoints of the Service with their target port
resolved per endpoint (a named targetPort through the endpoint's named ports; an endpoint
without that name is not an endpoint of that port, as in Kubernetes). A Service with no ready
endpoint keeps its frontend with no backends, so connects to it are refused at once. Headless
Services (no VIP) need nothing: their clients connect to pod IPs. A Service with EndpointSlices
takes its endpoints from them (agent/state/services.py); one without a selector and without
slices (the file source has none) is left out, so its VIP passes through untouched.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from agent.datapath.layouts import Backend, Frontend
from agent.model.mesh import Service
from agent.state.services import endpoints
from agent.state.snapshot import MeshState

ServiceTable = dict[Frontend, tuple[Backend, ...]]


@dataclass
class CompiledServices:
    backends: ServiceTable = field(default_factory=dict)
    caps: dict[Frontend, int] = field(default_factory=dict)  # max_conns, where set
    owner: dict[Frontend, Service] = field(default_factory=dict)  # for metrics and outliers


def compile_service_set(state: MeshState) -> CompiledServices:
    out = CompiledServices()
    for svc in state.services:
        vips = [v for v in svc.vips if isinstance(v, ipaddress.IPv4Address)]
        if not vips or (svc.selector is None and not state.slices_of(svc)):
            continue
        for sp in svc.ports:
            if sp.protocol != "TCP":
                continue
            backends = tuple(Backend(e.ip, e.port) for e in endpoints(state, svc, sp))
            for vip in vips:
                fe = Frontend(vip, sp.port)
                out.backends[fe] = backends
                out.owner[fe] = svc
                if svc.max_connections:
                    out.caps[fe] = svc.max_connections
    return out


def compile_services(state: MeshState) -> ServiceTable:
    return compile_service_set(state).backends
