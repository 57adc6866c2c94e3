"""ConnectionRateLimit (nodemesh.io): new-connection rate and concurrency limits per source.

  apiVersion: nodemesh.io/v1alpha1
  kind: ConnectionRateLimit
  metadata: {name: db-limits, namespace: shop}
  spec:
    selector: {matchLabels: {app: db}}   # destination workloads of this namespace (absent: all)
    limits:
    - from: {principal: cluster.local/ns/tools/sa/debug}  # or {namespace: tools}, {plaintext: true}
      connectionsPerSecond: 5            # token bucket refill rate (> 0, may be fractional)
      burst: 5                           # bucket size (default: ceil(connectionsPerSecond))
      maxConnections: 20                 # concurrent connections (optional)

The kernel keeps one bucket per (destination address, source identity): a `namespace` source
gives each identity of that namespace its own bucket, never one shared by the namespace.
When several limits name one (destination, source), the most specific source wins (principal,
then namespace, then plaintext); among equals the oldest object (creationTimestamp, then
namespace/name) and its first matching entry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.identity.spiffe import Identity, IdentityError
from agent.model import fields as f
from agent.model.fields import FieldPath
from agent.model.mesh import Labels, Workload

API_VERSION = "nodemesh.io/v1alpha1"
KIND = "ConnectionRateLimit"
MAX_RATE = 1_000_000.0  # connections per second: above this the limit means nothing
MAX_BURST = 1_000_000
MAX_CONNECTIONS = 1_000_000


@dataclass(frozen=True)
class RateLimitSource:
    """Exactly one of principal, namespace, plaintext."""

    principal: str = ""  # trust-domain/ns/<ns>/sa/<sa>, as Istio's source.principals
    namespace: str = ""
    plaintext: bool = False

    def matches(self, identity: Identity | None) -> bool:
        """`identity` None: a plaintext source (no peer certificate)."""
        if self.plaintext:
            return identity is None
        if identity is None:
            return False
        if self.principal:
            return identity.principal == self.principal
        return identity.namespace == self.namespace

    @property
    def specificity(self) -> int:
        return 2 if self.principal else 1 if self.namespace else 0

    def describe(self) -> str:
        if self.principal:
            return f"principal {self.principal}"
        if self.namespace:
            return f"namespace {self.namespace}"
        return "plaintext sources"


@dataclass(frozen=True)
class RateLimitRule:
    source: RateLimitSource
    connections_per_second: float | None = None  # None: no rate limit, only the cap
    burst: int = 0
    max_connections: int | None = None

    @property
    def interval_ns(self) -> int:
        """Kernel time per token; 0 without a rate limit."""
        if self.connections_per_second is None:
            return 0
        return max(1, round(1e9 / self.connections_per_second))

    def describe(self) -> str:
        parts = []
        if self.connections_per_second is not None:
            parts.append(f"{self.connections_per_second:g} connections/s, burst {self.burst}")
        if self.max_connections is not None:
            parts.append(f"at most {self.max_connections} concurrent")
        return "; ".join(parts)


@dataclass(frozen=True)
class ConnectionRateLimit:
    name: str
    namespace: str
    selector: Labels | None = None
    rules: tuple[RateLimitRule, ...] = ()
    created: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, w: Workload) -> bool:
        return w.namespace == self.namespace and (
            self.selector is None or w.labels.selected_by(self.selector))


@dataclass(frozen=True)
class AppliedLimit:
    """The limit in force for one (source, destination workload)."""

    limit: ConnectionRateLimit
    rule: RateLimitRule
    index: int  # of the rule in spec.limits


def limit_for(limits: Iterable[ConnectionRateLimit], source: Identity | None,
              dst: Workload) -> AppliedLimit | None:
    best: tuple[tuple[int, str, str, int], AppliedLimit] | None = None
    for lim in limits:
        if not lim.selects(dst):
            continue
        for i, rule in enumerate(lim.rules):
            if not rule.source.matches(source):
                continue
            rank = (-rule.source.specificity, lim.created, lim.key, i)
            if best is None or rank < best[0]:
                best = (rank, AppliedLimit(lim, rule, i))
    return best[1] if best else None


def _source(obj: Mapping[str, object], path: FieldPath) -> RateLimitSource:
    f.check_keys(obj, path, ("principal", "namespace", "plaintext"))
    given = [k for k in ("principal", "namespace", "plaintext") if k in obj]
    if len(given) != 1:
        f.fail(path, "want exactly one of principal, namespace, plaintext")
    if "principal" in obj:
        principal = f.string(obj, "principal", path)
        try:
            Identity.parse("spiffe://" + principal)
        except IdentityError:
            f.fail((*path, "principal"), f"{principal!r}: want <trust-domain>/ns/<namespace>/sa/"
                   "<service-account>")
        return RateLimitSource(principal=principal)
    if "namespace" in obj:
        return RateLimitSource(namespace=f.name(obj, "namespace", path, "label"))
    if not f.boolean(obj, "plaintext", path, False):
        f.fail((*path, "plaintext"), "only `plaintext: true` selects anything")
    return RateLimitSource(plaintext=True)


def _number(obj: Mapping[str, object], key: str, path: FieldPath, upper: float,
            integer: bool) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not isinstance(value, int)):
        f.fail((*path, key), f"want {'an integer' if integer else 'a number'}, got {value!r}")
    if not (0 < value <= upper) or math.isnan(value):
        f.fail((*path, key), f"{value!r} is out of range (0, {upper:g}]")
    return float(value)


def _rule(raw: object, path: FieldPath) -> RateLimitRule:
    obj = f.mapping(raw, path)
    f.check_keys(obj, path, ("from", "connectionsPerSecond", "burst", "maxConnections"))
    source = _source(f.mapping(obj.get("from"), (*path, "from")), (*path, "from"))
    rate = _number(obj, "connectionsPerSecond", path, MAX_RATE, integer=False)
    burst = _number(obj, "burst", path, MAX_BURST, integer=True)
    cap = _number(obj, "maxConnections", path, MAX_CONNECTIONS, integer=True)
    if rate is None and cap is None:
        f.fail(path, "a limit needs connectionsPerSecond, maxConnections or both")
    if rate is None and burst is not None:
        f.fail((*path, "burst"), "burst sizes the token bucket: it needs connectionsPerSecond")
    return RateLimitRule(
        source, rate,
        int(burst) if burst is not None else (math.ceil(rate) if rate is not None else 0),
        int(cap) if cap is not None else None)


def parse_connection_rate_limit(obj: object, path: FieldPath = ()) -> ConnectionRateLimit:
    head = f.object_head(obj, path, KIND, (API_VERSION,))
    sp = (*path, "spec")
    spec = f.mapping(head.doc.get("spec"), sp)
    f.check_keys(spec, sp, ("selector", "limits"))
    sel = f.optional_mapping(spec, "selector", sp)
    f.check_keys(sel, (*sp, "selector"), ("matchLabels",))
    labels = f.string_map(sel, "matchLabels", (*sp, "selector"))
    rules = tuple(_rule(r, (*sp, "limits", i)) for i, r in enumerate(f.items(spec, "limits", sp)))
    if not rules:
        f.fail((*sp, "limits"), "a ConnectionRateLimit needs at least one limit")
    return ConnectionRateLimit(head.name, head.namespace, Labels(labels) if labels else None,
                               rules, head.created)
