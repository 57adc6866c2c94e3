"""KubernetesStateSink: the real Kubernetes source, over loopback HTTP from the test API server,
feeding a real StateStore; and how its objects coexist with the file source's."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from support.apiserver import ApiServer, Kubectl

from agent.model.mesh import Workload
from agent.policy.authz import Action, AuthorizationPolicy
from agent.policy.peerauth import MtlsMode
from agent.sources.file import FileSource
from agent.sources.k8sstate import KubernetesStateSink, ObjectRejection
from agent.sources.kube.config import explicit
from agent.sources.kubernetes import KubernetesSource
from agent.state.snapshot import MeshState
from agent.state.store import StateStore

NODE = "node-a"
APS = "authorizationpolicies"
TIMEOUT = 20.0  # a stuck test fails here, long before pytest's own timeout
BAD_RULES = {"action": "ALLOW", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TIMEOUT):
            await coro

    asyncio.run(bounded())


class Changes:
    """Wakes the test on every store change."""

    def __init__(self, store: StateStore) -> None:
        self.count = 0
        self._event = asyncio.Event()
        store.subscribe(self._changed)

    def _changed(self, _old: MeshState, _new: MeshState) -> None:
        self.count += 1
        self._event.set()

    async def until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), 0.05)


@asynccontextmanager
async def feeding(server: ApiServer, store: StateStore,
                  rejections: list[ObjectRejection] | None = None,
                  ) -> AsyncIterator[KubernetesStateSink]:
    on_reject = rejections.append if rejections is not None else None
    sink = KubernetesStateSink(store, on_reject=on_reject)
    source = KubernetesSource(explicit(server.url, token=server.token), NODE, sink,
                              watch_timeout=60.0, backoff_initial=0.02)
    task = asyncio.create_task(source.run())
    try:
        yield sink
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def workloads(store: StateStore) -> dict[str, Workload]:
    return {w.ref: w for w in store.current.workloads}


def policy(store: StateStore, ref: str) -> AuthorizationPolicy | None:
    obj = store.current.objects["AuthorizationPolicy"].get(ref)
    assert obj is None or isinstance(obj, AuthorizationPolicy)
    return obj


def test_follows_pods_namespaces_services_and_peer_authentication() -> None:
    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            await k.create("namespaces", {"metadata": {
                "name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}})
            first = await k.pod("shop", "web", NODE, ip="10.1.0.1", service_account="web")
            await k.pod("shop", "elsewhere", "node-b", ip="10.2.0.1")
            await k.create("services", {"metadata": {"namespace": "shop", "name": "web"},
                                        "spec": {"clusterIP": "10.96.0.10",
                                                 "selector": {"app": "web"},
                                                 "ports": [{"port": 80, "targetPort": 8080}]}})
            await k.namespace("istio-system")
            await k.create("peerauthentications", {
                "metadata": {"namespace": "istio-system", "name": "default"},
                "spec": {"mtls": {"mode": "STRICT"}}})
            store = StateStore()
            changes = Changes(store)
            async with feeding(server, store) as sink:
                assert not sink.synced
                await sink.wait_synced()
                # Readiness means every first list is already in the store.
                state = store.current
                # Every pod of the cluster (the tunnel dials remote pods by their identity),
                # each with its node; only this node's are enrolled (workloads_on_node).
                assert set(workloads(store)) == {"shop/web", "shop/elsewhere"}
                assert workloads(store)["shop/elsewhere"].node == "node-b"
                web = workloads(store)["shop/web"]
                assert web.uid == "Kubernetes//Pod/shop/web"
                assert web.k8s_uid == first["metadata"]["uid"]
                assert web.ips == (ipaddress.ip_address("10.1.0.1"),)
                assert state.in_mesh(web) and web.identity.uri.endswith("/ns/shop/sa/web")
                assert [w.ref for w in state.workloads_on_node(NODE)] == ["shop/web"]
                svc = state.services[0]
                assert svc.ref == "shop/web" and state.service_endpoints(svc) == (web,)
                assert state.mtls_mode(web, 8080) is MtlsMode.STRICT

                # Recreated under the same name: same store key, new pod (new netns on the node).
                await k.delete("pods", "shop", "web")
                await changes.until(lambda: "shop/web" not in workloads(store))
                second = await k.pod("shop", "web", NODE, ip="10.1.0.7", service_account="web")
                await changes.until(lambda: "shop/web" in workloads(store)
                                    and workloads(store)["shop/web"].ips != ())
                again = workloads(store)["shop/web"]
                assert again.k8s_uid == second["metadata"]["uid"] != web.k8s_uid
                assert again.ips == (ipaddress.ip_address("10.1.0.7"),)

                # A finished pod leaves the state before the pod object is deleted.
                await k.patch("pods", "shop", "web", {"status": {"phase": "Succeeded"}},
                              "status")
                await changes.until(lambda: "shop/web" not in workloads(store))

                await k.patch("namespaces", "", "shop", {"metadata": {"labels": {
                    "istio.io/dataplane-mode": "none"}}})
                await changes.until(lambda: not store.current.namespace("shop").ambient)  # type: ignore[union-attr]  # shop exists
                await k.delete("services", "shop", "web")
                await k.delete("peerauthentications", "istio-system", "default")
                await changes.until(lambda: not store.current.services
                                    and not store.current.peer_authentications)
                assert not sink.rejected

    run(body())


def test_policy_updates_and_a_bad_update_keeps_the_last_good_version(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            await k.namespace("shop")
            await k.authorization_policy("shop", "p1", {"action": "ALLOW", "rules": [{}]})
            store = StateStore()
            changes = Changes(store)
            rejections: list[ObjectRejection] = []
            async with feeding(server, store, rejections) as sink:
                await sink.wait_synced()
                p1 = policy(store, "shop/p1")
                assert p1 is not None and p1.action is Action.ALLOW

                current = server.items(APS)["shop/p1"]
                await k.replace(APS, {**current, "spec": {"action": "DENY", "rules": [{}]}})
                await changes.until(lambda: policy(store, "shop/p1").action is Action.DENY)  # type: ignore[union-attr]  # present
                good = policy(store, "shop/p1")

                # The bad version is refused; the DENY version stays in force.
                bad = await k.replace(APS, {**server.items(APS)["shop/p1"], "spec": BAD_RULES})
                # A change made after the bad one still goes through: it was not a blocker.
                await k.authorization_policy("shop", "p2", {"action": "DENY", "rules": [{}]})
                await changes.until(lambda: policy(store, "shop/p2") is not None)
                assert policy(store, "shop/p1") is good
                assert len(rejections) == 1
                rej = rejections[0]
                assert (rej.resource, rej.ref, rej.kept_previous) == (APS, "shop/p1", True)
                assert rej.resource_version == bad["metadata"]["resourceVersion"]
                assert "spec.rules[0].from[0].source.ipBlocks[0]" in rej.error
                assert set(sink.rejected) == {("AuthorizationPolicy", "shop/p1")}
                logged = [r for r in caplog.records if r.levelno == logging.ERROR]
                assert len(logged) == 1
                assert "shop/p1" in logged[0].getMessage()
                assert "ipBlocks[0]" in logged[0].getMessage()
                assert "keeping its last good version" in logged[0].getMessage()

                # Fixed: applied, and no longer reported.
                await k.replace(APS, {**server.items(APS)["shop/p1"],
                                      "spec": {"action": "ALLOW", "rules": [{}]}})
                await changes.until(lambda: policy(store, "shop/p1").action is Action.ALLOW)  # type: ignore[union-attr]  # present
                assert not sink.rejected

                # A new policy that is bad from the start never enters the state.
                await k.authorization_policy("shop", "p3", BAD_RULES)
                await k.delete(APS, "shop", "p2")
                await changes.until(lambda: policy(store, "shop/p2") is None)
                assert policy(store, "shop/p3") is None
                assert not rejections[-1].kept_previous and rejections[-1].ref == "shop/p3"
                # Deleting it clears the report; deleting p1 removes it.
                await k.delete(APS, "shop", "p3")
                await k.delete(APS, "shop", "p1")
                await changes.until(lambda: policy(store, "shop/p1") is None)
                assert not sink.rejected and not store.current.authorization_policies

    run(body())


MESH_FILE = """\
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
kind: Workload
metadata: {name: vm-1, namespace: shop}
spec: {ips: [10.9.0.1]}
"""


def k8s_namespace(name: str, uid: str, rv: str, **labels: str) -> dict[str, Any]:
    return {"kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": name, "uid": uid, "resourceVersion": rv, "labels": labels}}


def test_file_and_kubernetes_objects_coexist(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore()
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH_FILE, encoding="utf-8")
    files = FileSource(mesh, store)
    sink = KubernetesStateSink(store)
    files.load_once()
    sink.on_event("namespaces", "ADDED", k8s_namespace("payments", "u1", "1"))
    assert {n.name for n in store.current.namespaces} == {"shop", "payments"}

    # A file reload replaces only the file's objects.
    mesh.write_text(MESH_FILE.replace("vm-1", "vm-2"), encoding="utf-8")
    assert files.poll()
    assert {w.name for w in store.current.workloads} == {"vm-2"}
    assert {n.name for n in store.current.namespaces} == {"shop", "payments"}

    # Both define "shop": the last writer wins, and a removal by the other leaves it alone.
    caplog.set_level(logging.WARNING)
    sink.on_event("namespaces", "ADDED", k8s_namespace("shop", "u2", "2"))
    shop = store.current.namespace("shop")
    assert shop is not None and not shop.ambient  # the Kubernetes version, without the label
    assert any("another source" in r.getMessage() for r in caplog.records)
    mesh.write_text(MESH_FILE.replace("vm-1", "vm-2").split("---")[1], encoding="utf-8")
    assert files.poll()  # the file no longer defines shop; the Kubernetes one stays
    assert store.current.namespace("shop") is shop
    sink.on_event("namespaces", "DELETED", k8s_namespace("shop", "u2", "3"))
    sink.on_event("namespaces", "DELETED", k8s_namespace("payments", "u1", "4"))
    assert store.current.namespaces == []
    assert {w.name for w in store.current.workloads} == {"vm-2"}


def test_unchanged_conversion_does_not_notify_and_synced_is_an_event() -> None:
    store = StateStore()
    changes = Changes(store)
    sink = KubernetesStateSink(store)
    sink.on_event("namespaces", "ADDED", k8s_namespace("shop", "u1", "1"))
    # A new resourceVersion that changes nothing the mesh reads (annotations, status).
    sink.on_event("namespaces", "MODIFIED", k8s_namespace("shop", "u1", "2"))
    assert changes.count == 1
    with pytest.raises(ValueError, match="resource 'configmaps' has no mesh kind"):
        sink.on_event("configmaps", "ADDED", k8s_namespace("x", "u", "1"))

    async def readiness() -> None:
        waiter = asyncio.create_task(sink.wait_synced())
        await asyncio.sleep(0)
        assert not waiter.done()
        sink.on_synced()
        await waiter
        assert sink.synced

    run(readiness())


CRL = "connectionratelimits"


def test_follows_connection_rate_limits_and_rejects_a_bad_one_alone() -> None:
    def limits(store: StateStore) -> dict[str, object]:
        return {lim.key: lim for lim in store.current.rate_limits}

    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            good = {"selector": {"matchLabels": {"app": "db"}}, "limits": [
                {"from": {"namespace": "tools"}, "connectionsPerSecond": 5, "burst": 5}]}
            await k.namespace("shop")
            await k.create(CRL, {"metadata": {"namespace": "shop", "name": "db"}, "spec": good})
            store = StateStore()
            changes = Changes(store)
            rejections: list[ObjectRejection] = []
            async with feeding(server, store, rejections) as sink:
                await sink.wait_synced()
                (lim,) = store.current.rate_limits
                assert (lim.key, lim.rules[0].connections_per_second, lim.rules[0].burst) == (
                    "shop/db", 5.0, 5)
                # A bad version is rejected with its field; the last good one stays.
                await k.patch(CRL, "shop", "db", {"spec": {"limits": [
                    {"from": {"namespace": "tools"}, "burst": 3}]}})
                await changes.until(lambda: bool(rejections))
                assert rejections[-1].resource == CRL and rejections[-1].kept_previous
                assert "spec.limits[0]" in rejections[-1].error
                assert limits(store)["shop/db"] == lim
                await k.delete(CRL, "shop", "db")
                await changes.until(lambda: not limits(store))

    run(body())
