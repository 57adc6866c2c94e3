"""Object names and namespaces: the Kubernetes API server's rules, per kind, with clear errors."""

from __future__ import annotations

from typing import Any

import pytest

from agent.model.fields import FieldError, check_name
from agent.sources import k8sconvert as k8s
from agent.sources.documents import parse_document

LABEL_OK = ["a", "0", "my-name", "123-abc", "a" * 63]
LABEL_BAD = ["", "-a", "a-", "A", "a_b", "a.b", "a/b", "..", "a" * 64, "é"]
SUBDOMAIN_OK = [*LABEL_OK, "a.b", "example.com", "0.a-b.c", ".".join(["a" * 63] * 3) + ".abcd"]
SUBDOMAIN_BAD = ["", "a..b", ".a", "a.", "a.-b", "a-.b", "Bad_Name", "../../etc/x",
                 "a" * 254, "a b"]
DNS1035_OK = ["a", "my-name", "a0", "a" * 63]
DNS1035_BAD = ["0", "1abc", "a.b", "-a", "a-", "A", "a" * 64]


@pytest.mark.parametrize("value", LABEL_OK)
def test_label_accepts(value: str) -> None:
    assert check_name(value, ("metadata", "namespace"), "label") == value


@pytest.mark.parametrize("value", LABEL_BAD)
def test_label_rejects(value: str) -> None:
    with pytest.raises(FieldError) as info:
        check_name(value, ("metadata", "namespace"), "label")
    assert info.value.path == ("metadata", "namespace")
    assert "is not a valid Kubernetes name" in info.value.message
    assert "DNS-1123 label" in info.value.message


@pytest.mark.parametrize("value", SUBDOMAIN_OK)
def test_subdomain_accepts(value: str) -> None:
    assert len(value) <= 253
    assert check_name(value, ("metadata", "name"), "subdomain") == value


@pytest.mark.parametrize("value", SUBDOMAIN_BAD)
def test_subdomain_rejects(value: str) -> None:
    with pytest.raises(FieldError, match="DNS-1123 subdomain"):
        check_name(value, ("metadata", "name"), "subdomain")


@pytest.mark.parametrize("value", DNS1035_OK)
def test_dns1035_accepts(value: str) -> None:
    assert check_name(value, ("metadata", "name"), "dns1035") == value


@pytest.mark.parametrize("value", DNS1035_BAD)
def test_dns1035_rejects(value: str) -> None:
    with pytest.raises(FieldError, match="DNS-1035 label"):
        check_name(value, ("metadata", "name"), "dns1035")


def test_too_long_names_say_the_limit() -> None:
    with pytest.raises(FieldError, match=r"\(64 characters\) .* no more than 63 characters"):
        check_name("a" * 64, ("metadata", "name"), "label")


def _istio(kind: str, name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": {}}


def _doc(kind: str, name: str, namespace: str) -> dict[str, Any]:
    if kind in ("AuthorizationPolicy", "PeerAuthentication"):
        return _istio(kind, name, namespace)
    if kind == "Namespace":
        return {"kind": "Namespace", "metadata": {"name": name}}
    spec: dict[str, Any] = {"ips": ["10.0.0.1"]} if kind == "Workload" else {}
    return {"kind": kind, "metadata": {"name": name, "namespace": namespace}, "spec": spec}


# What each kind's name must be: pods (workloads) and custom resources are subdomains, Services
# DNS-1035 labels, Namespaces labels; every namespace is a label.
NAME_RULE = {"Workload": "subdomain", "AuthorizationPolicy": "subdomain",
             "PeerAuthentication": "subdomain", "Service": "dns1035", "Namespace": "label"}


@pytest.mark.parametrize("kind", list(NAME_RULE))
def test_every_kind_checks_its_name(kind: str) -> None:
    rule = NAME_RULE[kind]
    ok = {"subdomain": "a.b-c", "dns1035": "svc-1", "label": "ns-1"}[rule]
    assert parse_document(_doc(kind, ok, "ns")).name == ok
    for bad in ("../../etc/Bad_Name!", "Bad", "a_b", ""):
        with pytest.raises(FieldError) as info:
            parse_document(_doc(kind, bad, "ns"))
        assert info.value.path == ("metadata", "name"), info.value
    if rule != "subdomain":  # dots: fine in a subdomain, not in a label
        with pytest.raises(FieldError, match="is not a valid Kubernetes name"):
            parse_document(_doc(kind, "a.b", "ns"))
    if rule == "dns1035":
        with pytest.raises(FieldError, match="DNS-1035"):
            parse_document(_doc(kind, "1abc", "ns"))


@pytest.mark.parametrize("kind", [k for k in NAME_RULE if k != "Namespace"])
def test_every_namespaced_kind_checks_its_namespace(kind: str) -> None:
    for bad in ("../../etc/Bad_Name!", "a.b", "Shop", "a" * 64):
        with pytest.raises(FieldError) as info:
            parse_document(_doc(kind, "a", bad))
        assert info.value.path == ("metadata", "namespace"), info.value
        assert "DNS-1123 label" in info.value.message


def test_workload_service_account_is_a_subdomain() -> None:
    doc = _doc("Workload", "w", "ns")
    doc["spec"]["serviceAccount"] = "Bad_SA"
    with pytest.raises(FieldError) as info:
        parse_document(doc)
    assert info.value.path == ("spec", "serviceAccount")


def test_kubernetes_objects_get_the_same_checks() -> None:
    pod = {"kind": "Pod", "metadata": {"name": "p.1", "namespace": "ns"},
           "spec": {"serviceAccountName": "sa"}, "status": {"podIP": "10.0.0.1"}}
    assert k8s.object_from_k8s(pod) is not None
    for path, bad in ((("metadata", "name"), "P_1"), (("metadata", "namespace"), "a.b"),
                      (("spec", "serviceAccountName"), "S A")):
        broken = {**pod, path[0]: {**pod[path[0]], path[1]: bad}}  # type: ignore[dict-item]
        with pytest.raises(FieldError) as info:
            k8s.object_from_k8s(broken)
        assert info.value.path == path
    with pytest.raises(FieldError, match="DNS-1035"):
        k8s.object_from_k8s({"kind": "Service", "metadata": {"name": "1svc", "namespace": "a"}})
    with pytest.raises(FieldError, match="DNS-1123 label"):
        k8s.object_from_k8s({"kind": "Namespace", "metadata": {"name": "a.b"}})
    with pytest.raises(FieldError, match="DNS-1123 subdomain"):
        k8s.object_from_k8s(_istio("AuthorizationPolicy", "../x", "ns"))
