"""Converting Kubernetes API objects into mesh state."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from agent.model.fields import FieldError
from agent.model.mesh import Labels, Namespace, Workload
from agent.policy.authz import AuthorizationPolicy
from agent.policy.peerauth import PeerAuthentication
from agent.sources.k8sconvert import (
    namespace_from_k8s,
    object_from_k8s,
    service_from_k8s,
    workload_from_pod,
)


def pod(**extra: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "uid": "1234",
                     "labels": {"app": "web"}},
        "spec": {"nodeName": "node0", "serviceAccountName": "web", "containers": []},
        "status": {"phase": "Running", "podIP": "10.251.0.10",
                   "podIPs": [{"ip": "10.251.0.10"}, {"ip": "fd00::10"}]},
    }
    for k, v in extra.items():
        p[k] = {**p[k], **v}
    return p


def wl(p: dict[str, Any]) -> Workload:
    w = workload_from_pod(p)
    assert w is not None
    return w


def test_pod() -> None:
    w = workload_from_pod(pod())
    assert w is not None
    assert (w.name, w.namespace, w.service_account, w.node) == ("web-1", "shop", "web", "node0")
    assert w.ips == (ipaddress.ip_address("10.251.0.10"), ipaddress.ip_address("fd00::10"))
    assert w.labels == {"app": "web"} and w.uid == "Kubernetes//Pod/shop/web-1"
    assert w.in_mesh is None  # decided by the namespace label
    assert w.identity.uri == "spiffe://cluster.local/ns/shop/sa/web"
    assert workload_from_pod(pod(), trust_domain="example.org") is not None


def test_pod_variants() -> None:
    only_pod_ip = pod()
    del only_pod_ip["status"]["podIPs"]
    w = workload_from_pod(only_pod_ip)
    assert w is not None and w.ips == (ipaddress.ip_address("10.251.0.10"),)
    pending = pod(status={"phase": "Pending", "podIP": None, "podIPs": []})
    w = workload_from_pod(pending)
    assert w is not None and w.ips == ()
    default_sa = pod(spec={"serviceAccountName": None})
    assert wl(default_sa).service_account == "default"
    for phase in ("Succeeded", "Failed"):
        assert workload_from_pod(pod(status={"phase": phase})) is None
    ambient = pod(metadata={"labels": {"istio.io/dataplane-mode": "ambient"}})
    assert wl(ambient).in_mesh is True
    opted_out = pod(metadata={"labels": {"istio.io/dataplane-mode": "none"}})
    assert wl(opted_out).in_mesh is False
    host = pod(spec={"hostNetwork": True},
               metadata={"labels": {"istio.io/dataplane-mode": "ambient"}})
    assert wl(host).in_mesh is False


def test_bad_pod_names_the_field() -> None:
    with pytest.raises(FieldError, match=r"status.podIPs\[1\].ip: 'x' is not an IPv4"):
        workload_from_pod(pod(status={"podIPs": [{"ip": "10.0.0.1"}, {"ip": "x"}]}))


def test_namespace_and_service() -> None:
    ns = namespace_from_k8s({"kind": "Namespace", "metadata": {
        "name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}, "spec": {}})
    assert ns == Namespace("shop", Labels({"istio.io/dataplane-mode": "ambient"})) and ns.ambient
    svc = service_from_k8s({"kind": "Service", "metadata": {"name": "db", "namespace": "shop"},
                            "spec": {"clusterIP": "10.96.0.30", "clusterIPs": ["10.96.0.30"],
                                     "selector": {"app": "db"},
                                     "ports": [{"port": 5432, "name": "pg"},
                                               {"port": 80, "targetPort": "http"},
                                               {"port": 81, "targetPort": 8081}]}})
    assert svc.vips == (ipaddress.ip_address("10.96.0.30"),)
    assert [(p.port, p.target_port) for p in svc.ports] == [(5432, 5432), (80, "http"),
                                                            (81, 8081)]
    assert svc.selector == {"app": "db"}
    headless = service_from_k8s({"metadata": {"name": "h", "namespace": "shop"},
                                 "spec": {"clusterIP": "None"}})
    assert headless.vips == () and headless.selector is None


def test_object_dispatch() -> None:
    assert object_from_k8s(pod()) is not None
    policy = object_from_k8s({"apiVersion": "security.istio.io/v1beta1",
                              "kind": "AuthorizationPolicy",
                              "metadata": {"name": "p", "namespace": "shop",
                                           "resourceVersion": "1"},
                              "spec": {"action": "DENY", "rules": [{}]}, "status": {}})
    assert isinstance(policy, AuthorizationPolicy)
    pa = object_from_k8s({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                          "metadata": {"name": "d", "namespace": "shop"},
                          "spec": {"mtls": {"mode": "STRICT"}}})
    assert isinstance(pa, PeerAuthentication)
    with pytest.raises(FieldError, match="kind: 'Deployment'"):
        object_from_k8s({"kind": "Deployment", "metadata": {"name": "x"}})
