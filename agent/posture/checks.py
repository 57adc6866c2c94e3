"""Security posture checks: what a reviewer asks about a mesh, each answer a Finding with a
severity and the fix.

Inputs are plain data: the mesh state (a file or the agent's live state), certificates (the
agent's workload certificates and trust roots, or PEM files) and recent flow records. The report
(schema `nodemesh.posture/v1`) is documented in docs/posture.md.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from agent.model.mesh import DATAPLANE_MODE_LABEL, Workload
from agent.policy.authz import Action, AuthorizationPolicy
from agent.policy.evaluator import enforced
from agent.policy.peerauth import MtlsMode
from agent.state.snapshot import MeshState
from agent.telemetry.flow import FlowEventKind, FlowRecord, SecurityPolicy, rfc3339

SCHEMA_ID: Final = "nodemesh.posture/v1"
DEFAULT_CERT_WARNING: Final = timedelta(days=30)
# A workload certificate renews at half-life; one still in use at 3/4 of its life is stuck.
ROTATION_OVERDUE_FRACTION: Final = 0.75


class Severity(enum.IntEnum):
    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Finding:
    check: str  # stable identifier of the check, e.g. "open-workload"
    severity: Severity
    subject: str  # what it is about: a namespace, workload, policy, certificate, connection
    title: str
    detail: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "severity": self.severity.label, "subject": self.subject,
                "title": self.title, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class CertificateInfo:
    """One certificate in force: a workload's (kind "workload"), a trust root ("root") or a PEM
    file given on the command line ("file")."""

    subject: str
    kind: str
    not_before: datetime
    not_after: datetime
    serial: str = ""

    def state(self, now: datetime, warning: timedelta) -> str:
        """ok | expiring | rotation-overdue | expired (see docs/posture.md)."""
        if now >= self.not_after:
            return "expired"
        if self.kind == "workload":
            life = self.not_after - self.not_before
            if now >= self.not_before + life * ROTATION_OVERDUE_FRACTION:
                return "rotation-overdue"
            return "ok"
        return "expiring" if self.not_after - now <= warning else "ok"

    def to_dict(self, now: datetime, warning: timedelta) -> dict[str, Any]:
        return {"subject": self.subject, "kind": self.kind, "serial": self.serial,
                "not_before": rfc3339(self.not_before), "not_after": rfc3339(self.not_after),
                "expires_in_seconds": int((self.not_after - now).total_seconds()),
                "state": self.state(now, warning)}


def mesh_findings(state: MeshState) -> list[Finding]:
    return [*_outside_mesh(state), *_mtls_modes(state), *_open_workloads(state),
            *_allow_all_sources(state)]


def _outside_mesh(state: MeshState) -> Iterable[Finding]:
    by_ns: dict[str, list[Workload]] = {}
    for w in state.workloads:
        by_ns.setdefault(w.namespace, []).append(w)
    names = sorted({n.name for n in state.namespaces} | set(by_ns))
    for name in names:
        ns = state.namespace(name)
        if name == state.root_namespace and not by_ns.get(name):
            continue  # the root namespace holds mesh-wide policy, not workloads
        if ns is None or not ns.ambient:
            out = sorted(w.name for w in by_ns.get(name, []) if not state.in_mesh(w))
            yield Finding(
                "namespace-outside-mesh", Severity.MEDIUM, name,
                f"namespace {name} is outside the mesh",
                f"workloads outside the mesh ({', '.join(out) or 'none yet'}) send and accept "
                "plaintext and no policy is enforced for them; new workloads do not join",
                f"kubectl label namespace {name} {DATAPLANE_MODE_LABEL}=ambient")
    for w in sorted(state.workloads, key=lambda w: w.ref):
        ns = state.namespace(w.namespace)
        if ns is not None and ns.ambient and not state.in_mesh(w):
            yield Finding(
                "workload-outside-mesh", Severity.MEDIUM, w.ref,
                f"workload {w.ref} opted out of the mesh",
                "its namespace is in the mesh but the workload is not (pod label "
                f"{DATAPLANE_MODE_LABEL}=none, or inMesh: false in a mesh file): plaintext and "
                "no policy enforcement",
                f"remove the opt-out ({DATAPLANE_MODE_LABEL}=none / inMesh: false) from {w.ref}")


def _mtls_modes(state: MeshState) -> Iterable[Finding]:
    """PERMISSIVE or DISABLE in force for in-mesh workloads, grouped by the setting's origin."""
    groups: dict[tuple[str, MtlsMode], list[str]] = {}
    resolver = state.policy_set.mtls
    for w in state.workloads:
        if not state.in_mesh(w):
            continue  # reported as outside the mesh
        _base, special = resolver.strict_ports(w)
        for port in (None, *sorted(special)):
            mode, pa = resolver.resolve(w, port)
            if mode is MtlsMode.STRICT:
                continue
            origin = f"PeerAuthentication {pa.key}" if pa else "default (no PeerAuthentication)"
            where = w.ref if port is None else f"{w.ref} port {port}"
            groups.setdefault((origin, mode), []).append(where)
    for (origin, mode), places in sorted(groups.items(), key=lambda kv: kv[0][0]):
        namespaces = sorted({p.split("/")[0] for p in places})
        subject = ", ".join(namespaces) if len(namespaces) > 1 else namespaces[0]
        yield Finding(
            f"mtls-{mode.value.lower()}", Severity.HIGH if mode is MtlsMode.DISABLE
            else Severity.MEDIUM, subject,
            f"mTLS {mode.value} for {', '.join(sorted(places))}",
            f"set by {origin}: plaintext connections are accepted"
            + (" and mTLS is not used" if mode is MtlsMode.DISABLE else ""),
            f"set a PeerAuthentication with mtls.mode STRICT in namespace {subject}"
            if len(namespaces) == 1 else
            f"set a mesh-wide PeerAuthentication STRICT in {state.root_namespace}")


