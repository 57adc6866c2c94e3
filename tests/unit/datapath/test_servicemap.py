"""Services compiled for the kernel's socket load balancer: endpoints, readiness, target ports."""

from __future__ import annotations

from ipaddress import IPv4Address as Ip
from pathlib import Path
from typing import Any

import pytest

from agent.datapath.layouts import Backend, Frontend
from agent.datapath.servicemap import compile_service_set, compile_services
from agent.model.fields import FieldError
from agent.model.mesh import Service, ServicePort, Workload
from agent.sources.file import MeshConfigError, parse_files
from agent.sources.k8sconvert import service_from_k8s
from agent.state.snapshot import MeshState

MESH = """
kind: Workload
metadata: {name: web-0, namespace: shop, labels: {app: web, tier: front}}
spec: {ips: [10.251.0.10], ports: {http: 8080, admin: 9000}}
---
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web, tier: front}}
spec: {ips: [10.251.1.10], ports: {http: 8081}}
---
kind: Workload
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {ips: [10.251.1.11], ready: false, ports: {http: 8080}}
---
kind: Workload
metadata: {name: web-x, namespace: other, labels: {app: web}}
spec: {ips: [10.251.1.12]}
---
kind: Service
metadata: {name: web, namespace: shop}
spec:
  vips: [10.96.0.20]
  ports: [{port: 80, targetPort: http}, {port: 9000, targetPort: admin}, {port: 7, targetPort: 7}]
  selector: {app: web}
---
kind: Service
metadata: {name: front, namespace: shop}
spec: {vips: [10.96.0.21], ports: [{port: 443, targetPort: 8443}], selector: {tier: front}}
---
kind: Service
metadata: {name: empty, namespace: shop}
spec: {vips: [10.96.0.22], ports: [{port: 80}], selector: {app: nothing}}
---
kind: Service
metadata: {name: headless, namespace: shop}
spec: {ports: [{port: 80}], selector: {app: web}}
---
kind: Service
metadata: {name: external, namespace: shop}
spec: {vips: [10.96.0.23], ports: [{port: 80}]}
"""


def test_compiled_table() -> None:
    state = parse_files([(Path("mesh.yaml"), MESH.encode())])
    table = compile_services(state)
    vip = Ip("10.96.0.20")
    assert table == {
        # named targetPort resolved per endpoint; the unready web-2 and the other namespace's
        # web-x are not endpoints
        Frontend(vip, 80): (Backend(Ip("10.251.0.10"), 8080), Backend(Ip("10.251.1.10"), 8081)),
        # an endpoint without the named port is not an endpoint of that port
        Frontend(vip, 9000): (Backend(Ip("10.251.0.10"), 9000),),
        Frontend(vip, 7): (Backend(Ip("10.251.0.10"), 7), Backend(Ip("10.251.1.10"), 7)),
        # the same workloads behind a second Service
        Frontend(Ip("10.96.0.21"), 443): (
            Backend(Ip("10.251.0.10"), 8443), Backend(Ip("10.251.1.10"), 8443)),
        # no ready endpoint: kept, empty (refused in the kernel)
        Frontend(Ip("10.96.0.22"), 80): (),
        # headless (no VIP) and selector-less Services: nothing to translate
    }


def test_readiness_change_removes_the_endpoint() -> None:
    w = Workload("a", "ns", ips=(Ip("10.0.0.1"),), labels={"app": "a"})
    svc = Service("s", "ns", (Ip("10.96.0.1"),), (ServicePort(80, 8080),), {"app": "a"})
    state = MeshState.build([w, svc])
    assert compile_services(state) == {Frontend(Ip("10.96.0.1"), 80): (Backend(w.ips[0], 8080),)}
    unready = Workload("a", "ns", ips=(Ip("10.0.0.1"),), labels={"app": "a"}, ready=False)
    assert compile_services(MeshState.build([unready, svc])) == {Frontend(Ip("10.96.0.1"), 80): ()}


@pytest.mark.parametrize(("spec", "error"), [
    ("{ips: [10.0.0.1], ports: {http: 99999}}", "spec.ports.http: port 99999 is out of range"),
    ("{ips: [10.0.0.1], ready: maybe}", "spec.ready: want true or false"),
])
def test_workload_port_and_readiness_errors(spec: str, error: str) -> None:
    text = f"kind: Workload\nmetadata: {{name: w, namespace: n}}\nspec: {spec}\n"
    with pytest.raises(MeshConfigError, match=error):
        parse_files([(Path("m.yaml"), text.encode())])


def test_bad_named_target_port_is_an_error() -> None:
    text = ("kind: Service\nmetadata: {name: s, namespace: n}\n"
            "spec: {vips: [10.96.0.1], ports: [{port: 80, targetPort: Not_A_Name}]}\n")
    with pytest.raises(MeshConfigError,
        match=r"m.yaml:3: spec.ports\[0\].targetPort: 'Not_A_Name'"):
        parse_files([(Path("m.yaml"), text.encode())])


def test_a_connection_cap_applies_to_each_port_of_the_service() -> None:
    text = ("kind: Workload\nmetadata: {name: w, namespace: n, labels: {app: a}}\n"
            "spec: {ips: [10.0.0.1]}\n---\n"
            "kind: Service\nmetadata: {name: s, namespace: n}\n"
            "spec: {vips: [10.96.0.1], ports: [{port: 80}, {port: 81}], selector: {app: a},\n"
            "       maxConnections: 100}\n")
    compiled = compile_service_set(parse_files([(Path("m.yaml"), text.encode())]))
    assert compiled.caps == {Frontend(Ip("10.96.0.1"), 80): 100,
                             Frontend(Ip("10.96.0.1"), 81): 100}
    assert {s.ref for s in compiled.owner.values()} == {"n/s"}


@pytest.mark.parametrize("cap", ["-1", "70000", "true", "'5'"])
def test_a_bad_connection_cap_names_the_field(cap: str) -> None:
    text = ("kind: Service\nmetadata: {name: s, namespace: n}\n"
            f"spec: {{vips: [10.96.0.1], ports: [{{port: 80}}], maxConnections: {cap}}}\n")
    with pytest.raises(MeshConfigError,
        match=r"m.yaml:3: spec.maxConnections: .* want 0 \(no cap\)"):
        parse_files([(Path("m.yaml"), text.encode())])


def test_kubernetes_services_take_the_cap_from_an_annotation() -> None:
    doc: dict[str, Any] = {"kind": "Service", "apiVersion": "v1",
           "metadata": {"name": "s", "namespace": "n",
                                        "annotations": {"nodemesh.io/max-connections": "250"}},
                           "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}
    assert service_from_k8s(doc).max_connections == 250
    doc["metadata"]["annotations"]["nodemesh.io/max-connections"] = "lots"
    with pytest.raises(FieldError, match=r"^metadata\.annotations\.nodemesh\.io/max-connections"):
        service_from_k8s(doc)
