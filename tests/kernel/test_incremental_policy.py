"""Incremental policy updates in the kernel (issue #14): with 10k rules over ten destinations, a
1k-rule change to one destination writes only that destination's entries into the inactive
generation, and after the switch the generation in force holds exactly what a full compile
gives (read back from the kernel)."""

from __future__ import annotations

import ipaddress
from typing import Any

from agent.datapath.datapath import Datapath
from agent.datapath.identities import IdentityTable
from agent.datapath.policymap import PolicyCompiler
from agent.model.mesh import Labels, Workload
from agent.policy.authz import AuthorizationPolicy, parse_authorization_policy
from agent.policy.evaluator import PolicySet

DESTS = 10
RULES = 1000


def workloads() -> list[Workload]:
    return [Workload(f"w{i}", "shop", f"w{i}", (ipaddress.ip_address(f"10.252.0.{10 + i}"),),
                     "node0", Labels({"app": f"w{i}"})) for i in range(DESTS)]


def policy(i: int, allowed: int, variant: str) -> AuthorizationPolicy:
    rules: list[dict[str, Any]] = [
        {"from": [{"source": {"principals": [f"cluster.local/ns/ext/sa/{variant}{j}"]}}]}
        for j in range(RULES - 1)]
    rules.append({"from": [{"source": {"principals": [f"cluster.local/ns/shop/sa/w{allowed}"]}}]})
    return parse_authorization_policy({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": f"allow-w{i}", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": f"w{i}"}}, "action": "ALLOW",
                 "rules": rules}})


def test_a_change_to_one_destination_touches_only_its_entries(clean_policy: Datapath) -> None:
    dp = clean_policy
    compiler = PolicyCompiler(IdentityTable())
    ws = workloads()
    before = PolicySet(tuple(policy(i, (i + 1) % DESTS, "a") for i in range(DESTS)))
    first = compiler.compile(before, ws)
    assert dp.apply_policy(first.entries, first.cidrs, first.groups).mode == "full"
    second = compiler.compile(before, ws)  # nothing changed: nothing evaluated again
    assert second.recompiled == []
    assert dp.apply_policy(second.entries, second.cidrs, second.groups).mode == "full"
    assert dp.policy_entries() == first.entries

    changed = 3
    after = PolicySet(tuple(policy(i, (i + 1) % DESTS, "a") if i != changed
                            else policy(i, (i + 2) % DESTS, "b") for i in range(DESTS)))
    third = compiler.compile(after, ws)
    assert third.recompiled == [ws[changed].uid]
    update = dp.apply_policy(third.entries, third.cidrs, third.groups)
    assert update.mode == "incremental"
    dst = ws[changed].ips[0]
    assert update.touched and {k.dst for k in update.touched} == {dst}
    assert update.written + update.deleted == len(update.touched)
    full = PolicyCompiler(IdentityTable()).compile(after, ws, full=True)
    in_force = dp.policy_entries()
    assert in_force == third.entries
    assert {k: (e.verdict, e.reason, e.rule) for k, e in in_force.items()} == {
        k: (e.verdict, e.reason, e.rule) for k, e in full.entries.items()}
    # The other destinations' entries are the very ones of before.
    assert {k: e for k, e in in_force.items() if k.dst != dst} == {
        k: e for k, e in first.entries.items() if k.dst != dst}
