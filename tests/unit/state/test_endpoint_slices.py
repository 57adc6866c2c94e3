"""EndpointSlices as a Service's endpoint truth: conversion, projection, which endpoints the
kernel gets (and why), pods' Ready condition and named ports; and the real Kubernetes source
following slices from the test API server (list, label selector, watch)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from ipaddress import IPv4Address as Ip
from typing import Any

import pytest
from support.apiserver import ApiServer, Kubectl, endpoint_slice

from agent.analysis.servicecheck import service_report
from agent.datapath.layouts import Backend, Frontend
from agent.datapath.servicemap import compile_services
from agent.model.fields import FieldError
from agent.model.mesh import EndpointSlice, Service, ServicePort, Workload
from agent.sources.k8sconvert import endpoint_slice_from_k8s, object_from_k8s, workload_from_pod
from agent.sources.k8sstate import KubernetesStateSink
from agent.sources.kube.config import explicit
from agent.sources.kube.project import project_endpoint_slice, project_pod
from agent.sources.kubernetes import KubernetesSource
from agent.state.services import endpoints
from agent.state.snapshot import MeshState
from agent.state.store import StateStore

NS = "shop"
VIP = Ip("10.96.0.30")


def ep(ip: str, **conditions: bool) -> dict[str, Any]:
    return {"addresses": [ip], "conditions": conditions, "nodeName": "node-a",
            "targetRef": {"kind": "Pod", "namespace": NS, "name": f"p-{ip}"},
            "zone": "z1", "hints": {"forZones": [{"name": "z1"}]}}


HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def sl(name: str, service: str, eps: list[dict[str, Any]],
       ports: list[dict[str, Any]] | None = None) -> EndpointSlice:
    return endpoint_slice_from_k8s(endpoint_slice(NS, name, service, eps,
                                                  HTTP if ports is None else ports))


def svc(name: str = "web", selector: dict[str, str] | None = None,
        ports: tuple[ServicePort, ...] = (ServicePort(80, "http", "http"),)) -> Service:
    return Service(name, NS, vips=(VIP,), ports=ports, selector=selector)


def backends(state: MeshState, port: int = 80) -> tuple[Backend, ...]:
    return compile_services(state)[Frontend(VIP, port)]


# -- conversion ---------------------------------------------------------------------------------

def test_slice_conditions_follow_the_api_defaults() -> None:
    s = sl("web-a", "web", [ep("10.1.0.1"), ep("10.1.0.2", ready=False),
                            ep("10.1.0.3", ready=False, serving=True, terminating=True)])
    assert s.service == "web" and s.ref == "shop/web-a" and s.address_type == "IPv4"
    a, b, c = s.endpoints
    assert (a.ready, a.serving, a.terminating) == (True, True, False)  # unset: ready
    assert (b.ready, b.serving, b.terminating) == (False, False, False)
    assert (c.ready, c.serving, c.terminating) == (False, True, True)
    assert a.node == "node-a" and a.ips == (Ip("10.1.0.1"),)
    assert object_from_k8s(endpoint_slice(NS, "web-a", "web", [], HTTP)) == EndpointSlice(
        "web-a", NS, "web", "IPv4", s.ports, ())


@pytest.mark.parametrize(("mutate", "where"), [
    (lambda d: d["metadata"]["labels"].pop("kubernetes.io/service-name"),
     "metadata.labels.kubernetes.io/service-name"),
    (lambda d: d.update(addressType="IPv5"), "addressType"),
    (lambda d: d["endpoints"][0].update(addresses=["10.1.0.300"]), "endpoints[0].addresses[0]"),
    (lambda d: d["endpoints"][0]["conditions"].update(ready="yes"),
     "endpoints[0].conditions.ready"),
    (lambda d: d["ports"][0].update(port=70000), "ports[0].port"),
])
def test_a_bad_slice_names_the_field(mutate: Any, where: str) -> None:
    doc = endpoint_slice(NS, "web-a", "web", [ep("10.1.0.1")], [dict(p) for p in HTTP])
    mutate(doc)
    with pytest.raises(FieldError) as err:
        endpoint_slice_from_k8s(doc)
    assert str(err.value).startswith(where + ":")


def test_the_projection_keeps_what_the_converter_reads_and_nothing_else() -> None:
    doc = endpoint_slice(NS, "web-a", "web", [ep("10.1.0.1", ready=False)], HTTP)
    doc["metadata"].update(uid="u1", resourceVersion="7", managedFields=[{"x": 1}],
                           annotations={"a": "b"})
    kept = project_endpoint_slice(doc)
    assert kept["metadata"] == {"name": "web-a", "namespace": NS, "uid": "u1",
                                "resourceVersion": "7",
                                "labels": {"kubernetes.io/service-name": "web"}}
    assert kept["endpoints"] == [{"addresses": ["10.1.0.1"], "conditions": {"ready": False},
                                  "nodeName": "node-a"}]
    assert endpoint_slice_from_k8s(kept) == endpoint_slice_from_k8s(doc)


def pod(conditions: list[dict[str, str]] | None, containers: list[Any]) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running", "podIP": "10.1.0.1"}
    if conditions is not None:
        status["conditions"] = conditions
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": "web-0", "namespace": NS, "uid": "u", "resourceVersion": "1"},
            "spec": {"nodeName": "node-a", "containers": containers}, "status": status}


CONTAINERS = [
    {"name": "app", "image": "x", "env": [{"name": "A", "value": "1"}],
     "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9999},
               {"name": "dns", "containerPort": 53, "protocol": "UDP"}]},
    {"name": "side", "image": "y", "ports": [{"name": "admin", "containerPort": 9000},
                                             {"name": "http", "containerPort": 1}]},
    {"name": "plain", "image": "z"},
]


def test_pods_bring_their_ready_condition_and_named_ports_through_the_projection() -> None:
    ready = [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]
    for raw in (pod(ready, CONTAINERS), project_pod(pod(ready, CONTAINERS))):
        w = workload_from_pod(raw)
        assert w is not None and w.ready
        # TCP ports with a name; the first container's "http" wins, as in Kubernetes.
        assert w.ports == (("admin", 9000), ("http", 8080))
    assert project_pod(pod(ready, CONTAINERS))["status"]["conditions"] == [ready[1]]
    unready = pod([{"type": "Ready", "status": "False"}], CONTAINERS)
    for raw in (unready, project_pod(unready)):
        w = workload_from_pod(raw)
        assert w is not None and not w.ready
    bare = workload_from_pod(pod(None, []))
    assert bare is not None and bare.ready and bare.ports == ()
    with pytest.raises(FieldError, match=r"^spec\.containers\[0\]\.ports\[0\]\.containerPort"):
        workload_from_pod(project_pod(pod(None, [{"ports": [{"name": "x",
                                                            "containerPort": 0}]}])))


# -- which endpoints ----------------------------------------------------------------------------

W0 = Workload("web-0", NS, ips=(Ip("10.1.0.1"),), labels={"app": "web"}, ports=(("http", 8080),))
W1 = Workload("web-1", NS, ips=(Ip("10.1.0.2"),), labels={"app": "web"}, ports=(("http", 8080),))


def test_a_service_with_slices_takes_its_endpoints_from_them_only() -> None:
    # The selector would pick both workloads; the slices say web-1 is not ready, and name an
    # address outside the mesh (no workload) the selector could never find.
    s = sl("web-a", "web", [ep("10.1.0.1"), ep("10.1.0.2", ready=False), ep("192.0.2.7")])
    state = MeshState.build([W0, W1, svc(selector={"app": "web"}), s])
    assert backends(state) == (Backend(Ip("10.1.0.1"), 8080), Backend(Ip("192.0.2.7"), 8080))
    got = endpoints(state, state.services[0], state.services[0].ports[0])
    assert [e.workload for e in got] == [W0, None]
    # Without slices the selector rule applies (the file source's case).
    assert backends(MeshState.build([W0, W1, svc(selector={"app": "web"})])) == (
        Backend(Ip("10.1.0.1"), 8080), Backend(Ip("10.1.0.2"), 8080))


def test_a_service_without_a_selector_gets_its_slices_endpoints() -> None:
    s1 = sl("ext-a", "ext", [ep("192.0.2.7")])
    s2 = sl("ext-b", "ext", [ep("192.0.2.8"), ep("192.0.2.7")])  # an address in two slices
    other = sl("web-a", "web", [ep("10.1.0.1")])
    state = MeshState.build([svc("ext"), s1, s2, other])
    assert backends(state) == (Backend(Ip("192.0.2.7"), 8080), Backend(Ip("192.0.2.8"), 8080))
    # No slice and no selector: left out, its VIP passes through.
    assert Frontend(VIP, 80) not in compile_services(MeshState.build([svc("ext"), other]))


def test_terminating_serving_endpoints_stand_in_only_when_none_is_ready() -> None:
    draining = ep("10.1.0.2", ready=False, serving=True, terminating=True)
    gone = ep("10.1.0.3", ready=False, serving=False, terminating=True)
    assert backends(MeshState.build([svc(), sl("a", "web", [draining, gone])])) == (
        Backend(Ip("10.1.0.2"), 8080),)
    assert backends(MeshState.build([svc(), sl("a", "web", [draining, ep("10.1.0.1")])])) == (
        Backend(Ip("10.1.0.1"), 8080),)
    # Nothing ready or serving: the frontend stays, with no backend (ECONNREFUSED).
    assert backends(MeshState.build([svc(), sl("a", "web", [gone])])) == ()


def test_multi_port_services_match_slice_ports_by_name_and_protocol() -> None:
    ports = (ServicePort(80, "http", "http"), ServicePort(9000, 9000, "admin"),
             ServicePort(53, 53, "dns", "UDP"))
    slice_ports = [{"name": "http", "port": 8080}, {"name": "admin", "port": 9100},
                   {"name": "metrics", "port": 9090}, {"name": "dns", "port": 5353,
                                                      "protocol": "UDP"}]
    state = MeshState.build([svc(ports=ports), sl("a", "web", [ep("10.1.0.1")], slice_ports)])
    table = compile_services(state)
    assert table == {Frontend(VIP, 80): (Backend(Ip("10.1.0.1"), 8080),),
                     Frontend(VIP, 9000): (Backend(Ip("10.1.0.1"), 9100),)}


def test_one_workload_behind_two_services_with_slices() -> None:
    other_vip = Ip("10.96.0.31")
    a = svc("web")
    b = Service("web-canary", NS, vips=(other_vip,), ports=(ServicePort(81, 8080, "http"),))
    state = MeshState.build([W0, a, b, sl("a", "web", [ep("10.1.0.1")]),
                             sl("b", "web-canary", [ep("10.1.0.1")])])
    table = compile_services(state)
    assert table[Frontend(VIP, 80)] == table[Frontend(other_vip, 81)] == (
        Backend(Ip("10.1.0.1"), 8080),)


# -- the source, against the test API server ----------------------------------------------------

def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20.0):
            await coro

    asyncio.run(bounded())


def test_the_kubernetes_source_follows_slices_and_their_readiness() -> None:
    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            await k.namespace(NS)
            await k.create("services", {"metadata": {"namespace": NS, "name": "ext"}, "spec": {
                "clusterIP": str(VIP), "ports": [{"name": "http", "port": 80,
                                                  "targetPort": 8080}]}})
            await k.endpoint_slice(NS, "ext-1", "ext", [ep("192.0.2.7"), ep("192.0.2.8")], HTTP)
            # The server answers a client reading one Service's slices, as kube-proxy's
            # informers do, by the service-name label.
            listed = await k.request("GET", "/apis/discovery.k8s.io/v1/namespaces/shop/"
                                     "endpointslices?labelSelector=kubernetes.io/service-name%3Dext")
            assert [i["metadata"]["name"] for i in listed["items"]] == ["ext-1"]
            none = await k.request("GET", "/apis/discovery.k8s.io/v1/endpointslices"
                                   "?labelSelector=kubernetes.io/service-name%3Dother")
            assert none["items"] == []
            store = StateStore()
            sink = KubernetesStateSink(store)
            source = KubernetesSource(explicit(server.url, token=server.token), "node-a", sink,
                                      watch_timeout=60.0, backoff_initial=0.02)
            task = asyncio.create_task(source.run())
            try:
                await sink.wait_synced()
                assert backends(store.current) == (Backend(Ip("192.0.2.7"), 8080),
                                                   Backend(Ip("192.0.2.8"), 8080))
                first_rv = source.resource_version("endpointslices")
                await k.patch("endpointslices", NS, "ext-1", {"endpoints": [
                    ep("192.0.2.7", ready=False, serving=True, terminating=True),
                    ep("192.0.2.8")]})
                while backends(store.current) != (Backend(Ip("192.0.2.8"), 8080),):
                    await asyncio.sleep(0.02)
                assert source.resource_version("endpointslices") != first_rv
                await k.delete("endpointslices", NS, "ext-1")
                while Frontend(VIP, 80) in compile_services(store.current):
                    await asyncio.sleep(0.02)
                assert [(t, key) for t, key, _uid, _rv in server.changes("endpointslices")] == [
                    ("ADDED", "shop/ext-1"), ("MODIFIED", "shop/ext-1"),
                    ("DELETED", "shop/ext-1")]
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    run(body())


def test_policy_check_reports_slice_endpoints_in_and_outside_the_mesh() -> None:
    s = sl("web-a", "web", [ep("10.1.0.1"), ep("10.1.0.2", ready=False), ep("192.0.2.7")])
    state = MeshState.build([W0, W1, svc(selector={"app": "web"}), s])
    r = service_report(state, state.services[0], 80, src_ref=None, src_ip=Ip("10.9.0.1"),
                       identity=None)
    rows = r["endpoints"]
    assert isinstance(rows, list)
    assert [(e["workload"], e["ip"], e["target_port"], e["in_mesh"]) for e in rows] == [
        ("shop/web-0", "10.1.0.1", 8080, True), (None, "192.0.2.7", 8080, False)]
    assert r["notes"] == ["not ready, so not selected: shop/web-1",
                          "endpoints from EndpointSlices: web-a"]