def _open_workloads(state: MeshState) -> Iterable[Finding]:
    for w in sorted(state.workloads, key=lambda w: w.ref):
        if not state.in_mesh(w):
            continue
        pols = enforced(state.policy_set, w)
        if not any(p.action is Action.ALLOW for p in pols):
            denies = [p.key for p in pols if p.action is Action.DENY]
            yield Finding(
                "open-workload", Severity.MEDIUM, w.ref,
                f"no ALLOW policy applies to {w.ref}: it is open to every identity",
                "default allow" + (f"; only DENY policies apply ({', '.join(denies)})"
                                   if denies else ""),
                f"add an AuthorizationPolicy with action ALLOW selecting {w.ref} that names its "
                "callers")


def _rule_allows_everyone(p: AuthorizationPolicy) -> list[int]:
    return [r.index for r in p.rules if not r.never_matches
            and not any(m.uses_identity or m.uses_source_ip for m in r.all_matches())]


def _allow_all_sources(state: MeshState) -> Iterable[Finding]:
    for p in sorted(state.authorization_policies, key=lambda p: p.key):
        if p.action is not Action.ALLOW or p.dry_run or p.targets_waypoint:
            continue
        rules = _rule_allows_everyone(p)
        if rules:
            yield Finding(
                "allow-all-sources", Severity.HIGH, p.key,
                f"ALLOW policy {p.key} allows every source",
                f"rule{'s' if len(rules) > 1 else ''} {', '.join(map(str, rules))} name no "
                "principal, namespace, service account or IP block: any caller (with "
                "PERMISSIVE, even plaintext) matches",
                f"add `from: - source: principals: [...]` to {p.key}'s rules")


def certificate_findings(certs: Sequence[CertificateInfo], now: datetime,
                         warning: timedelta) -> list[Finding]:
    out = []
    for c in sorted(certs, key=lambda c: (c.kind, c.subject)):
        st = c.state(now, warning)
        left = c.not_after - now
        if st == "expired":
            out.append(Finding(
                "certificate-expired", Severity.CRITICAL, c.subject,
                f"{c.kind} certificate {c.subject} expired {rfc3339(c.not_after)}",
                "connections that need it fail the TLS handshake",
                "renew it now" if c.kind != "workload" else
                "check the agent's CA connection (nodemesh_certificate_* metrics, agent log)"))
        elif st == "expiring":
            out.append(Finding(
                "certificate-expiring", Severity.HIGH, c.subject,
                f"{c.kind} certificate {c.subject} expires in {_days(left)}",
                f"not after {rfc3339(c.not_after)} (warning window {_days(warning)})",
                "rotate it before it expires (for a root: add the new root to the trust "
                "bundle first, then switch issuing)"))
        elif st == "rotation-overdue":
            out.append(Finding(
                "certificate-rotation-overdue", Severity.HIGH, c.subject,
                f"workload certificate {c.subject} was not renewed",
                f"past {int(ROTATION_OVERDUE_FRACTION * 100)}% of its lifetime (renewal is at "
                f"half-life); expires {rfc3339(c.not_after)}",
                "check the agent's CA connection (nodemesh_certificate_* metrics, agent log)"))
    return out


