"""The reference L4 policy evaluator: the semantics the kernel policy maps must reproduce.

Algorithm (reference/ztunnel.md section 5), for the policies that apply to the destination:
  1. dry-run policies are evaluated and reported, never enforced;
  2. PeerAuthentication STRICT on the destination port rejects a connection without a peer
     identity (istiod turns STRICT into exactly such a DENY policy for ztunnel);
  3. any enforced DENY that matches -> deny;
  4. no enforced ALLOW applies -> allow (default allow);
  5. any enforced ALLOW matches -> allow; otherwise deny.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

from agent.config import DEFAULT_ROOT_NAMESPACE
from agent.identity.spiffe import Identity
from agent.model.fields import IPNetwork
from agent.model.mesh import Workload
from agent.policy.authz import Action, AuthorizationPolicy, Match
from agent.policy.connection import Connection
from agent.policy.peerauth import MtlsMode, MtlsResolver, PeerAuthentication


@dataclass(frozen=True)
class PolicySet:
    authorization: tuple[AuthorizationPolicy, ...] = ()
    peer_authentication: tuple[PeerAuthentication, ...] = ()
    root_namespace: str = DEFAULT_ROOT_NAMESPACE

    @cached_property
    def mtls(self) -> MtlsResolver:
        return MtlsResolver(self.peer_authentication, self.root_namespace)


Policies = PolicySet | Iterable[AuthorizationPolicy]


def _as_set(policies: Policies) -> PolicySet:
    return policies if isinstance(policies, PolicySet) else PolicySet(tuple(policies))


class PolicyVerdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True)
class PolicyMatch:
    policy: str  # namespace/name
    action: Action
    rule: int


@dataclass(frozen=True)
class Decision:
    verdict: PolicyVerdict
    policy: str | None  # namespace/name of the deciding policy; None for a default verdict
    rule: int | None  # index in the deciding policy's spec.rules
    reason: str
    dry_run: tuple[PolicyMatch, ...] = ()  # dry-run policies that matched (logged only)
    # "AuthorizationPolicy", or "PeerAuthentication" when STRICT mTLS rejected plaintext.
    policy_kind: str | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict is PolicyVerdict.ALLOW


def applicable(policies: Policies, workload: Workload) -> tuple[AuthorizationPolicy, ...]:
    """Mesh-wide, namespace and selector policies for `workload`, dry-run ones included."""
    ps = _as_set(policies)
    found = (p for p in ps.authorization if p.applies_to(workload, ps.root_namespace))
    return tuple(sorted(found, key=lambda p: (p.namespace, p.name)))


def enforced(policies: Policies, workload: Workload) -> tuple[AuthorizationPolicy, ...]:
    return tuple(p for p in applicable(policies, workload) if not p.dry_run)


def evaluate(policies: Policies, conn: Connection) -> Decision:
    ps = _as_set(policies)
    pols = applicable(ps, conn.dst)
    dry = []
    for p in pols:
        if p.dry_run and (rule := p.matching_rule(conn)) is not None:
            dry.append(PolicyMatch(p.key, p.action, rule))
    dry_run = tuple(dry)

    mode, peer_auth = ps.mtls.resolve(conn.dst, conn.dst_port)
    if mode is MtlsMode.STRICT and conn.src_identity is None:
        key = peer_auth.key if peer_auth else None
        return Decision(PolicyVerdict.DENY, key, None,
                        f"plaintext rejected: PeerAuthentication {key} requires mTLS (STRICT) on "
                        f"port {conn.dst_port}", dry_run, "PeerAuthentication")

    live = [p for p in pols if not p.dry_run]
    for p in live:
        if p.action is Action.DENY and (rule := p.matching_rule(conn)) is not None:
            return Decision(PolicyVerdict.DENY, p.key, rule,
                            f"explicitly denied by {p.key} rule {rule}", dry_run,
                            "AuthorizationPolicy")
    allows = [p for p in live if p.action is Action.ALLOW]
    if not allows:
        return Decision(PolicyVerdict.ALLOW, None, None,
                        f"no ALLOW policy applies to {conn.dst.ref}: allowed by default", dry_run)
    for p in allows:
        if (rule := p.matching_rule(conn)) is not None:
            return Decision(PolicyVerdict.ALLOW, p.key, rule, f"allowed by {p.key} rule {rule}",
                            dry_run, "AuthorizationPolicy")
    names = ", ".join(p.key for p in allows)
    return Decision(PolicyVerdict.DENY, None, None,
                    f"ALLOW policies exist ({names}), but none allowed this connection", dry_run)


# Helpers for compiling the policies of one destination into kernel maps: they describe how the
# input space (source identity, source IP, destination IP, port) can be partitioned so that the
# verdict is constant within each part. Only enforced policies count; dry-run ones never change
# a verdict.


@dataclass(frozen=True)
class CidrRefs:
    source: frozenset[IPNetwork]
    destination: frozenset[IPNetwork]


def _live_matches(policies: Policies, workload: Workload) -> Iterator[Match]:
    """Every match of the rules enforced on `workload` that can match at all."""
    for p in enforced(policies, workload):
        for r in p.rules:
            if not r.never_matches:
                yield from r.all_matches()


def referenced_ports(policies: Policies, workload: Workload) -> frozenset[int]:
    """Ports named by the workload's policies (ports, notPorts, destination.port, portLevelMtls)."""
    ps = _as_set(policies)
    ports: set[int] = set()
    for m in _live_matches(ps, workload):
        ports.update(m.destination_ports, m.not_destination_ports)
    ports.update(ps.mtls.strict_ports(workload)[1])
    return frozenset(ports)


def referenced_identities(policies: Policies) -> frozenset[Identity]:
    """Identities that policies name exactly as principals (`td/ns/<ns>/sa/<sa>`): a peer from a
    federated trust domain runs no workload here, yet a policy can name it."""
    out: set[Identity] = set()
    for p in _as_set(policies).authorization:
        out |= p.named_identities
    return frozenset(out)


def referenced_cidrs(policies: Policies, workload: Workload) -> CidrRefs:
    src: set[IPNetwork] = set()
    dst: set[IPNetwork] = set()
    for m in _live_matches(policies, workload):
        src.update(m.source_ips, m.not_source_ips)
        dst.update(m.destination_ips, m.not_destination_ips)
    return CidrRefs(frozenset(src), frozenset(dst))


def depends_on_source_identity(policies: Policies, workload: Workload) -> bool:
    """Whether any verdict for `workload` can change with the peer identity (or its absence)."""
    ps = _as_set(policies)
    base, special = ps.mtls.strict_ports(workload)
    if MtlsMode.STRICT in {base, *(ps.mtls.mtls_mode(workload, port) for port in special)}:
        return True  # STRICT on some port rejects connections without identity
    return any(m.uses_identity for p in enforced(ps, workload) for r in p.rules
               if not r.never_matches for m in r.all_matches())


def depends_on_source_ip(policies: Policies, workload: Workload) -> bool:
    return any(m.uses_source_ip for p in enforced(policies, workload) for r in p.rules
               if not r.never_matches for m in r.all_matches())
