"""`nodemesh policy`: check what a connection's verdict is (and why) against a mesh file."""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import logging
import sys
from collections.abc import Callable

from agent.analysis.servicecheck import print_service_report, service_report
from agent.commands import simulate
from agent.config import DEFAULT_ROOT_NAMESPACE
from agent.identity.spiffe import Identity
from agent.model.fields import IPAddress
from agent.model.mesh import Service, Workload
from agent.policy.connection import Connection
from agent.policy.evaluator import Decision, applicable, evaluate
from agent.policy.ratelimit import limit_for
from agent.sources.file import MeshConfigError, load_path
from agent.state.snapshot import MeshState

EXIT_ALLOW, EXIT_DENY, EXIT_ERROR = 0, 1, 2

log = logging.getLogger(__name__)


def _exit_2_on_failure(func: Callable[[argparse.Namespace], int]
                       ) -> Callable[[argparse.Namespace], int]:
    """Any failure exits 2: an uncaught exception would exit 1, which means "denied"."""

    @functools.wraps(func)
    def guarded(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except Exception as e:  # MemoryError, RecursionError, a bug: never a verdict
            log.debug("policy %s failed", args.policy_command, exc_info=True)
            # If not even the message can be written, the status still says it.
            with contextlib.suppress(Exception):
                print(f"nodemesh policy: internal error: {type(e).__name__}: {e}",
                      file=sys.stderr)
            return EXIT_ERROR

    return guarded


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("policy", help="check and validate L4 authorization policy")
    psub = p.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    check = psub.add_parser(
        "check", help="the verdict for one connection and the policy rule that decided it",
        description="Evaluate one connection with the reference evaluator. Exit status: 0 "
                    "allowed, 1 denied, 2 invalid input or any other failure.")
    _config_args(check)
    check.add_argument("--from", dest="src", required=True, metavar="NS/WORKLOAD|IP",
                       help="source workload, or an IP (a non-workload IP connects in plaintext)")
    check.add_argument("--to", dest="dst", required=True, metavar="NS/WORKLOAD|NS/SERVICE|IP",
                       help="destination workload (by name or one of its IPs), or a Service "
                            "(by name, or its VIP): every ready endpoint is checked")
    check.add_argument("--port", type=int, required=True,
                       help="destination (target) port; for a Service, the service port")
    check.add_argument("--service", action="store_true",
                       help="--to NS/NAME names the Service when a workload has that name too")
    check.add_argument("--plaintext", action="store_true",
                       help="the source connects without mTLS even if it is in the mesh")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=_exit_2_on_failure(_check))
    validate = psub.add_parser(
        "validate", help="validate a mesh file or directory",
        description="Exit status: 0 valid, 2 invalid or any other failure.")
    _config_args(validate)
    validate.set_defaults(func=_exit_2_on_failure(_validate))
    simulate.register(psub)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE|DIR",
                   help="mesh YAML file or directory of them")
    p.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE,
                   help="namespace whose policies apply mesh-wide (default %(default)s)")


class _InputError(ValueError):
    pass


