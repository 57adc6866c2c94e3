"""nodemesh's own configuration documents (Workload, Namespace, Service) and the dispatch of
any supported document, Istio kinds included, to its parser.

Shapes (see docs/policy.md):

  kind: Workload                       kind: Service
  metadata: {name, namespace, labels}  metadata: {name, namespace}
  spec:                                spec:
    serviceAccount: default              vips: [10.96.0.10]
    ips: [10.251.0.10]                   ports: [{port: 80, targetPort: 8080, name: http}]
    node: node0                          selector: {app: backend}
    trustDomain: cluster.local
    inMesh: true                       kind: Namespace
    uid: <optional>                    metadata: {name, labels}
    ready: true
    ports: {http: 8080}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity, IdentityError
from agent.model import fields as f
from agent.model.fields import FieldPath
from agent.model.mesh import (
    MAX_CONNECTIONS,
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

API_VERSION = "nodemesh.io/v1alpha1"
_META_KEYS = ("name", "namespace", "labels", "annotations")


def _header(doc: Mapping[str, object], path: FieldPath, kind: str,
            api_versions: tuple[str, ...], spec_keys: tuple[str, ...] = ("spec",)
            ) -> tuple[Mapping[str, object], FieldPath]:
    f.check_keys(doc, path, ("apiVersion", "kind", "metadata", *spec_keys))
    if "apiVersion" in doc:
        api = f.string(doc, "apiVersion", path)
        if api not in api_versions:
            f.fail((*path, "apiVersion"), f"{api!r}: {kind} wants {' or '.join(api_versions)} "
                   "(or no apiVersion)")
    mp = (*path, "metadata")
    meta = f.mapping(doc.get("metadata"), mp)
    f.check_keys(meta, mp, _META_KEYS)
    return meta, mp


def parse_workload(doc_obj: object, path: FieldPath = ()) -> Workload:
    doc = f.mapping(doc_obj, path)
    meta, mp = _header(doc, path, "Workload", (API_VERSION,))
    # A workload stands for a pod: its name is a DNS-1123 subdomain, as are service accounts.
    name = f.name(meta, "name", mp, "subdomain")
    namespace = f.name(meta, "namespace", mp, "label", default="default")
    sp = (*path, "spec")
    spec = f.mapping(doc.get("spec"), sp)
    f.check_keys(spec, sp, ("serviceAccount", "ips", "node", "trustDomain", "inMesh", "uid",
                            "ready", "ports"))
    account = f.name(spec, "serviceAccount", sp, "subdomain", default="default")
    trust_domain = f.string(spec, "trustDomain", sp, default=DEFAULT_TRUST_DOMAIN)
    try:
        Identity(trust_domain, namespace, account)
    except IdentityError as e:
        f.fail((*sp, "trustDomain"), str(e))
    ips = tuple(f.ip_address(v, (*sp, "ips", i)) for i, v in enumerate(f.items(spec, "ips", sp)))
    if not ips:
        f.fail((*sp, "ips"), "a workload needs at least one IP address")
    return Workload(name=name, namespace=namespace, service_account=account, ips=ips,
                    node=f.string(spec, "node", sp, default=""),
                    labels=Labels(f.string_map(meta, "labels", mp)), trust_domain=trust_domain,
                    in_mesh=f.boolean(spec, "inMesh", sp, True),
                    uid=f.string(spec, "uid", sp, default=""),
                    ready=f.boolean(spec, "ready", sp, True),
                    ports=_named_ports(spec, sp))


def _named_ports(spec: Mapping[str, object], sp: FieldPath) -> tuple[tuple[str, int], ...]:
    """A workload's named container ports, {name: number}, for Services' named targetPorts."""
    pp = (*sp, "ports")
    return tuple(sorted((name, f.port(number, (*pp, name)))
                        for name, number in f.optional_mapping(spec, "ports", sp).items()))


def _target_port(entry: Mapping[str, object], number: int, pp: FieldPath) -> int | str:
    """A Service targetPort: a number, or a container port name resolved per endpoint."""
    raw = entry.get("targetPort", number)
    if isinstance(raw, str) and not raw.isdigit():
        if (not raw or len(raw) > 15 or not raw.isascii() or not raw.replace("-", "").isalnum()
                or not raw.islower()):
            f.fail((*pp, "targetPort"), f"{raw!r}: want a port number or a port name "
                   "(lowercase letters, digits and '-', at most 15)")
        return raw
    return f.port(raw, (*pp, "targetPort"))


def parse_namespace(doc_obj: object, path: FieldPath = ()) -> Namespace:
    doc = f.mapping(doc_obj, path)
    # A Kubernetes Namespace manifest (apiVersion v1) loads as is; its spec/status are ignored.
    meta, mp = _header(doc, path, "Namespace", ("v1", API_VERSION), ("spec", "status"))
    return Namespace(name=f.name(meta, "name", mp, "label"),
                     labels=Labels(f.string_map(meta, "labels", mp)))


def parse_service(doc_obj: object, path: FieldPath = ()) -> Service:
    doc = f.mapping(doc_obj, path)
    meta, mp = _header(doc, path, "Service", (API_VERSION,))
    sp = (*path, "spec")
    spec = f.mapping(doc.get("spec"), sp)
    f.check_keys(spec, sp, ("vips", "ports", "selector", "maxConnections"))
    vips = tuple(f.ip_address(v, (*sp, "vips", i))
                 for i, v in enumerate(f.items(spec, "vips", sp)))
    ports = []
    seen: set[int] = set()
    for i, raw in enumerate(f.items(spec, "ports", sp)):
        pp = (*sp, "ports", i)
        entry = f.mapping(raw, pp)
        f.check_keys(entry, pp, ("port", "targetPort", "name", "protocol"))
        number = f.port(entry.get("port"), (*pp, "port"))
        if number in seen:
            f.fail((*pp, "port"), f"port {number} is listed twice")
        seen.add(number)
        target = _target_port(entry, number, pp)
        protocol = f.string(entry, "protocol", pp, default="TCP")
        if protocol != "TCP":
            f.fail((*pp, "protocol"), f"{protocol!r}: the mesh carries TCP only")
        ports.append(ServicePort(number, target, f.string(entry, "name", pp, default="",
                                                          nonempty=False), protocol))
    selector = f.string_map(spec, "selector", sp) if "selector" in spec else None
    cap = spec.get("maxConnections", 0)
    if isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap <= MAX_CONNECTIONS:
        f.fail((*sp, "maxConnections"), f"{cap!r}: want 0 (no cap) to {MAX_CONNECTIONS}")
    # Service names are DNS-1035 labels (they become DNS names: no leading digit).
    return Service(name=f.name(meta, "name", mp, "dns1035"),
                   namespace=f.name(meta, "namespace", mp, "label", default="default"), vips=vips,
                   ports=tuple(ports), selector=Labels(selector) if selector else None,
                   max_connections=cap)


_PARSERS: dict[str, Callable[[object, FieldPath], MeshObject]] = {
    "Workload": parse_workload,
    "Namespace": parse_namespace,
    "Service": parse_service,
    "AuthorizationPolicy": parse_authorization_policy,
    "PeerAuthentication": parse_peer_authentication,
    "ConnectionRateLimit": parse_connection_rate_limit,
}


def parse_document(doc_obj: object, path: FieldPath = ()) -> MeshObject:
    doc = f.mapping(doc_obj, path)
    kind = f.string(doc, "kind", path)
    parser = _PARSERS.get(kind)
    if parser is None:
        f.fail((*path, "kind"), f"{kind!r}: want one of {', '.join(_PARSERS)}")
    return parser(doc, path)
