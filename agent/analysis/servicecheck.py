"""`nodemesh policy check --to <Service>`: the endpoints a service port resolves to, and the
verdict for each, decided for the endpoint workload exactly as for a direct connect to it (the
kernel translates the VIP before it checks policy)."""

from __future__ import annotations

from agent.identity.spiffe import Identity
from agent.model.fields import IPAddress
from agent.model.mesh import Service
from agent.policy.connection import Connection
from agent.policy.evaluator import evaluate
from agent.state.services import endpoints, unready
from agent.state.snapshot import MeshState

NO_HEALTHY_UPSTREAM = "no_healthy_upstream"


def service_report(state: MeshState, service: Service, port: int, *, src_ref: str | None,
                   src_ip: IPAddress, identity: Identity | None) -> dict[str, object]:
    """The report for a connect to `service` port `port`; `port` must be a declared one."""
    sp = next(p for p in service.ports if p.port == port)
    rows: list[dict[str, object]] = []
    for ep in endpoints(state, service, sp):
        if ep.workload is None:
            # An EndpointSlice address that is no workload: outside the mesh, no destination
            # policy applies and the tunnel passes the connection through.
            rows.append({
                "workload": None, "ip": str(ep.ip), "target_port": ep.port, "in_mesh": False,
                "verdict": "allow", "allowed": True, "policy": None, "policy_kind": None,
                "rule": None, "reason": "outside the mesh: passed through", "mtls_mode": None,
            })
            continue
        d = evaluate(state.policy_set, Connection(src_ip=src_ip, src_identity=identity,
                                                   dst=ep.workload, dst_ip=ep.ip,
                                                   dst_port=ep.port))
        rows.append({
            "workload": ep.workload.ref, "ip": str(ep.ip), "target_port": ep.port,
            "in_mesh": state.in_mesh(ep.workload), "verdict": d.verdict.value,
            "allowed": d.allowed, "policy": d.policy, "policy_kind": d.policy_kind,
            "rule": d.rule, "reason": d.reason,
            "mtls_mode": state.mtls_mode(ep.workload, ep.port).value,
        })
    notes = []
    not_ready = unready(state, service)
    if not_ready:
        notes.append(f"not ready, so not selected: {', '.join(not_ready)}")
    if state.slices_of(service):
        notes.append("endpoints from EndpointSlices: " + ", ".join(
            s.name for s in state.slices_of(service)))
    if not rows:
        verdict = NO_HEALTHY_UPSTREAM
        notes.append("no ready endpoint: connects to the VIP are refused (ECONNREFUSED)")
    elif all(r["allowed"] for r in rows):
        verdict = "allow"
    elif any(r["allowed"] for r in rows):
        verdict = "mixed"
        notes.append("endpoints differ: a connect is allowed or denied by the endpoint the "
                     "kernel picks")
    else:
        verdict = "deny"
    return {
        "service": service.ref,
        "vips": [str(v) for v in service.vips],
        "port": port,
        "target_port": sp.target_port,
        "verdict": verdict,
        "allowed": verdict == "allow",
        "source": {"workload": src_ref, "ip": str(src_ip),
                   "identity": identity.uri if identity else None},
        "endpoints": rows,
        "notes": notes,
    }


def print_service_report(r: dict[str, object]) -> None:
    src = r["source"]
    assert isinstance(src, dict)
    print(f"verdict:     {str(r['verdict']).upper()}")
    print(f"source:      {src['workload'] or '(outside the mesh)'} {src['ip']} "
          + (f"identity {src['identity']} (mTLS)" if src["identity"] else "plaintext"))
    vips = r["vips"]
    assert isinstance(vips, list)
    print(f"service:     {r['service']} {', '.join(vips) or '(headless)'} port {r['port']} -> "
          f"targetPort {r['target_port']}")
    eps = r["endpoints"]
    assert isinstance(eps, list)
    for e in eps:
        by = "default (no policy decided)" if e["policy"] is None else (
            f"{e['policy_kind']} {e['policy']}"
            + (f" rule {e['rule']}" if e["rule"] is not None else ""))
        print(f"endpoint:    {e['workload'] or '(outside the mesh)'} {e['ip']}:{e['target_port']} "
              f"{str(e['verdict']).upper()} by {by} ({e['reason']})")
    notes = r["notes"]
    assert isinstance(notes, list)
    for n in notes:
        print(f"note:        {n}")
