"""Projections: the few fields of an API object the mesh reads, kept instead of the whole object.

Every agent watches every pod of the cluster (a remote pod's IP, identity and labels are what
the tunnel needs to dial it over HBONE), so what each agent keeps per pod must stay small: a
full Pod is 5-20 KB of JSON (containers, volumes, managedFields), the projection a few hundred
bytes. Strings that repeat across pods (namespaces, node and service-account names, label keys
and values, phases) are interned, so thousands of pods share one copy of each.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

Obj = dict[str, Any]
Projection = Callable[[Obj], Obj]

# What agent/sources/k8sconvert.py (workload_from_pod) reads, and what the cache needs (name,
# uid, rv).
_POD_META = ("name", "namespace", "uid", "resourceVersion")
_POD_SPEC = ("nodeName", "serviceAccountName", "hostNetwork")
_SHARED = frozenset({"namespace", "nodeName", "serviceAccountName", "phase"})


def _intern(value: Any) -> Any:
    return sys.intern(value) if isinstance(value, str) else value


def project_pod(obj: Obj) -> Obj:
    """A Pod with only what the mesh reads. Fields of the wrong type are kept as they are, so
    the converter still reports them with their path."""
    out: Obj = {"kind": obj.get("kind"), "apiVersion": obj.get("apiVersion")}
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        m = {k: _intern(meta[k]) if k in _SHARED else meta[k] for k in _POD_META if k in meta}
        labels = meta.get("labels")
        if isinstance(labels, dict):
            m["labels"] = {_intern(k): _intern(v) for k, v in labels.items()}
        elif labels is not None:
            m["labels"] = labels
        out["metadata"] = m
    else:
        out["metadata"] = meta
    for part, keys in (("spec", _POD_SPEC), ("status", ("phase", "podIP", "podIPs"))):
        section = obj.get(part)
        if isinstance(section, dict):
            out[part] = {k: _intern(section[k]) if k in _SHARED else section[k]
                         for k in keys if k in section}
        elif section is not None:
            out[part] = section
    status = out.get("status")
    if isinstance(status, dict) and status.get("podIPs") == [{"ip": status.get("podIP")}]:
        del status["podIPs"]  # single-stack: podIP says the same, without a dict per pod
    raw_status, raw_spec = obj.get("status"), obj.get("spec")
    if isinstance(raw_status, dict) and isinstance(status, dict):
        conds = raw_status.get("conditions")  # only Ready: the rest change without meaning here
        status["conditions"] = ([c for c in conds if isinstance(c, dict)
                                 and c.get("type") == "Ready"]
                                if isinstance(conds, list) else conds)
        if status["conditions"] is None or status["conditions"] == []:
            del status["conditions"]
    if isinstance(raw_spec, dict) and isinstance(out.get("spec"), dict):
        ports = _named_container_ports(raw_spec.get("containers"))
        if ports is not None:
            out["spec"]["containers"] = ports
    return out


def _named_container_ports(containers: Any) -> Any:
    """spec.containers cut to their named ports (what a named targetPort resolves through);
    None when there are none. A malformed value is kept for the converter to report."""
    if not isinstance(containers, list):
        return containers
    kept = []
    for c in containers:
        if not isinstance(c, dict) or not isinstance(c.get("ports"), list):
            if not isinstance(c, dict) or c.get("ports") is not None:
                kept.append(c)
            continue
        ports = [{k: _intern(p[k]) for k in ("name", "containerPort", "protocol") if k in p}
                 for p in c["ports"] if isinstance(p, dict) and p.get("name")]
        ports += [p for p in c["ports"] if not isinstance(p, dict)]
        if ports:
            kept.append({"ports": ports})
    return kept or None


def project_endpoint_slice(obj: Obj) -> Obj:
    """An EndpointSlice with its ports, each endpoint's addresses, conditions and nodeName, and
    only the service-name label (hints, targetRefs, zones and managedFields are not read)."""
    out: Obj = {k: obj.get(k) for k in ("kind", "apiVersion", "addressType", "ports")}
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        m = {k: _intern(meta[k]) if k == "namespace" else meta[k]
             for k in _POD_META if k in meta}
        labels = meta.get("labels")
        if isinstance(labels, dict):
            m["labels"] = {k: v for k, v in labels.items() if k == "kubernetes.io/service-name"}
        elif labels is not None:
            m["labels"] = labels
        out["metadata"] = m
    else:
        out["metadata"] = meta
    eps = obj.get("endpoints")
    out["endpoints"] = ([{k: e[k] for k in ("addresses", "conditions", "nodeName") if k in e}
                         if isinstance(e, dict) else e for e in eps]
                        if isinstance(eps, list) else eps)
    return {k: v for k, v in out.items() if v is not None}
