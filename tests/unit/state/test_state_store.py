"""MeshState lookups and the StateStore's atomic replace, upserts, deletes and subscribers."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from agent.identity.spiffe import Identity
from agent.model.mesh import Labels, Namespace, Service, ServicePort, Workload
from agent.policy.authz import parse_authorization_policy
from agent.policy.peerauth import MtlsMode, parse_peer_authentication
from agent.state.snapshot import MeshState, key_of
from agent.state.store import StateStore


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


FE = Workload("frontend", "shop", "frontend", (ip("10.251.0.10"),), "node0",
              Labels({"app": "frontend"}))
BE = Workload("backend", "shop", "backend", (ip("10.251.0.11"), ip("fd00::11")), "node0",
              Labels({"app": "backend"}))
BE2 = Workload("backend-2", "shop", "backend", (ip("10.251.1.12"),), "node1",
               Labels({"app": "backend"}))
OUT = Workload("legacy", "shop", "legacy", (ip("10.251.1.13"),), "node1", in_mesh=False)
INHERIT = Workload("job", "batch", "runner", (ip("10.251.1.14"),), "node1", in_mesh=None)
SVC = Service("backend", "shop", (ip("10.96.0.20"),), (ServicePort(80, 8080, "http"),),
              Labels({"app": "backend"}))
POLICY = parse_authorization_policy({
    "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-all", "namespace": "shop"}, "spec": {}})
STRICT = parse_peer_authentication({
    "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
    "metadata": {"name": "default", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICT"}}})


def state() -> MeshState:
    return MeshState.build([FE, BE, BE2, OUT, INHERIT, SVC, POLICY, STRICT,
                            Namespace("shop", Labels({"istio.io/dataplane-mode": "ambient"})),
                            Namespace("batch")])


def test_lookups() -> None:
    s = state()
    assert s.workload_by_ip(ip("10.251.0.11")) is BE
    assert s.workload_by_ip(ip("fd00::11")) is BE
    assert s.workload_by_ip(ip("10.9.9.9")) is None
    assert s.workload_by_uid(FE.uid) is FE and FE.uid == "nodemesh//Workload/shop/frontend"
    assert s.workload_named("shop", "backend") is BE
    assert s.workloads_on_node("node0") == (BE, FE)
    assert s.workloads_on_node("node9") == ()
    assert s.service_endpoints(SVC) == (BE, BE2)
    assert s.service_by_vip(ip("10.96.0.20")) is SVC
    assert SVC.target_port(80) == 8080 and SVC.target_port(81) is None
    assert s.policy_set.authorization == (POLICY,)
    assert s.mtls_mode(FE, 80) is MtlsMode.STRICT


def test_identities_on_node_only_in_mesh_workloads() -> None:
    s = state()
    assert s.identities_on_node("node0") == {Identity("cluster.local", "shop", "frontend"),
                                             Identity("cluster.local", "shop", "backend")}
    # legacy is explicitly out; job follows namespace batch, which is not ambient
    assert s.identities_on_node("node1") == {Identity("cluster.local", "shop", "backend")}
    ambient_batch = s.with_object(Namespace("batch", Labels({"istio.io/dataplane-mode":
                                                             "ambient"})))
    assert Identity("cluster.local", "batch", "runner") in ambient_batch.identities_on_node(
        "node1")


def test_snapshots_are_immutable_values() -> None:
    s = state()
    s2 = s.with_object(Workload("frontend", "shop", "frontend", (ip("10.251.0.99"),), "node0"))
    assert s.workload_by_ip(ip("10.251.0.10")) is FE  # the old snapshot is unchanged
    assert s2.workload_by_ip(ip("10.251.0.10")) is None
    assert s2.workload_by_ip(ip("10.251.0.99")) is not None
    s3 = s2.without("Workload", FE.uid)
    assert s3.workload_named("shop", "frontend") is None
    assert s3.without("Workload", "missing") is s3
    with pytest.raises(TypeError):
        s.objects["Workload"]["x"] = FE  # type: ignore[index]  # proving it is read-only
    assert hash(FE) == hash(Workload("frontend", "shop", "frontend", (ip("10.251.0.10"),),
                                     "node0", Labels({"app": "frontend"})))


def test_store_replace_upsert_delete_notify() -> None:
    store = StateStore()
    seen: list[tuple[MeshState, MeshState]] = []
    unsubscribe = store.subscribe(lambda old, new: seen.append((old, new)))
    first = state()
    assert store.identities_on_node("node0") == set()
    store.replace(first)
    assert store.current is first and seen[-1][1] is first
    assert store.identities_on_node("node0") == first.identities_on_node("node0") != set()
    store.upsert(Namespace("tools"))
    assert store.current.namespace("tools") is not None and seen[-1][0] is first
    store.delete("Workload", key_of(FE))
    assert store.current.workload_by_uid(FE.uid) is None
    count = len(seen)
    store.delete("Workload", "no-such-uid")  # no change, no notification
    assert len(seen) == count
    with pytest.raises(ValueError, match="unknown kind 'Pod'"):
        store.delete("Pod", "x")
    unsubscribe()
    store.upsert(Namespace("other"))
    assert len(seen) == count


def test_a_failing_subscriber_does_not_block_others(caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore()
    got = []

    def broken(_old: MeshState, _new: MeshState) -> None:
        raise RuntimeError("boom")

    store.subscribe(broken)
    store.subscribe(lambda _o, new: got.append(new))
    store.upsert(Namespace("a"))
    assert len(got) == 1 and "state subscriber" in caplog.text


def test_concurrent_upserts_are_not_lost() -> None:
    store = StateStore()

    def writer(n: int) -> None:
        for i in range(100):
            store.upsert(Namespace(f"ns-{n}-{i}"))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.current.namespaces) == 400
