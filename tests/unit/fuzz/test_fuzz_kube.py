"""Fuzz: Kubernetes objects (JSON from the API server) into mesh state.

`object_from_k8s` returns a mesh object (or None for a finished pod) or raises ValueError whose
message names the field; the sink the Kubernetes source feeds never raises on an object the
source's cache admitted (metadata with name, uid, resourceVersion): it stores it or records a
Rejection, and keeps going with every other object.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from agent.model.mesh import Namespace, Service, Workload
from agent.policy.authz import AuthorizationPolicy
from agent.policy.peerauth import PeerAuthentication
from agent.sources.k8sconvert import object_from_k8s
from agent.sources.k8sstate import KIND_OF_RESOURCE, KubernetesStateSink
from agent.state.store import StateStore

MESH_TYPES = (Workload, Namespace, Service, AuthorizationPolicy, PeerAuthentication)

POD: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "web-1", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                 "labels": {"app": "web", "istio.io/dataplane-mode": "ambient"}},
    "spec": {"nodeName": "node0", "serviceAccountName": "web", "hostNetwork": False,
             "containers": [{"name": "c", "image": "x"}]},
    "status": {"phase": "Running", "podIP": "10.251.0.10",
               "podIPs": [{"ip": "10.251.0.10"}, {"ip": "fd00::10"}]},
}
SERVICE: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "web", "namespace": "shop", "uid": "u2", "resourceVersion": "8"},
    "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
             "selector": {"app": "web"},
             "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                       {"name": "grpc", "port": 9090, "targetPort": "grpc"}]},
}
NAMESPACE: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Namespace",
    "metadata": {"name": "shop", "uid": "u3", "resourceVersion": "9",
                 "labels": {"istio.io/dataplane-mode": "ambient"}},
}
AUTHZ: dict[str, Any] = {
    "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "db-allow", "namespace": "shop", "uid": "u4", "resourceVersion": "10"},
    "spec": {
        "selector": {"matchLabels": {"app": "db"}},
        "action": "ALLOW",
        "rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/backend"],
                                 "namespaces": ["shop"], "ipBlocks": ["10.0.0.0/8"],
                                 "notIpBlocks": ["10.9.0.0/16"]}}],
            "to": [{"operation": {"ports": ["5432"], "notPorts": ["1"]}}],
            "when": [{"key": "source.ip", "values": ["10.1.2.3"]}],
        }],
    },
}
PEERAUTH: dict[str, Any] = {
    "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
    "metadata": {"name": "strict", "namespace": "shop", "uid": "u5", "resourceVersion": "11"},
    "spec": {"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "STRICT"},
             "portLevelMtls": {"5432": {"mode": "PERMISSIVE"}}},
}
BASES = {"pods": POD, "services": SERVICE, "namespaces": NAMESPACE,
         "authorizationpolicies": AUTHZ, "peerauthentications": PEERAUTH}

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
           | st.sampled_from(["", "None", "ALLOW", "DENY", "AUDIT", "STRICT", "DISABLE", "UNSET",
                              "ambient", "none", "Succeeded", "0", "65536", "-1", "http",
                              "10.0.0.1", "10.0.0.0/33", "::1", "fd00::/129", "*", "a/b/c",
                              "cluster.local/ns/*/sa/x", "x" * 5000, "\x00", "é"]))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    """The base object with one to three random edits: a value replaced, a key or item
    dropped, a key added."""
    doc: Any = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        value = draw(json_values)
        if not path:
            doc = value
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        op = draw(st.sampled_from(["replace", "drop", "add"]))
        if op == "replace":
            parent[path[-1]] = value
        elif op == "drop":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = value
        else:
            parent.append(value)
    return doc


def _convert(doc: Any) -> None:
    try:
        out = object_from_k8s(doc)
    except ValueError as e:
        assert str(e).strip(), "a rejection says why"
        return
    assert out is None or isinstance(out, MESH_TYPES)


@given(json_values)
def test_arbitrary_json_converts_or_is_rejected(doc: Any) -> None:
    _convert(doc)


any_mutated = st.sampled_from(sorted(BASES)).flatmap(lambda r: mutated(BASES[r]))


@given(any_mutated)
@example({**SERVICE, "spec": {**SERVICE["spec"], "ports": [{"port": 80, "targetPort": True}]}})
def test_mutated_objects_convert_or_are_rejected(doc: Any) -> None:
    _convert(doc)


def _admitted(obj: Any, base: dict[str, Any]) -> dict[str, Any]:
    """What the source's cache lets through: a dict whose metadata has the identifying fields."""
    out = obj if isinstance(obj, dict) else {"spec": obj}
    meta = out.get("metadata")
    out["metadata"] = {**(meta if isinstance(meta, dict) else {}),
                       **{k: base["metadata"][k] for k in ("name", "uid", "resourceVersion")}}
    if "namespace" in base["metadata"]:
        out["metadata"]["namespace"] = base["metadata"]["namespace"]
    return out


@given(st.sampled_from(sorted(BASES)).flatmap(
    lambda r: st.tuples(st.just(r), mutated(BASES[r]))))
@example(("pods", {**POD, "kind": "Service"}))
@example(("services", {**SERVICE, "kind": "Namespace"}))
def test_sink_stores_or_rejects_never_raises(case: tuple[str, Any]) -> None:
    resource, obj = case
    obj = _admitted(obj, BASES[resource])
    store = StateStore()
    sink = KubernetesStateSink(store)
    sink.on_event(resource, "ADDED", obj)
    kind = KIND_OF_RESOURCE[resource]
    stored = store.current.objects[kind]
    rejected = sink.rejected
    assert len(stored) + len(rejected) <= 1
    for r in rejected.values():
        assert r.error.strip()
    for o in stored.values():
        assert isinstance(o, MESH_TYPES)
    sink.on_event(resource, "DELETED", obj)
    assert not store.current.objects[kind] and not sink.rejected