def _days(d: timedelta) -> str:
    secs = int(d.total_seconds())
    return f"{secs / 86400:.1f} days" if secs >= 86400 else f"{secs / 3600:.1f} hours"


def _conn(rec: FlowRecord) -> str:
    dst = rec.destination
    return f"{rec.source.label() if rec.source.workload else rec.source.ip or 'unknown'} -> " \
           f"{dst.label() if dst.workload else dst.ip}:{dst.port}"


def flow_findings(records: Iterable[FlowRecord]) -> list[Finding]:
    plaintext: dict[str, int] = {}
    denies: dict[tuple[str, str], int] = {}
    for r in records:
        if r.kind is FlowEventKind.CLOSE and r.connection_security_policy is SecurityPolicy.NONE:
            plaintext[_conn(r)] = plaintext.get(_conn(r), 0) + 1
        elif r.kind in (FlowEventKind.DENY, FlowEventKind.AUTH_FAILURE):
            why = r.policy or r.reason or r.response_flags
            denies[(_conn(r), why)] = denies.get((_conn(r), why), 0) + 1
    out = [Finding("plaintext-connections", Severity.MEDIUM, conn,
                   f"{n} plaintext connection(s) {conn}",
                   "accepted without mTLS (destination PERMISSIVE or outside the mesh)",
                   "move the source into the mesh, then make the destination STRICT")
           for conn, n in sorted(plaintext.items())]
    out += [Finding("recent-denies", Severity.INFO, conn,
                    f"{n} connection(s) refused {conn}", f"decided by {why}",
                    "expected if the policy is right; otherwise fix the caller or the policy "
                    "(nodemesh policy check shows the deciding rule)")
            for (conn, why), n in sorted(denies.items())]
    return out


@dataclass(frozen=True)
class Inputs:
    state: MeshState
    source: dict[str, Any]  # where the inputs came from: {"kind": "mesh-file"|"agent", ...}
    certificates: tuple[CertificateInfo, ...] = ()
    flows: tuple[FlowRecord, ...] = ()
    flows_window: str = ""  # what `flows` covers, e.g. "the agent's last 4096 records"
    now: datetime | None = None
    cert_warning: timedelta = DEFAULT_CERT_WARNING


def build_report(inp: Inputs) -> dict[str, Any]:
    """The posture report (schema nodemesh.posture/v1)."""
    now = inp.now or datetime.now(UTC)
    findings = [*mesh_findings(inp.state),
                *certificate_findings(inp.certificates, now, inp.cert_warning),
                *flow_findings(inp.flows)]
    findings.sort(key=lambda f: (-f.severity, f.check, f.subject))
    st = inp.state
    return {
        "schema": SCHEMA_ID,
        "generated": rfc3339(now),
        "source": inp.source,
        "summary": {s.label: sum(1 for f in findings if f.severity is s)
                    for s in sorted(Severity, reverse=True)},
        "findings": [f.to_dict() for f in findings],
        "inventory": {
            "namespaces": len(st.namespaces),
            "workloads": len(st.workloads),
            "workloads_in_mesh": sum(1 for w in st.workloads if st.in_mesh(w)),
            "authorization_policies": len(st.authorization_policies),
            "peer_authentications": len(st.peer_authentications),
            "flows_examined": len(inp.flows),
            "flows_window": inp.flows_window,
        },
        "certificates": [c.to_dict(now, inp.cert_warning)
                         for c in sorted(inp.certificates, key=lambda c: (c.kind, c.subject))],
        "rate_limits": {"supported": True, "in_force": rate_limits_in_force(st)},
    }


def rate_limits_in_force(state: MeshState) -> list[dict[str, Any]]:
    """One row per ConnectionRateLimit entry, with the in-mesh workloads it applies to."""
    rows = []
    for lim in sorted(state.rate_limits, key=lambda x: x.key):
        dests = sorted(w.ref for w in state.workloads if lim.selects(w) and state.in_mesh(w))
        for i, rule in enumerate(lim.rules):
            rows.append({
                "limit": lim.key, "entry": i, "source": rule.source.describe(),
                "destinations": dests,
                "connections_per_second": rule.connections_per_second,
                "burst": rule.burst if rule.connections_per_second is not None else None,
                "max_connections": rule.max_connections,
                "summary": f"{lim.key} limits[{i}]: {rule.source.describe()} -> "
                           f"{', '.join(dests) or 'no workload'}: {rule.describe()}",
            })
    return rows
