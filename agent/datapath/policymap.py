"""Compiles Istio L4 policy into kernel policy entries with the reference evaluator.

The kernel picks the most specific entry (bpf/lib/policy.h). Here every input the kernel can see
is enumerated: each destination address, each source (identity id x CIDR class of the source
address), and each port class (every port the destination's policies name, plus one for all
others). The reference evaluator decides each combination, so the kernel verdict equals the
reference verdict by construction; entries are then compressed to a per-port majority with
exceptions.

Source CIDR classes: every IPv4 prefix a policy names gets an id; the longest matching named
prefix of an address decides exactly which named prefixes contain it, so one representative
address per class stands for the whole class.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from agent.abi import ID_PLAINTEXT
from agent.datapath.identities import ID_OTHER, IdentityTable
from agent.datapath.layouts import ANY, ANY_PORT, PolicyEntry, PolicyKey
from agent.datapath.verdicts import KernelVerdict, Reason
from agent.identity.spiffe import Identity
from agent.model.mesh import Workload
from agent.policy.connection import Connection
from agent.policy.evaluator import (
    Decision,
    PolicySet,
    PolicyVerdict,
    applicable,
    depends_on_source_ip,
    evaluate,
    referenced_cidrs,
    referenced_identities,
    referenced_ports,
)
from agent.policy.peerauth import MtlsMode

V4 = ipaddress.IPv4Network
WORLD = 0


Entries = dict[PolicyKey, PolicyEntry]


@dataclass
class CompiledPolicy:
    entries: Entries = field(default_factory=dict)
    cidrs: dict[V4, int] = field(default_factory=dict)
    policy_names: dict[int, str] = field(default_factory=dict)  # kernel policy id -> ns/name
    # Each destination workload's entries (by uid). An incremental compile hands on the very
    # dict of a destination whose inputs did not change, so `is` tells the datapath what to skip.
    groups: dict[str, Entries] = field(default_factory=dict)
    recompiled: list[str] = field(default_factory=list)  # uids evaluated by this compile


@dataclass(frozen=True)
class _Source:
    id: int
    identity: Identity | None
    cidr: int
    ip: ipaddress.IPv4Address


class PolicyCompiler:
    """Keeps CIDR and policy ids stable across compiles of one agent."""

    def __init__(self, identities: IdentityTable) -> None:
        self.identities = identities
        self._cidr_ids: dict[V4, int] = {}
        self._policy_ids: dict[str, int] = {}
        # An identity no policy can name on purpose: stands for every unknown peer (id OTHER).
        self._other = Identity("nodemesh.invalid", f"other-{secrets.token_hex(4)}", "other")
        # uid -> (everything its entries depend on, the entries): the incremental compile's memo
        self._memo: dict[str, tuple[tuple[object, ...], Entries]] = {}

    def compile(self, policies: PolicySet, workloads: Iterable[Workload], *,
                full: bool = False) -> CompiledPolicy:
        """Entries for every destination. Destinations whose inputs (the workload, its
        applicable policies, the PeerAuthentications that can resolve its mode, the identity
        table, the CIDR classes) are unchanged since the last compile are not evaluated again;
        `full` evaluates every one (the result is the same: tests/unit/datapath prove it)."""
        if full:
            self._memo.clear()
        workloads = list(workloads)
        dests = [w for w in workloads if w.in_mesh is not False and _v4(w.ips)]
        for w in dests:
            self.identities.allocate(w.identity)
        # A federated peer runs no workload the agent knows, so a principal from a foreign trust
        # domain that a policy names exactly gets its own id. Principals of the mesh's own
        # domains do not: every identity id widens what each destination is evaluated for
        # (10k named principals would recompile every destination on any principal change).
        local = {w.trust_domain for w in workloads}
        foreign = (i for i in referenced_identities(policies) if i.trust_domain not in local)
        for ident in sorted(foreign):  # filtered first: sorting 10k own-domain ones is slow
            self.identities.allocate(ident)
        named = {n for w in dests for n in referenced_cidrs(policies, w).source
                 if isinstance(n, V4)}
        prefixes = sorted(named, key=lambda n: (n.prefixlen, int(n.network_address)))
        out = CompiledPolicy()
        for net in prefixes:
            out.cidrs[net] = self._cidr_ids.setdefault(net, len(self._cidr_ids) + 1)
        classes = _class_representatives(out.cidrs)
        idents = tuple(self.identities.items())
        memo: dict[str, tuple[tuple[object, ...], Entries]] = {}
        for w in dests:
            key = self._inputs(policies, w, classes, idents)
            hit = self._memo.get(w.uid)
            if hit is not None and hit[0] == key:
                group = hit[1]
            else:
                group = {}
                if _policed(policies, w):
                    self._compile_workload(policies, w, classes, group)
                out.recompiled.append(w.uid)
            memo[w.uid] = (key, group)
            out.groups[w.uid] = group
            out.entries.update(group)
        self._memo = memo
        out.policy_names = {i: k for k, i in self._policy_ids.items()}
        return out

    @staticmethod
    def _inputs(policies: PolicySet, w: Workload, classes: dict[int, ipaddress.IPv4Address],
                idents: tuple[tuple[Identity, int], ...]) -> tuple[object, ...]:
        """Everything _compile_workload reads for w, compared by value."""
        ns = (w.namespace, policies.root_namespace)
        peer_auth = tuple(p for p in policies.mtls.policies if p.namespace in ns)
        # Every class counts even when w ignores source addresses: its exceptions name them all.
        return (w, policies.root_namespace, applicable(policies, w), peer_auth, idents,
                tuple(classes.items()))

    def _sources(self, classes: dict[int, ipaddress.IPv4Address],
                 by_ip: bool) -> list[_Source]:
        ids: list[tuple[int, Identity | None]] = [(ID_PLAINTEXT, None), (ID_OTHER, self._other)]
        ids += [(i, ident) for ident, i in self.identities.items()]
        cls = classes if by_ip else {WORLD: classes[WORLD]}
        return [_Source(i, ident, c, ip) for i, ident in ids for c, ip in cls.items()]

    def _compile_workload(self, policies: PolicySet, w: Workload,
                          classes: dict[int, ipaddress.IPv4Address], out: Entries) -> None:
        ports = sorted(referenced_ports(policies, w))
        other_port = next(p for p in range(1, 65536) if p not in ports)
        by_ip = depends_on_source_ip(policies, w)
        sources = self._sources(classes, by_ip)
        for dst in _v4(w.ips):
            for port, key_port in [*((p, p) for p in ports), (other_port, ANY_PORT)]:
                verdicts: dict[_Source, PolicyEntry] = {}
                for s in sources:
                    d = evaluate(policies, Connection(s.ip, s.identity, w, dst, port))
                    verdicts[s] = self._entry(d)
                majority = Counter(verdicts.values()).most_common(1)[0][0]
                out[PolicyKey(dst, ANY, ANY, key_port)] = majority
                for s, e in verdicts.items():
                    if e == majority:
                        continue
                    cidrs = [s.cidr] if by_ip else [WORLD, *classes.keys() - {WORLD}]
                    for c in cidrs:
                        out[PolicyKey(dst, s.id, c, key_port)] = e
        # Level 3 entries would be redundant: a source that differs on unnamed ports already
        # has its exception at ANY_PORT above, and named ports have their own level 1/2 entries.

    def _entry(self, d: Decision) -> PolicyEntry:
        pid = self._policy_ids.setdefault(d.policy, len(self._policy_ids) + 1) if d.policy else 0
        rule = d.rule if d.rule is not None and d.rule < 0xFFFF else 0
        if d.verdict is PolicyVerdict.ALLOW:
            return PolicyEntry(KernelVerdict.ALLOW, Reason.NONE, pid, rule)
        if d.policy_kind == "PeerAuthentication":
            reason = Reason.MTLS_REQUIRED
        elif d.policy is not None:
            reason = Reason.POLICY_DENY
        else:
            reason = Reason.POLICY_NOT_ALLOWED
        return PolicyEntry(KernelVerdict.DENY, reason, pid, rule)


def _v4(ips: Sequence[object]) -> list[ipaddress.IPv4Address]:
    return [ip for ip in ips if isinstance(ip, ipaddress.IPv4Address)]


def _policed(policies: PolicySet, w: Workload) -> bool:
    """Whether any enforced policy or STRICT mTLS can deny a connection to w."""
    if any(not p.dry_run for p in applicable(policies, w)):
        return True
    base, special = policies.mtls.strict_ports(w)
    return MtlsMode.STRICT in {base, *(policies.mtls.mtls_mode(w, p) for p in special)}


def _class_representatives(cidrs: dict[V4, int]) -> dict[int, ipaddress.IPv4Address]:
    """One address per CIDR class (WORLD included) whose longest named match is that class."""
    reps: dict[int, ipaddress.IPv4Address] = {}
    named = list(cidrs)
    for net, cid in [(V4("0.0.0.0/0"), WORLD), *cidrs.items()]:
        if cid == WORLD and net in cidrs:
            continue  # 0.0.0.0/0 is named: no address falls in WORLD
        remaining = [net]
        for sub in named:
            if sub == net or not sub.subnet_of(net):
                continue
            nxt: list[V4] = []
            for r in remaining:
                if r.subnet_of(sub):
                    continue
                nxt.extend(r.address_exclude(sub) if sub.subnet_of(r) else [r])
            remaining = nxt
        if remaining:
            reps[cid] = remaining[0].network_address
    reps.setdefault(WORLD, ipaddress.IPv4Address("0.0.0.0"))
    return reps
