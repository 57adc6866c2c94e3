"""Converters from Kubernetes API objects (JSON dicts, camelCase as the API server sends them)
to mesh state objects. Used by the Kubernetes source; no client or I/O here.

Kubernetes objects carry many fields the mesh does not use; these converters read what they need
and ignore the rest (unlike the file parsers, which reject unknown fields).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from agent.model import fields as f
from agent.model.fields import IPAddress
from agent.model.mesh import (
    DATAPLANE_MODE_LABEL,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_ANNOTATION,
    SERVICE_NAME_LABEL,
    EndpointSlice,
    Labels,
    Namespace,
    Service,
    ServicePort,
    SliceEndpoint,
    SlicePort,
    Workload,
)
from agent.policy.authz import parse_authorization_policy
from agent.policy.peerauth import parse_peer_authentication
from agent.policy.ratelimit import parse_connection_rate_limit
from agent.state.snapshot import MeshObject

TERMINAL_PHASES = ("Succeeded", "Failed")


def _meta(obj: object) -> tuple[Mapping[str, object], Mapping[str, object]]:
    doc = f.mapping(obj, ())
    return doc, f.mapping(doc.get("metadata"), ("metadata",))


def pod_uid(namespace: str, name: str) -> str:
    """Workload uid for a pod; ztunnel's form, so a pod keeps its uid when recreated."""
    return f"Kubernetes//Pod/{namespace}/{name}"


