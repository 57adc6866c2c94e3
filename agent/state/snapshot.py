"""MeshState: one immutable snapshot of everything the agent knows, with the lookups it needs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import TypeVar

from agent.config import DEFAULT_ROOT_NAMESPACE
from agent.identity.spiffe import Identity
from agent.model.fields import IPAddress
from agent.model.mesh import (
    DATAPLANE_MODE_LABEL,
    EndpointSlice,
    Namespace,
    Service,
    Workload,
)
from agent.policy.authz import AuthorizationPolicy
from agent.policy.evaluator import PolicySet
from agent.policy.peerauth import MtlsMode, PeerAuthentication
from agent.policy.ratelimit import ConnectionRateLimit

MeshObject = (Workload | Namespace | Service | AuthorizationPolicy | PeerAuthentication
              | EndpointSlice | ConnectionRateLimit)
KIND_OF: Mapping[type, str] = MappingProxyType({
    Workload: "Workload", Namespace: "Namespace", Service: "Service",
    AuthorizationPolicy: "AuthorizationPolicy", PeerAuthentication: "PeerAuthentication",
    EndpointSlice: "EndpointSlice", ConnectionRateLimit: "ConnectionRateLimit",
})
KINDS = tuple(KIND_OF.values())

_T = TypeVar("_T")


def key_of(obj: MeshObject) -> str:
    """The store key: uid for workloads, name for namespaces, namespace/name otherwise."""
    if isinstance(obj, Workload):
        return obj.uid
    if isinstance(obj, Namespace):
        return obj.name
    return f"{obj.namespace}/{obj.name}"


def _frozen(objs: Iterable[MeshObject]) -> Mapping[str, MeshObject]:
    return MappingProxyType({key_of(o): o for o in objs})


@dataclass(frozen=True, eq=False)
class MeshState:
    """Never mutated: changes build a new snapshot (`with_object`, `without`)."""

    objects: Mapping[str, Mapping[str, MeshObject]] = field(
        default_factory=lambda: MappingProxyType({k: MappingProxyType({}) for k in KINDS}))
    root_namespace: str = DEFAULT_ROOT_NAMESPACE

    @classmethod
    def build(cls, objects: Iterable[MeshObject] = (),
              root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> MeshState:
        by_kind: dict[str, list[MeshObject]] = {k: [] for k in KINDS}
        for obj in objects:
            by_kind[KIND_OF[type(obj)]].append(obj)
        return cls(MappingProxyType({k: _frozen(v) for k, v in by_kind.items()}), root_namespace)

    def with_object(self, obj: MeshObject) -> MeshState:
        kind = KIND_OF[type(obj)]
        changed = {**self.objects[kind], key_of(obj): obj}
        return MeshState(MappingProxyType({**self.objects, kind: MappingProxyType(changed)}),
                         self.root_namespace)

    def without(self, kind: str, key: str) -> MeshState:
        if key not in self.objects[kind]:
            return self
        changed = {k: v for k, v in self.objects[kind].items() if k != key}
        return MeshState(MappingProxyType({**self.objects, kind: MappingProxyType(changed)}),
                         self.root_namespace)

    def with_edits(self, edits: Mapping[str, Mapping[str, MeshObject | None]]) -> MeshState:
        """Many objects set (or removed, for None) by kind and key in one new snapshot: each
        kind's mapping is copied once, not once per object."""
        objects = dict(self.objects)
        for kind, changed in edits.items():
            merged = dict(self.objects[kind])
            for key, obj in changed.items():
                if obj is None:
                    merged.pop(key, None)
                else:
                    merged[key] = obj
            objects[kind] = MappingProxyType(merged)
        return MeshState(MappingProxyType(objects), self.root_namespace)

    def all_objects(self) -> list[MeshObject]:
        return [o for kind in KINDS for o in self.objects[kind].values()]

    # -- typed views ---------------------------------------------------------------------------

    def _of_kind(self, cls: type[_T]) -> list[_T]:
        return [o for o in self.objects[KIND_OF[cls]].values() if isinstance(o, cls)]

    @property
    def workloads(self) -> list[Workload]:
        return self._of_kind(Workload)

    @property
    def namespaces(self) -> list[Namespace]:
        return self._of_kind(Namespace)

    @property
    def services(self) -> list[Service]:
        return self._of_kind(Service)

    @property
    def endpoint_slices(self) -> list[EndpointSlice]:
        return self._of_kind(EndpointSlice)

    @property
    def authorization_policies(self) -> list[AuthorizationPolicy]:
        return self._of_kind(AuthorizationPolicy)

    @property
    def peer_authentications(self) -> list[PeerAuthentication]:
        return self._of_kind(PeerAuthentication)

    @property
    def rate_limits(self) -> list[ConnectionRateLimit]:
        return self._of_kind(ConnectionRateLimit)

    # -- lookups (indexes are built on first use, once per snapshot) ---------------------------

    @cached_property
    def _by_ip(self) -> Mapping[IPAddress, Workload]:
        # Sorted by uid so that an address claimed twice (a stale pod) resolves deterministically.
        return {ip: w for w in sorted(self.workloads, key=lambda w: w.uid, reverse=True)
                for ip in w.ips}

    @cached_property
    def _by_node(self) -> Mapping[str, tuple[Workload, ...]]:
        nodes: dict[str, list[Workload]] = {}
        for w in sorted(self.workloads, key=lambda w: (w.namespace, w.name)):
            nodes.setdefault(w.node, []).append(w)
        return {n: tuple(ws) for n, ws in nodes.items()}

    @cached_property
    def policy_set(self) -> PolicySet:
        return PolicySet(tuple(self.authorization_policies), tuple(self.peer_authentications),
                         self.root_namespace)

    def workload_by_ip(self, ip: IPAddress) -> Workload | None:
        return self._by_ip.get(ip)

    def workload_by_uid(self, uid: str) -> Workload | None:
        w = self.objects["Workload"].get(uid)
        return w if isinstance(w, Workload) else None

    def workload_named(self, namespace: str, name: str) -> Workload | None:
        for w in self.workloads:
            if w.namespace == namespace and w.name == name:
                return w
        return None

    def namespace(self, name: str) -> Namespace | None:
        ns = self.objects["Namespace"].get(name)
        return ns if isinstance(ns, Namespace) else None

    def in_mesh(self, workload: Workload) -> bool:
        """Explicit per-workload setting, else the namespace's istio.io/dataplane-mode label."""
        if workload.in_mesh is not None:
            return workload.in_mesh
        ns = self.namespace(workload.namespace)
        return ns is not None and ns.labels.get(DATAPLANE_MODE_LABEL) == "ambient"

    def workloads_on_node(self, node: str) -> tuple[Workload, ...]:
        return self._by_node.get(node, ())

    def identities_on_node(self, node: str) -> set[Identity]:
        """Identities of the in-mesh workloads on `node` (what a node may get certificates for)."""
        return {w.identity for w in self.workloads_on_node(node) if self.in_mesh(w)}

    @cached_property
    def _slices_by_service(self) -> Mapping[tuple[str, str], tuple[EndpointSlice, ...]]:
        out: dict[tuple[str, str], list[EndpointSlice]] = {}
        for s in sorted(self.endpoint_slices, key=lambda s: s.name):
            out.setdefault((s.namespace, s.service), []).append(s)
        return {k: tuple(v) for k, v in out.items()}

    def slices_of(self, service: Service) -> tuple[EndpointSlice, ...]:
        """The Service's EndpointSlices (by the kubernetes.io/service-name label), by name."""
        return self._slices_by_service.get((service.namespace, service.name), ())

    def service_endpoints(self, service: Service) -> tuple[Workload, ...]:
        return tuple(sorted((w for w in self.workloads if service.selects(w)),
                            key=lambda w: w.uid))

    def service_by_vip(self, ip: IPAddress) -> Service | None:
        for s in self.services:
            if ip in s.vips:
                return s
        return None

    def mtls_mode(self, workload: Workload, port: int) -> MtlsMode:
        return self.policy_set.mtls.mtls_mode(workload, port)
