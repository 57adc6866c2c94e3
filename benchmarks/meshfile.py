"""Mesh YAML for the benchmarks: the measured pair, the 10k-rule policy, the 100-pod node.

Test-bed addresses are fixed per position (node i, pod j -> 10.251.i.(10+j)), so the files can be
written before the cluster exists. Only pod 0 of each node is in the mesh in the main cluster;
pod 1 of each node stays outside it and carries the no-mesh and Envoy runs.
"""

from __future__ import annotations

from agent.testbed.addressing import Plan

NAMESPACE = "bench"
_PLAN = Plan("bench0")  # any valid run id: addresses do not depend on it


def pod_ip(node: int, pod: int) -> str:
    return str(_PLAN.pod_ip(node, pod))


def _namespace() -> str:
    return (
        f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n"
        "  labels: {istio.io/dataplane-mode: ambient}\n"
    )


def _workload(name: str, node: int, pod: int) -> str:
    return (
        f"kind: Workload\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n"
        f"  labels: {{app: {name}}}\nspec:\n  serviceAccount: {name}\n"
        f"  ips: [{pod_ip(node, pod)}]\n  node: node{node}\n"
    )


def principal(sa: str) -> str:
    return f"cluster.local/ns/{NAMESPACE}/sa/{sa}"


def pair() -> str:
    """client (node0 pod0) and server (node1 pod0), no policy: everything allowed, over mTLS."""
    return "---\n".join([_namespace(), _workload("client", 0, 0), _workload("server", 1, 0)])


def with_rules(rules: int, deny_client: bool) -> str:
    """The pair plus an ALLOW policy on the server with `rules` rules (each naming its own
    principal; one of them is the client's), optionally plus a DENY for the client.

    Rules name principals rather than ports: each distinct port multiplies the compiler's work
    by the number of sources, and 10k ports would measure that product, not a policy change.
    """
    lines = [
        "apiVersion: security.istio.io/v1",
        "kind: AuthorizationPolicy",
        "metadata: {name: server-allow-many, namespace: " + NAMESPACE + "}",
        "spec:",
        "  selector: {matchLabels: {app: server}}",
        "  action: ALLOW",
        "  rules:",
        f'  - from: [{{source: {{principals: ["{principal("client")}"]}}}}]',
    ]
    lines += [
        f'  - from: [{{source: {{principals: ["{principal(f"caller-{i}")}"]}}}}]'
        for i in range(rules - 1)
    ]
    docs = [pair(), "\n".join(lines) + "\n"]
    if deny_client:
        docs.append(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: server-deny-client, namespace: {NAMESPACE}}}\n"
            "spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n"
            f'  rules:\n  - from: [{{source: {{principals: ["{principal("client")}"]}}}}]\n'
        )
    return "---\n".join(docs)


def many_pods(pods: int, without: int | None = None) -> str:
    """`pods` workloads on node0, each with its own service account (so its own certificate);
    pod `without` left out."""
    return "---\n".join([_namespace()] + [_workload(f"pod-{j}", 0, j) for j in range(pods)
                                           if j != without])


def same_node_pair() -> str:
    """client (node0 pod0) and server (node0 pod1) on one node, no policy: all allowed."""
    return "---\n".join([_namespace(), _workload("client", 0, 0), _workload("server", 0, 1)])


def soak(unrelated_rule: bool, deny_probe: bool) -> str:
    """The soak's mesh: client (node0 pod0) and prober (node0 pod1) call server (node1 pod0).

    `unrelated_rule` adds a DENY on the server for a principal nobody has (traffic unchanged);
    `deny_probe` adds a DENY on the server for the prober only (the client is unaffected)."""
    docs = [_namespace(), _workload("client", 0, 0), _workload("prober", 0, 1),
            _workload("server", 1, 0)]
    for name, sa, on in (("soak-unrelated", "nobody", unrelated_rule),
                         ("soak-deny-probe", "prober", deny_probe)):
        if on:
            docs.append(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                f"metadata: {{name: {name}, namespace: {NAMESPACE}}}\n"
                "spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n"
                f'  rules:\n  - from: [{{source: {{principals: ["{principal(sa)}"]}}}}]\n'
            )
    return "---\n".join(docs)