def _find(state: MeshState, text: str, role: str) -> tuple[Workload | None, IPAddress]:
    if "/" in text:
        ns, _, name = text.partition("/")
        w = state.workload_named(ns, name)
        if w is None:
            known = ", ".join(sorted(x.ref for x in state.workloads)) or "none"
            raise _InputError(f"{role} {text!r}: no such workload (known: {known})")
        if not w.ips:
            raise _InputError(f"{role} {text!r}: the workload has no IP address")
        return w, w.ips[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise _InputError(f"{role} {text!r}: want <namespace>/<workload> or an IP address"
                          ) from None
    return state.workload_by_ip(ip), ip


def _service(state: MeshState, text: str, port: int, forced: bool) -> Service | None:
    """The Service `text` names when it is one and `port` is one of its ports: by VIP, or by
    NS/NAME when no workload has that name (or --service)."""
    svc: Service | None = None
    if "/" in text:
        ns, _, name = text.partition("/")
        if forced or state.workload_named(ns, name) is None:
            svc = next((s for s in state.services if s.ref == text), None)
        if forced and svc is None:
            raise _InputError(f"--to {text!r}: no such Service")
    else:
        try:
            svc = state.service_by_vip(ipaddress.ip_address(text))
        except ValueError:
            return None
    if svc is None:
        return None
    if svc.target_port(port) is None:
        declared = ", ".join(str(p.port) for p in svc.ports) or "none"
        if "/" in text:
            raise _InputError(f"--to {text}: service {svc.ref} does not declare port {port} "
                              f"(declared: {declared}); a connect to its VIP on it passes "
                              "through untranslated")
        return None  # a VIP with an undeclared port: not a Service connect (reported below)
    return svc


def _load(args: argparse.Namespace) -> MeshState | None:
    try:
        return load_path(args.config, args.root_namespace)
    except MeshConfigError as e:
        print(f"nodemesh policy: invalid configuration: {e}", file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    state = _load(args)
    if state is None:
        return EXIT_ERROR
    try:
        if not 1 <= args.port <= 65535:
            raise _InputError(f"--port {args.port}: want 1-65535")
        src, src_ip = _find(state, args.src, "--from")
        svc = _service(state, args.dst, args.port, args.service)
        if svc is not None:
            identity = src.identity if src is not None and state.in_mesh(src) \
                and not args.plaintext else None
            sreport = service_report(state, svc, args.port, src_ref=src.ref if src else None,
                                     src_ip=src_ip, identity=identity)
            if args.json:
                print(json.dumps(sreport, indent=2))
            else:
                print_service_report(sreport)
            return EXIT_ALLOW if sreport["allowed"] else EXIT_DENY
        dst, dst_ip = _find(state, args.dst, "--to")
        if dst is None:
            svc = state.service_by_vip(dst_ip)
            hint = (f" (it is the VIP of service {svc.ref}; policy applies at the selected "
                    "workloads, name one of them)") if svc else ""
            raise _InputError(f"--to {args.dst}: not a workload's IP{hint}")
    except _InputError as e:
        print(f"nodemesh policy check: {e}", file=sys.stderr)
        return EXIT_ERROR
    identity = src.identity if src is not None and state.in_mesh(src) and not args.plaintext \
        else None
    conn = Connection(src_ip=src_ip, src_identity=identity, dst=dst, dst_ip=dst_ip,
                      dst_port=args.port)
    decision = evaluate(state.policy_set, conn)
    report = _report(state, src, conn, decision)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return EXIT_ALLOW if decision.allowed else EXIT_DENY


def _report(state: MeshState, src: Workload | None, conn: Connection,
            decision: Decision) -> dict[str, object]:
    pols = applicable(state.policy_set, conn.dst)
    notes = []
    if not state.in_mesh(conn.dst):
        notes.append(f"{conn.dst.ref} is not in the mesh: the node proxy enforces no policy "
                     "for it; the verdict is what would apply once it joins")
    return {
        "verdict": decision.verdict.value,
        "allowed": decision.allowed,
        "policy": decision.policy,
        "policy_kind": decision.policy_kind,
        "rule": decision.rule,
        "reason": decision.reason,
        "dry_run": [{"policy": m.policy, "action": m.action.value, "rule": m.rule}
                    for m in decision.dry_run],
        "source": {"workload": src.ref if src else None, "ip": str(conn.src_ip),
                   "identity": conn.src_identity.uri if conn.src_identity else None},
        "destination": {"workload": conn.dst.ref, "ip": str(conn.dst_ip), "port": conn.dst_port,
                        "mtls_mode": state.mtls_mode(conn.dst, conn.dst_port).value},
        "applicable_policies": [
            {"policy": p.key, "action": p.action.value,
             "scope": p.scope(state.root_namespace).value, "dry_run": p.dry_run}
            for p in pols],
        "rate_limit": rate_limit_report(state, conn.src_identity, conn.dst)
        if decision.allowed else None,
        "warnings": [w for p in pols for w in p.warnings],
        "notes": notes,
    }


def rate_limit_report(state: MeshState, identity: Identity | None,
                      dst: Workload) -> dict[str, object] | None:
    """The ConnectionRateLimit that applies to an allowed connection, or None."""
    applied = limit_for(state.rate_limits, identity, dst)
    if applied is None:
        return None
    rule = applied.rule
    return {
        "limit": applied.limit.key,
        "entry": applied.index,
        "source": rule.source.describe(),
        "connections_per_second": rule.connections_per_second,
        "burst": rule.burst if rule.connections_per_second is not None else None,
        "max_connections": rule.max_connections,
        "over_limit": {"reason": "RATE_LIMITED", "response_flags": "RL",
                       "errno": "ECONNREFUSED"},
        "summary": f"{applied.limit.key} limits[{applied.index}] ({rule.source.describe()}): "
                   f"{rule.describe()}; beyond it a connect fails with ECONNREFUSED, "
                   "reason RATE_LIMITED",
    }


def _print(r: dict[str, object]) -> None:
    src = r["source"]
    dst = r["destination"]
    assert isinstance(src, dict) and isinstance(dst, dict)
    src_name = src["workload"] or "(outside the mesh)"
    rows = [
        ("verdict", str(r["verdict"]).upper()),
        ("source", f"{src_name} {src['ip']} "
                   + (f"identity {src['identity']} (mTLS)" if src["identity"] else "plaintext")),
        ("destination", f"{dst['workload']} {dst['ip']} port {dst['port']} "
                        f"(PeerAuthentication mode {dst['mtls_mode']})"),
        ("decided by", "default (no policy decided)" if r["policy"] is None
         else f"{r['policy_kind']} {r['policy']}"
         + (f" rule {r['rule']}" if r["rule"] is not None else "")),
        ("reason", str(r["reason"])),
    ]
    pols = r["applicable_policies"]
    assert isinstance(pols, list)
    rows.append(("policies", ", ".join(
        f"{p['policy']} ({p['action']}, {p['scope']}{', dry-run' if p['dry_run'] else ''})"
        for p in pols) or "none apply"))
    limit = r.get("rate_limit")
    if isinstance(limit, dict):
        rows.append(("rate limit", str(limit["summary"])))
    elif r["allowed"]:
        rows.append(("rate limit", "none applies"))
    dry = r["dry_run"]
    assert isinstance(dry, list)
    if dry:
        rows.append(("dry-run", ", ".join(
            f"{m['policy']} rule {m['rule']} would {'allow' if m['action'] == 'ALLOW' else 'deny'}"
            for m in dry)))
    for key in ("warnings", "notes"):
        values = r[key]
        assert isinstance(values, list)
        rows += [(key[:-1], str(v)) for v in values]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k + ':':<{width + 2}}{v}")


def _validate(args: argparse.Namespace) -> int:
    state = _load(args)
    if state is None:
        return EXIT_ERROR
    counts: dict[str, int] = {}
    for obj in state.all_objects():
        counts[type(obj).__name__] = counts.get(type(obj).__name__, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no objects"
    print(f"{args.config}: valid ({summary})")
    for p in state.authorization_policies:
        for w in p.warnings:
            print(f"warning: {w}")
    return 0
