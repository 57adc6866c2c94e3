"""A Service port's ready endpoints, each with its target port resolved (named or numeric).

Shared by the kernel load-balancer compiler (agent/datapath/servicemap.py) and
`nodemesh policy check`, so both resolve a Service the same way.

Where the endpoints come from: a Service that has EndpointSlices takes them from its slices and
only from them (kube-proxy's rule; this is what makes Services without a selector and endpoints
outside the mesh work). A Service without any slice (the file source, which has none) takes the
ready workloads its selector picks.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from agent.model.mesh import EndpointSlice, Service, ServicePort, Workload
from agent.state.snapshot import MeshState


@dataclass(frozen=True)
class ServiceEndpoint:
    workload: Workload | None  # None: an address that is no workload (outside the mesh)
    ip: ipaddress.IPv4Address
    port: int  # the resolved target port


def endpoints(state: MeshState, service: Service, port: ServicePort) -> list[ServiceEndpoint]:
    """The ready endpoints of one service port, ordered by address. A named targetPort is
    looked up in each endpoint's named ports; an endpoint without it is not an endpoint of this
    port (as in Kubernetes)."""
    slices = state.slices_of(service)
    if slices:
        return _from_slices(state, slices, port)
    out = []
    for w in state.service_endpoints(service):
        if not w.ready:
            continue
        target = w.resolve_target_port(port.target_port)
        ip = next((a for a in w.ips if isinstance(a, ipaddress.IPv4Address)), None)
        if target is not None and ip is not None:
            out.append(ServiceEndpoint(w, ip, target))
    return sorted(out, key=lambda e: (e.ip, e.port))


def _from_slices(state: MeshState, slices: tuple[EndpointSlice, ...],
                 port: ServicePort) -> list[ServiceEndpoint]:
    """kube-proxy's choice: the `ready` endpoints; if there is none, the ones that are
    `serving` and `terminating` (a rollout's last old pods still finish their work) rather than
    nothing. An address in two slices counts once."""
    ready: dict[tuple[ipaddress.IPv4Address, int], ServiceEndpoint] = {}
    fallback: dict[tuple[ipaddress.IPv4Address, int], ServiceEndpoint] = {}
    for s in slices:
        target = s.port_for(port)
        if target is None or s.address_type != "IPv4":
            continue
        for e in s.endpoints:
            for ip in e.ips:
                if not isinstance(ip, ipaddress.IPv4Address):
                    continue
                ep = ServiceEndpoint(state.workload_by_ip(ip), ip, target)
                if e.ready:
                    ready[(ip, target)] = ep
                elif e.serving and e.terminating:
                    fallback[(ip, target)] = ep
    chosen = ready or fallback
    return [chosen[k] for k in sorted(chosen)]


def unready(state: MeshState, service: Service) -> list[str]:
    """What is known but not selected because it is not ready (for `policy check` notes)."""
    slices = state.slices_of(service)
    if not slices:
        return [w.ref for w in state.service_endpoints(service) if not w.ready]
    out = []
    for s in slices:
        for e in s.endpoints:
            if not e.ready:
                w = next((state.workload_by_ip(ip) for ip in e.ips), None)
                out.append(w.ref if w is not None else ",".join(map(str, e.ips)))
    return out