def workload_from_pod(pod: object, *, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Workload | None:
    """The pod's workload; None for a pod that has finished (its IP may already be reused)."""
    doc, meta = _meta(pod)
    spec = f.optional_mapping(doc, "spec", ())
    status = f.optional_mapping(doc, "status", ())
    if status.get("phase") in TERMINAL_PHASES:
        return None
    name = f.name(meta, "name", ("metadata",), "subdomain")
    namespace = f.name(meta, "namespace", ("metadata",), "label", default="default")
    labels = f.string_map(meta, "labels", ("metadata",))
    ips: list[IPAddress] = []
    for i, entry in enumerate(f.items(status, "podIPs", ("status",))):
        ip = f.mapping(entry, ("status", "podIPs", i)).get("ip")
        ips.append(f.ip_address(ip, ("status", "podIPs", i, "ip")))
    if not ips and status.get("podIP"):
        ips.append(f.ip_address(status["podIP"], ("status", "podIP")))
    mode = labels.get(DATAPLANE_MODE_LABEL)
    in_mesh: bool | None = {"ambient": True, "none": False}.get(mode or "")
    if spec.get("hostNetwork") is True:
        in_mesh = False  # its IP is the node's; ambient never captures host-network pods
    account = f.string(spec, "serviceAccountName", ("spec",), default="") or "default"
    f.check_name(account, ("spec", "serviceAccountName"), "subdomain")
    return Workload(name=name, namespace=namespace, service_account=account, ips=tuple(ips),
                    node=f.string(spec, "nodeName", ("spec",), default="", nonempty=False),
                    labels=Labels(labels), trust_domain=trust_domain, in_mesh=in_mesh,
                    uid=pod_uid(namespace, name),
                    k8s_uid=f.string(meta, "uid", ("metadata",), default="", nonempty=False),
                    ready=_pod_ready(status), ports=_named_ports(spec))


def _pod_ready(status: Mapping[str, object]) -> bool:
    """The pod's Ready condition. A pod reporting none (the kubelet always reports one; a bare
    test object may not) is ready: readiness then comes from its EndpointSlices, if any."""
    for i, raw in enumerate(f.items(status, "conditions", ("status",))):
        cond = f.mapping(raw, ("status", "conditions", i))
        if cond.get("type") == "Ready":
            return f.string(cond, "status", ("status", "conditions", i)) == "True"
    return True


def _named_ports(spec: Mapping[str, object]) -> tuple[tuple[str, int], ...]:
    """Named container ports (TCP), for Services' named targetPorts; the first of a name wins,
    as the EndpointSlice controller's lookup does."""
    out: dict[str, int] = {}
    for i, raw in enumerate(f.items(spec, "containers", ("spec",))):
        cp = ("spec", "containers", i)
        for j, rp in enumerate(f.items(f.mapping(raw, cp), "ports", cp)):
            pp = (*cp, "ports", j)
            entry = f.mapping(rp, pp)
            name = f.string(entry, "name", pp, default="", nonempty=False)
            if name and f.string(entry, "protocol", pp, default="TCP") == "TCP":
                out.setdefault(name, f.port(entry.get("containerPort"), (*pp, "containerPort")))
    return tuple(sorted(out.items()))


def endpoint_slice_from_k8s(obj: object) -> EndpointSlice:
    """A discovery.k8s.io/v1 EndpointSlice. Its Service is the kubernetes.io/service-name label
    (required: a slice without it belongs to no Service)."""
    doc, meta = _meta(obj)
    labels = f.string_map(meta, "labels", ("metadata",))
    service = labels.get(SERVICE_NAME_LABEL)
    if not service:
        f.fail(("metadata", "labels", SERVICE_NAME_LABEL), "required label is missing: it "
               "names the slice's Service")
    f.check_name(service, ("metadata", "labels", SERVICE_NAME_LABEL), "dns1035")
    address_type = f.string(doc, "addressType", ())
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        f.fail(("addressType",), f"{address_type!r}: want IPv4, IPv6 or FQDN")
    ports = []
    for i, raw in enumerate(f.items(doc, "ports", ())):
        pp = ("ports", i)
        entry = f.mapping(raw, pp)
        if entry.get("port") is None:
            continue  # "all ports": no number a Service port could map to
        ports.append(SlicePort(f.string(entry, "name", pp, default="", nonempty=False),
                               f.port(entry.get("port"), (*pp, "port")),
                               f.string(entry, "protocol", pp, default="TCP")))
    eps = []
    for i, raw in enumerate(f.items(doc, "endpoints", ())):
        ep = ("endpoints", i)
        entry = f.mapping(raw, ep)
        cond = f.optional_mapping(entry, "conditions", ep)
        cp = (*ep, "conditions")
        addresses = f.strings(entry, "addresses", ep)
        if not addresses:
            f.fail((*ep, "addresses"), "must name at least one address")
        ips = (tuple(f.ip_address(a, (*ep, "addresses", j)) for j, a in enumerate(addresses))
               if address_type != "FQDN" else ())
        ready = f.boolean(cond, "ready", cp, True)
        eps.append(SliceEndpoint(
            ips=ips, ready=ready, serving=f.boolean(cond, "serving", cp, ready),
            terminating=f.boolean(cond, "terminating", cp, False),
            node=f.string(entry, "nodeName", ep, default="", nonempty=False)))
    return EndpointSlice(name=f.name(meta, "name", ("metadata",), "subdomain"),
                         namespace=f.name(meta, "namespace", ("metadata",), "label",
                                          default="default"),
                         service=service, address_type=address_type, ports=tuple(ports),
                         endpoints=tuple(eps))


def namespace_from_k8s(ns: object) -> Namespace:
    _doc, meta = _meta(ns)
    return Namespace(name=f.name(meta, "name", ("metadata",), "label"),
                     labels=Labels(f.string_map(meta, "labels", ("metadata",))))


def service_from_k8s(svc: object) -> Service:
    doc, meta = _meta(svc)
    spec = f.optional_mapping(doc, "spec", ())
    vips: list[IPAddress] = []
    cluster_ips = f.items(spec, "clusterIPs", ("spec",)) or (
        [spec["clusterIP"]] if spec.get("clusterIP") else [])
    for i, ip in enumerate(cluster_ips):
        if ip != "None":  # headless
            vips.append(f.ip_address(ip, ("spec", "clusterIPs", i)))
    ports = []
    for i, raw in enumerate(f.items(spec, "ports", ("spec",))):
        pp = ("spec", "ports", i)
        entry = f.mapping(raw, pp)
        number = f.port(entry.get("port"), (*pp, "port"))
        target = entry.get("targetPort", number)
        target_port: int | str = (target if isinstance(target, str) and not target.isdigit()
                                  else f.port(target, (*pp, "targetPort")))
        ports.append(ServicePort(number, target_port,
                                 f.string(entry, "name", pp, default="", nonempty=False),
                                 f.string(entry, "protocol", pp, default="TCP")))
    selector = f.string_map(spec, "selector", ("spec",))
    return Service(name=f.name(meta, "name", ("metadata",), "dns1035"),
                   namespace=f.name(meta, "namespace", ("metadata",), "label", default="default"),
                   vips=tuple(vips), ports=tuple(ports),
                   selector=Labels(selector) if selector else None,
                   max_connections=_max_connections(meta))


def _max_connections(meta: Mapping[str, object]) -> int:
    raw = f.string_map(meta, "annotations", ("metadata",)).get(MAX_CONNECTIONS_ANNOTATION)
    if raw is None:
        return 0
    if not (raw.isascii() and raw.isdigit()) or not 0 <= int(raw) <= MAX_CONNECTIONS:
        f.fail(("metadata", "annotations", MAX_CONNECTIONS_ANNOTATION),
               f"{raw!r}: want 0 (no cap) to {MAX_CONNECTIONS}")
    return int(raw)


def object_from_k8s(obj: object, *, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> MeshObject | None:
    """Convert any supported Kubernetes object by its `kind` (Pod, Namespace, Service,
    EndpointSlice, AuthorizationPolicy, PeerAuthentication, ConnectionRateLimit); None for a
    finished pod."""
    doc = f.mapping(obj, ())
    kind = doc.get("kind")
    if kind == "Pod":
        return workload_from_pod(doc, trust_domain=trust_domain)
    convert = _CONVERTERS.get(kind) if isinstance(kind, str) else None
    if convert is None:
        f.fail(("kind",), f"{kind!r}: want Pod, {', '.join(_CONVERTERS)}")
    return convert(doc)


_CONVERTERS: Mapping[str, Callable[[Mapping[str, object]], MeshObject]] = {
    "Namespace": namespace_from_k8s,
    "Service": service_from_k8s,
    "EndpointSlice": endpoint_slice_from_k8s,
    "AuthorizationPolicy": parse_authorization_policy,
    "PeerAuthentication": parse_peer_authentication,
    "ConnectionRateLimit": parse_connection_rate_limit,
}
