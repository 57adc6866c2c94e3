"""Converters from Kubernetes API objects (JSON dicts, camelCase as the API server sends them)
to mesh state objects. Used by the Kubernetes source; no client or I/O here.

Kubernetes objects carry many fields the mesh does not use; these converters read what they need
and ignore the rest (unlike the file parsers, which reject unknown fields).
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from agent.model import fields as f
from agent.model.fields import IPAddress
from agent.model.mesh import (
    DATAPLANE_MODE_LABEL,
    Labels,
    Namespace,
    Service,
    ServicePort,
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
                    k8s_uid=f.string(meta, "uid", ("metadata",), default="", nonempty=False))


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
                   selector=Labels(selector) if selector else None)


def object_from_k8s(obj: object, *, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> MeshObject | None:
    """Convert any supported Kubernetes object by its `kind` (Pod, Namespace, Service,
    AuthorizationPolicy, PeerAuthentication, ConnectionRateLimit); None for a finished pod."""
    doc = f.mapping(obj, ())
    kind = doc.get("kind")
    if kind == "Pod":
        return workload_from_pod(doc, trust_domain=trust_domain)
    if kind == "Namespace":
        return namespace_from_k8s(doc)
    if kind == "Service":
        return service_from_k8s(doc)
    if kind == "AuthorizationPolicy":
        return parse_authorization_policy(doc)
    if kind == "PeerAuthentication":
        return parse_peer_authentication(doc)
    if kind == "ConnectionRateLimit":
        return parse_connection_rate_limit(doc)
    f.fail(("kind",), f"{kind!r}: want Pod, Namespace, Service, AuthorizationPolicy, "
           "PeerAuthentication or ConnectionRateLimit")
