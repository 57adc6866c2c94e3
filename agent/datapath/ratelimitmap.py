"""Compiles ConnectionRateLimit objects into nm_rl_cfg_v1 entries (bpf/lib/ratelimit.h).

The kernel sees a destination address and a source identity id, so every limited destination
workload's IPv4 addresses are crossed with every source id the agent knows (the plaintext id and
each allocated identity) and `limit_for` decides each pair; a pair no limit names gets no entry
(unlimited). Limit ids are stable across compiles of one agent, like policy ids.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.abi import ID_PLAINTEXT
from agent.datapath.identities import IdentityTable
from agent.datapath.layouts import RateLimitEntry, RateLimitKey
from agent.identity.spiffe import Identity
from agent.model.mesh import Workload
from agent.policy.ratelimit import ConnectionRateLimit, limit_for


@dataclass
class CompiledLimits:
    entries: dict[RateLimitKey, RateLimitEntry] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # kernel limit id -> ns/name


class RateLimitCompiler:
    def __init__(self, identities: IdentityTable) -> None:
        self.identities = identities
        self._ids: dict[str, int] = {}

    def compile(self, limits: Iterable[ConnectionRateLimit],
                workloads: Iterable[Workload]) -> CompiledLimits:
        limits = list(limits)
        out = CompiledLimits()
        if not limits:
            return out
        sources: list[tuple[int, Identity | None]] = [(ID_PLAINTEXT, None)]
        sources += [(i, ident) for ident, i in self.identities.items()]
        for w in workloads:
            ips = [ip for ip in w.ips if isinstance(ip, ipaddress.IPv4Address)]
            selecting = [lim for lim in limits if lim.selects(w)]
            if w.in_mesh is False or not ips or not selecting:
                continue
            for src_id, ident in sources:
                applied = limit_for(selecting, ident, w)
                if applied is None:
                    continue
                rule = applied.rule
                lid = self._ids.setdefault(applied.limit.key, len(self._ids) + 1)
                entry = RateLimitEntry(rule.interval_ns, rule.burst if rule.interval_ns else 0,
                                       rule.max_connections or 0, lid)
                for ip in ips:
                    out.entries[RateLimitKey(ip, src_id)] = entry
        out.names = {i: k for k, i in self._ids.items()}
        return out
