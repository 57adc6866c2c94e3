"""Istio AuthorizationPolicy, the L4 subset a ztunnel-style node proxy can enforce.

The parsed form follows ztunnel's `Authorization` (reference/ztunnel.md 4.3, 5): a policy is a
list of rules (OR); a rule is a list of clauses (AND): one for `from`, one for `to`, one per
`when` condition; a clause is a list of matches (OR); inside a match every field that is set must
match (AND), any value of a field may (OR), and a `not*` field matches only if none of its values
does.

L7 (HTTP) attributes cannot be seen at L4. As istiod does for ztunnel, an ALLOW rule that uses
one never matches; a DENY rule is enforced without its L7 parts, so it denies more than written
(fail closed). An entry emptied by dropping its L7 fields matches any connection, which is the
restrictive reading for DENY. Both cases produce a warning naming the policy and the field.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

from agent.config import DEFAULT_ROOT_NAMESPACE
from agent.identity.spiffe import SCHEME, Identity, IdentityError
from agent.model import fields as f
from agent.model.fields import FieldPath, IPNetwork, format_path
from agent.model.mesh import Labels, Workload
from agent.policy.connection import Connection
from agent.policy.strmatch import MatchKind, StringMatch

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
DRY_RUN_ANNOTATION = "istio.io/dry-run"

_SOURCE_L4 = ("principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks",
              "notIpBlocks", "serviceAccounts", "notServiceAccounts")
# remoteIpBlocks come from X-Forwarded-For or the PROXY protocol: HTTP-level, like Istio treats
# them for ztunnel.
_SOURCE_L7 = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks")
_OPERATION_L4 = ("ports", "notPorts")
_OPERATION_L7 = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_WHEN_L4 = ("source.ip", "source.namespace", "source.principal", "destination.ip",
            "destination.port")
_WHEN_L7_PREFIXES = ("request.", "remote.ip", "connection.sni", "experimental.envoy.filters.")
# strconv.ParseBool spellings, which Istio uses for the dry-run annotation.
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")

T = TypeVar("T")


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class Scope(enum.Enum):
    GLOBAL = "mesh-wide"  # root namespace, no selector
    NAMESPACE = "namespace"
    WORKLOAD_SELECTOR = "selector"


def _any_or_unset(values: Sequence[T], pred: Callable[[T], bool]) -> bool:
    return not values or any(pred(v) for v in values)


def _none(values: Sequence[T], pred: Callable[[T], bool]) -> bool:
    return not any(pred(v) for v in values)


@dataclass(frozen=True)
class Match:
    """One `from` source, `to` operation or `when` condition. Unset fields match anything."""

    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[tuple[str, str], ...] = ()  # (namespace, service account)
    not_service_accounts: tuple[tuple[str, str], ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def matches(self, conn: Connection) -> bool:
        ident = conn.src_identity
        principal = ident.principal if ident else None
        namespace = ident.namespace if ident else None
        account = (ident.namespace, ident.service_account) if ident else None

        def principal_is(m: StringMatch) -> bool:
            return m.matches(principal)

        def namespace_is(m: StringMatch) -> bool:
            return m.matches(namespace)

        def account_is(a: tuple[str, str]) -> bool:
            return a == account

        def src_in(n: IPNetwork) -> bool:
            return conn.src_ip in n

        def dst_in(n: IPNetwork) -> bool:
            return conn.dst_ip in n

        def port_is(p: int) -> bool:
            return p == conn.dst_port

        return (_any_or_unset(self.principals, principal_is)
                and _none(self.not_principals, principal_is)
                and _any_or_unset(self.namespaces, namespace_is)
                and _none(self.not_namespaces, namespace_is)
                and _any_or_unset(self.service_accounts, account_is)
                and _none(self.not_service_accounts, account_is)
                and _any_or_unset(self.source_ips, src_in)
                and _none(self.not_source_ips, src_in)
                and _any_or_unset(self.destination_ips, dst_in)
                and _none(self.not_destination_ips, dst_in)
                and _any_or_unset(self.destination_ports, port_is)
                and _none(self.not_destination_ports, port_is))

    @property
    def uses_identity(self) -> bool:
        return bool(self.principals or self.not_principals or self.namespaces
                    or self.not_namespaces or self.service_accounts or self.not_service_accounts)

    @property
    def uses_source_ip(self) -> bool:
        return bool(self.source_ips or self.not_source_ips)


@dataclass(frozen=True)
class Rule:
    index: int  # position in spec.rules, for reporting
    clauses: tuple[tuple[Match, ...], ...] = ()  # AND of clauses; each an OR of matches
    never_matches: bool = False  # an ALLOW rule that needs L7 attributes
    l7_fields: tuple[str, ...] = ()

    def matches(self, conn: Connection) -> bool:
        if self.never_matches:
            return False
        return all(not clause or any(m.matches(conn) for m in clause) for clause in self.clauses)

    def all_matches(self) -> tuple[Match, ...]:
        return tuple(m for clause in self.clauses for m in clause)

    def exact_principals_only(self) -> frozenset[str] | None:
        """If the rule matches exactly the peers whose principal is one of a set (a `from` of
        exact principals and nothing else), that set; else None."""
        if self.never_matches:
            return None
        constrained = [clause for clause in self.clauses if clause]
        if len(constrained) != 1:
            return None
        names: set[str] = set()
        for m in constrained[0]:
            if not m.principals or m != Match(principals=m.principals):
                return None
            if any(sm.kind is not MatchKind.EXACT for sm in m.principals):
                return None
            names.update(sm.value for sm in m.principals)
        return frozenset(names)


@dataclass(frozen=True)
class AuthorizationPolicy:
    name: str
    namespace: str
    action: Action = Action.ALLOW
    selector: Labels | None = None  # None: the whole namespace (or mesh, in the root namespace)
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    # targetRef(s) bind a policy to a waypoint or gateway; the node proxy never enforces those.
    targets_waypoint: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def scope(self, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> Scope:
        if self.selector is not None:
            return Scope.WORKLOAD_SELECTOR
        return Scope.GLOBAL if self.namespace == root_namespace else Scope.NAMESPACE

    def applies_to(self, workload: Workload, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> bool:
        if self.targets_waypoint:
            return False
        in_scope = self.namespace in (workload.namespace, root_namespace)
        if self.selector is None:
            return in_scope
        return in_scope and workload.labels.selected_by(self.selector)

    @cached_property
    def _rule_index(self) -> tuple[Mapping[str, int], tuple[Rule, ...]]:
        """The rules that only name exact principals, as principal -> first such rule, and the
        others in order: a 10k-rule policy matches with one lookup and a short scan (computed
        once per policy object; a reload keeps the objects of unchanged documents)."""
        exact: dict[str, int] = {}
        others = []
        for rule in self.rules:
            names = rule.exact_principals_only()
            if names is None:
                others.append(rule)
                continue
            for name in names:
                exact.setdefault(name, rule.index)
        return exact, tuple(others)

    def matching_rule(self, conn: Connection) -> int | None:
        """The spec.rules index of the first rule that matches; None if none does."""
        exact, others = self._rule_index
        ident = conn.src_identity
        first = exact.get(ident.principal) if ident else None
        for rule in others:
            if first is not None and rule.index > first:
                break
            if rule.matches(conn):
                return rule.index
        return first

    @cached_property
    def named_identities(self) -> frozenset[Identity]:
        """Identities the rules name exactly as principals (`td/ns/<ns>/sa/<sa>`), parsed once
        per policy object."""
        out: set[Identity] = set()
        for r in self.rules:
            for m in r.all_matches():
                for sm in (*m.principals, *m.not_principals):
                    if sm.kind is MatchKind.EXACT:
                        with contextlib.suppress(IdentityError):
                            out.add(Identity.parse(SCHEME + sm.value))
        return frozenset(out)


def parse_dry_run(value: str, path: FieldPath) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    f.fail(path, f"{value!r}: want \"true\" or \"false\"")


def parse_authorization_policy(obj: object, path: FieldPath = ()) -> AuthorizationPolicy:
    """Parse an AuthorizationPolicy as applied to Kubernetes (apiVersion, kind, metadata, spec).

    Raises FieldError for anything Istio would reject or nodemesh cannot enforce (AUDIT/CUSTOM).
    """
    head = f.object_head(obj, path, "AuthorizationPolicy", API_VERSIONS)
    doc, name, namespace, annotations = head.doc, head.name, head.namespace, head.annotations
    mp = (*path, "metadata")
    dry_run = False
    if DRY_RUN_ANNOTATION in annotations:
        dry_run = parse_dry_run(annotations[DRY_RUN_ANNOTATION],
                                (*mp, "annotations", DRY_RUN_ANNOTATION))

    sp = (*path, "spec")
    spec = f.optional_mapping(doc, "spec", path)
    f.check_keys(spec, sp, ("selector", "targetRef", "targetRefs", "action", "provider", "rules"))
    action_text = f.string(spec, "action", sp, default="ALLOW")
    if action_text in ("AUDIT", "CUSTOM"):
        f.fail((*sp, "action"), f"{action_text} is not supported by ztunnel-style L4 enforcement "
               "(only ALLOW and DENY are); CUSTOM and AUDIT policies need a waypoint proxy")
    if action_text not in ("ALLOW", "DENY"):
        f.fail((*sp, "action"), f"{action_text!r}: want ALLOW or DENY")
    action = Action(action_text)
    if "provider" in spec:
        f.fail((*sp, "provider"), "provider is only valid with action CUSTOM")

    warnings: list[str] = []

    def warn(at: FieldPath, message: str) -> None:
        warnings.append(f"AuthorizationPolicy {namespace}/{name}: {format_path(at)}: {message}")

    selector = _selector(spec, sp)
    targets_waypoint = bool(spec.get("targetRef") or spec.get("targetRefs"))
    if targets_waypoint:
        which = "targetRef" if spec.get("targetRef") else "targetRefs"
        warn((*sp, which), "binds the policy to a waypoint or gateway; the node agent does not "
             "enforce it")
    rules = tuple(_rule(action, raw, i, (*sp, "rules", i), warn)
                  for i, raw in enumerate(f.items(spec, "rules", sp)))
    return AuthorizationPolicy(name=name, namespace=namespace, action=action, selector=selector,
                               rules=rules, dry_run=dry_run, targets_waypoint=targets_waypoint,
                               warnings=tuple(warnings))


def _selector(spec: Mapping[str, object], sp: FieldPath) -> Labels | None:
    sel = f.optional_mapping(spec, "selector", sp)
    f.check_keys(sel, (*sp, "selector"), ("matchLabels",))
    labels = f.string_map(sel, "matchLabels", (*sp, "selector"))
    return Labels(labels) if labels else None  # an empty selector selects the whole namespace


Warn = Callable[[FieldPath, str], None]


def _string_matches(obj: Mapping[str, object], key: str, path: FieldPath, warn: Warn,
                    principal: bool = False) -> tuple[StringMatch, ...]:
    out = []
    for i, text in enumerate(f.strings(obj, key, path)):
        if principal and text.startswith("spiffe://"):
            warn((*path, key, i), f"{text!r}: principals are written without 'spiffe://' "
                 "(e.g. cluster.local/ns/default/sa/app); this value never matches")
        out.append(StringMatch.parse(text, (*path, key, i)))
    return tuple(out)


def _networks(obj: Mapping[str, object], key: str, path: FieldPath) -> tuple[IPNetwork, ...]:
    return tuple(f.ip_network(v, (*path, key, i)) for i, v in enumerate(f.items(obj, key, path)))


def _ports(obj: Mapping[str, object], key: str, path: FieldPath) -> tuple[int, ...]:
    return tuple(f.port(v, (*path, key, i))
                 for i, v in enumerate(f.items(obj, key, path)))


def _accounts(obj: Mapping[str, object], key: str, path: FieldPath) -> tuple[tuple[str, str], ...]:
    out = []
    for i, text in enumerate(f.strings(obj, key, path)):
        ns, _, sa = text.partition("/")
        if not ns or not sa or "/" in sa:
            f.fail((*path, key, i), f"{text!r}: want <namespace>/<service account>")
        out.append((ns, sa))
    return tuple(out)


def _l7_present(obj: Mapping[str, object], keys: Sequence[str], path: FieldPath) -> list[str]:
    present = []
    for key in keys:
        if f.strings(obj, key, path):  # validates the shape even though it is not enforced
            present.append(format_path((*path, key)))
    return present


def _rule(action: Action, raw: object, index: int, path: FieldPath, warn: Warn) -> Rule:
    rule = f.mapping(raw, path)
    f.check_keys(rule, path, ("from", "to", "when"))
    l7: list[str] = []
    clauses: list[tuple[Match, ...]] = []
    sources = _sources(rule, path, warn, l7)
    if sources:
        clauses.append(sources)
    operations = _operations(rule, path, l7)
    if operations:
        clauses.append(operations)
    # Istio ANDs `when` conditions, so each L4 condition is a clause of its own.
    clauses += [(m,) for m in _conditions(rule, path, warn, l7)]
    if l7:
        what = ", ".join(l7)
        if action is Action.ALLOW:
            warn(path, f"uses L7 (HTTP) attributes that L4 enforcement cannot see ({what}); this "
                 "ALLOW rule never matches (attach the policy to a waypoint for L7 rules)")
            return Rule(index, tuple(clauses), never_matches=True, l7_fields=tuple(l7))
        warn(path, f"uses L7 (HTTP) attributes that L4 enforcement cannot see ({what}); this "
             "DENY rule is enforced without them, so it denies more than written (fail closed)")
    return Rule(index, tuple(clauses), l7_fields=tuple(l7))


def _entry(item: object, ip: FieldPath, inner: str,
           known: tuple[str, ...]) -> tuple[Mapping[str, object], FieldPath]:
    """`from[i].source` or `to[i].operation`: present, a non-empty mapping of known fields."""
    entry = f.mapping(item, ip)
    f.check_keys(entry, ip, (inner,))
    inner_path = (*ip, inner)
    if entry.get(inner) is None:
        f.fail(inner_path, "required field is missing")
    value = f.mapping(entry[inner], inner_path)
    f.check_keys(value, inner_path, known)
    if not value:
        f.fail(inner_path, "must set at least one field")
    return value, inner_path


def _sources(rule: Mapping[str, object], path: FieldPath, warn: Warn,
             l7: list[str]) -> tuple[Match, ...]:
    out = []
    for i, item in enumerate(f.items(rule, "from", path)):
        src, sp = _entry(item, (*path, "from", i), "source", _SOURCE_L4 + _SOURCE_L7)
        l7 += _l7_present(src, _SOURCE_L7, sp)
        out.append(Match(
            principals=_string_matches(src, "principals", sp, warn, principal=True),
            not_principals=_string_matches(src, "notPrincipals", sp, warn, principal=True),
            namespaces=_string_matches(src, "namespaces", sp, warn),
            not_namespaces=_string_matches(src, "notNamespaces", sp, warn),
            service_accounts=_accounts(src, "serviceAccounts", sp),
            not_service_accounts=_accounts(src, "notServiceAccounts", sp),
            source_ips=_networks(src, "ipBlocks", sp),
            not_source_ips=_networks(src, "notIpBlocks", sp)))
    return tuple(out)


def _operations(rule: Mapping[str, object], path: FieldPath, l7: list[str]) -> tuple[Match, ...]:
    out = []
    for i, item in enumerate(f.items(rule, "to", path)):
        op, op_path = _entry(item, (*path, "to", i), "operation",
                            _OPERATION_L4 + _OPERATION_L7)
        l7 += _l7_present(op, _OPERATION_L7, op_path)
        out.append(Match(destination_ports=_ports(op, "ports", op_path),
                         not_destination_ports=_ports(op, "notPorts", op_path)))
    return tuple(out)


def _conditions(rule: Mapping[str, object], path: FieldPath, warn: Warn,
                l7: list[str]) -> list[Match]:
    out = []
    for i, item in enumerate(f.items(rule, "when", path)):
        cp = (*path, "when", i)
        cond = f.mapping(item, cp)
        f.check_keys(cond, cp, ("key", "values", "notValues"))
        key = f.string(cond, "key", cp)
        if "values" not in cond and "notValues" not in cond:
            f.fail(cp, "set values or notValues")
        if key.startswith(_WHEN_L7_PREFIXES):
            f.strings(cond, "values", cp)
            f.strings(cond, "notValues", cp)
            l7.append(format_path((*cp, "key")) + f" ({key})")
            continue
        if key not in _WHEN_L4:
            f.fail((*cp, "key"), f"{key!r} is not an Istio condition key (L4 keys: "
                   f"{', '.join(_WHEN_L4)})")
        out.append(_condition(key, cond, cp, warn))
    return out


def _condition(key: str, cond: Mapping[str, object], path: FieldPath, warn: Warn) -> Match:
    if key in ("source.ip", "destination.ip"):
        pos, neg = _networks(cond, "values", path), _networks(cond, "notValues", path)
        if key == "source.ip":
            return Match(source_ips=pos, not_source_ips=neg)
        return Match(destination_ips=pos, not_destination_ips=neg)
    if key == "destination.port":
        return Match(destination_ports=_ports(cond, "values", path),
                     not_destination_ports=_ports(cond, "notValues", path))
    principal = key == "source.principal"
    pos_s = _string_matches(cond, "values", path, warn, principal=principal)
    neg_s = _string_matches(cond, "notValues", path, warn, principal=principal)
    if principal:
        return Match(principals=pos_s, not_principals=neg_s)
    return Match(namespaces=pos_s, not_namespaces=neg_s)
