"""Mesh objects as the agent sees them: workloads, namespaces, services. Immutable values."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity
from agent.model.fields import IPAddress

# The label Istio ambient uses to enroll a namespace or pod; "none" on a pod opts it out.
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"


class Labels(Mapping[str, str]):
    """An immutable, hashable string map (Kubernetes labels, selectors)."""

    __slots__ = ("__weakref__", "_items")  # weakref: pods with equal labels share one

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._items: dict[str, str] = dict(values or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"Labels({self._items!r})"

    def selected_by(self, selector: Mapping[str, str]) -> bool:
        """matchLabels semantics: every selector label present with the same value."""
        return all(self._items.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True)  # slots: an agent holds one per pod of the cluster
class Workload:
    name: str
    namespace: str
    service_account: str = "default"
    ips: tuple[IPAddress, ...] = ()
    node: str = ""
    labels: Labels = field(default_factory=Labels)
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    # True/False: explicitly in or out of the mesh; None: follow the namespace's label.
    in_mesh: bool | None = True
    uid: str = ""
    k8s_uid: str = ""  # the pod's metadata.uid: names its cgroup on the node; new on recreate
    # Whether Services send it new connections (a pod's Ready condition).
    ready: bool = True
    # Named container ports, (name, number): resolve a Service's named targetPort per endpoint.
    ports: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.uid:
            object.__setattr__(self, "uid", f"nodemesh//Workload/{self.namespace}/{self.name}")
        if not isinstance(self.labels, Labels):
            object.__setattr__(self, "labels", Labels(self.labels))
        object.__setattr__(self, "ips", tuple(self.ips))
        object.__setattr__(self, "ports", tuple(self.ports))

    def named_port(self, name: str) -> int | None:
        return next((number for n, number in self.ports if n == name), None)

    def resolve_target_port(self, target: int | str) -> int | None:
        """A Service targetPort on this endpoint: a number as is, a name through its ports."""
        return target if isinstance(target, int) else self.named_port(target)

    @property
    def identity(self) -> Identity:
        return Identity(self.trust_domain, self.namespace, self.service_account)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Labels = field(default_factory=Labels)

    def __post_init__(self) -> None:
        if not isinstance(self.labels, Labels):
            object.__setattr__(self, "labels", Labels(self.labels))

    @property
    def ambient(self) -> bool:
        return self.labels.get(DATAPLANE_MODE_LABEL) == "ambient"


@dataclass(frozen=True)
class ServicePort:
    port: int
    # A container port number, or the name of a container port (Kubernetes named targetPort).
    target_port: int | str
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    vips: tuple[IPAddress, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    # None: no selector, so no workloads are selected (endpoints managed elsewhere).
    selector: Labels | None = None
    # Concurrent connections allowed through each of its ports (enforced in the kernel at
    # selection); 0: no cap. File: spec.maxConnections; Kubernetes: the annotation
    # nodemesh.io/max-connections.
    max_connections: int = 0

    def __post_init__(self) -> None:
        if self.selector is not None and not isinstance(self.selector, Labels):
            object.__setattr__(self, "selector", Labels(self.selector))
        object.__setattr__(self, "vips", tuple(self.vips))
        object.__setattr__(self, "ports", tuple(self.ports))

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def target_port(self, service_port: int) -> int | str | None:
        for p in self.ports:
            if p.port == service_port:
                return p.target_port
        return None

    def selects(self, workload: Workload) -> bool:
        return (self.selector is not None and workload.namespace == self.namespace
                and workload.labels.selected_by(self.selector))


# A Service's per-port connection cap fits the kernel's u16 (struct lb4_service.max_conns).
MAX_CONNECTIONS = 0xFFFF
# The annotation that sets it on a Kubernetes Service.
MAX_CONNECTIONS_ANNOTATION = "nodemesh.io/max-connections"

# The label the EndpointSlice controller (and any other manager) puts on a Service's slices.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True)
class SlicePort:
    """One port of an EndpointSlice: `name` matches the Service port's name, `port` is the
    endpoints' (already resolved) target port."""

    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class SliceEndpoint:
    ips: tuple[IPAddress, ...]
    # discovery.k8s.io/v1 conditions; an unset `ready`/`serving` means true, as the API says.
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ips", tuple(self.ips))


@dataclass(frozen=True)
class EndpointSlice:
    """A Service's endpoints as Kubernetes publishes them: for a Service that has slices they
    are the endpoint truth (as for kube-proxy), selector or not."""

    name: str
    namespace: str
    service: str  # the kubernetes.io/service-name label
    address_type: str = "IPv4"
    ports: tuple[SlicePort, ...] = ()
    endpoints: tuple[SliceEndpoint, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ports", tuple(self.ports))
        object.__setattr__(self, "endpoints", tuple(self.endpoints))

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def port_for(self, service_port: ServicePort) -> int | None:
        """The target port of `service_port` on this slice's endpoints (matched by the Service
        port's name and protocol, as kube-proxy does), or None."""
        return next((p.port for p in self.ports
                     if p.name == service_port.name and p.protocol == service_port.protocol),
                    None)
