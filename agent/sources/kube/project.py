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
    return out
