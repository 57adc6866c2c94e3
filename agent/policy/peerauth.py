"""Istio PeerAuthentication: whether a workload port accepts plaintext (PERMISSIVE) or not (STRICT).

Resolution follows Istio: a port-level mode of the workload's policy, else the workload-selector
policy, else the namespace policy, else the mesh policy (root namespace, no selector); UNSET
inherits from the next level and the default is PERMISSIVE. If several policies compete at one
level the oldest (creationTimestamp, then name) wins. In ambient mode STRICT rejects connections
without a peer identity; PERMISSIVE and DISABLE both accept plaintext.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.config import DEFAULT_ROOT_NAMESPACE
from agent.model import fields as f
from agent.model.fields import FieldPath
from agent.model.mesh import Labels, Workload
from agent.policy.authz import API_VERSIONS


class MtlsMode(enum.Enum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


@dataclass(frozen=True)
class PeerAuthentication:
    name: str
    namespace: str
    selector: Labels | None = None
    mode: MtlsMode = MtlsMode.UNSET
    port_modes: tuple[tuple[int, MtlsMode], ...] = ()
    created: str = ""  # creationTimestamp (RFC 3339 sorts as text); "" sorts first

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def port_mode(self, port: int) -> MtlsMode:
        return dict(self.port_modes).get(port, MtlsMode.UNSET)


def _mode(value: str, path: FieldPath) -> MtlsMode:
    try:
        return MtlsMode(value)
    except ValueError:
        f.fail(path, f"{value!r}: want one of {', '.join(m.value for m in MtlsMode)}")


def _mtls(obj: Mapping[str, object], key: str, path: FieldPath) -> MtlsMode:
    mp = (*path, key)
    mtls = f.optional_mapping(obj, key, path)
    f.check_keys(mtls, mp, ("mode",))
    return _mode(f.string(mtls, "mode", mp, default="UNSET"), (*mp, "mode"))


def parse_peer_authentication(obj: object, path: FieldPath = ()) -> PeerAuthentication:
    head = f.object_head(obj, path, "PeerAuthentication", API_VERSIONS)
    doc, name, namespace = head.doc, head.name, head.namespace
    sp = (*path, "spec")
    spec = f.optional_mapping(doc, "spec", path)
    f.check_keys(spec, sp, ("selector", "mtls", "portLevelMtls"))
    sel = f.optional_mapping(spec, "selector", sp)
    f.check_keys(sel, (*sp, "selector"), ("matchLabels",))
    labels = f.string_map(sel, "matchLabels", (*sp, "selector"))
    selector = Labels(labels) if labels else None
    mode = _mtls(spec, "mtls", sp)
    port_modes = []
    pp = (*sp, "portLevelMtls")
    ports = f.optional_mapping_any_keys(spec, "portLevelMtls", sp)
    if ports and selector is None:
        f.fail(pp, "portLevelMtls needs a workload selector (Istio rejects it otherwise)")
    for raw_port, value in ports.items():
        number = f.port(raw_port, (*pp, str(raw_port)))
        port_modes.append((number, _mtls({"m": value}, "m", (*pp, str(raw_port)))))
    return PeerAuthentication(name=name, namespace=namespace, selector=selector, mode=mode,
                              port_modes=tuple(sorted(port_modes, key=lambda pm: pm[0])),
                              created=head.created)


class MtlsResolver:
    """Answers `mtls_mode(workload, port)` for one set of PeerAuthentication policies."""

    def __init__(self, policies: Iterable[PeerAuthentication],
                 root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> None:
        self.policies = tuple(sorted(policies, key=lambda p: (p.created, p.namespace, p.name)))
        self.root_namespace = root_namespace

    def _first(self, namespace: str, workload: Workload | None) -> PeerAuthentication | None:
        for p in self.policies:
            if p.namespace != namespace:
                continue
            if workload is None and p.selector is None:
                return p
            if (workload is not None and p.selector is not None
                    and workload.labels.selected_by(p.selector)):
                return p
        return None

    def resolve(self, workload: Workload,
                port: int | None) -> tuple[MtlsMode, PeerAuthentication | None]:
        """The effective mode and the policy that set it (None when the default applies).

        `port` None asks for the mode of ports without a port-level setting.
        """
        own = self._first(workload.namespace, workload)
        if own is not None:
            if port is not None and own.port_mode(port) is not MtlsMode.UNSET:
                return own.port_mode(port), own
            if own.mode is not MtlsMode.UNSET:
                return own.mode, own
        for p in (self._first(workload.namespace, None), self._first(self.root_namespace, None)):
            if p is not None and p.mode is not MtlsMode.UNSET:
                return p.mode, p
        return MtlsMode.PERMISSIVE, None

    def mtls_mode(self, workload: Workload, port: int | None) -> MtlsMode:
        return self.resolve(workload, port)[0]

    def strict_ports(self, workload: Workload) -> tuple[MtlsMode, frozenset[int]]:
        """The workload's mode for unlisted ports, and the ports whose mode differs from it."""
        base = self.mtls_mode(workload, None)
        own = self._first(workload.namespace, workload)
        ports = {p for p, _ in own.port_modes} if own is not None else set()
        return base, frozenset(p for p in ports if self.mtls_mode(workload, p) is not base)
