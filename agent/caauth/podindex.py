"""Which ServiceAccounts have pods on which node now: the CA's node authorizer reads this.

A cached watch of every pod in the cluster (the project's own list/watch reflector in
agent/sources/kubernetes.py), indexed by (node, namespace, ServiceAccount) as istiod's node
authorizer indexes them: a node agent may obtain a certificate for an identity only while at
least one pod with that ServiceAccount runs on its node. Pods that finished (phase Succeeded or
Failed) run nowhere and are left out of the index.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from agent.identity.spiffe import Identity, IdentityError
from agent.sources.kube.config import ClusterConfig
from agent.sources.kubernetes import KubernetesSource

log = logging.getLogger(__name__)

Obj = dict[str, Any]
_FINISHED = frozenset({"Succeeded", "Failed"})


class PodCacheNotReadyError(Exception):
    """The first list of pods has not completed: the CA cannot authorize anyone yet."""


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    uid: str
    node: str
    service_account: str


def _pod_info(obj: Obj) -> PodInfo | None:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    phase = (obj.get("status") or {}).get("phase")
    node = spec.get("nodeName")
    ns, name, uid = meta.get("namespace"), meta.get("name"), meta.get("uid")
    if not (isinstance(ns, str) and isinstance(name, str) and isinstance(uid, str)):
        return None
    if not isinstance(node, str) or not node or phase in _FINISHED:
        return None  # not scheduled yet, or finished: it runs nowhere
    sa = spec.get("serviceAccountName") or "default"
    return PodInfo(ns, name, uid, node, sa) if isinstance(sa, str) else None


class PodIndex:
    """The CA's pod cache. Fed by a KubernetesSource (EventSink); read by the CA (a
    WorkloadLocator) and by the token authenticator (the caller's own pod)."""

    def __init__(self, trust_domain: str, registry: CollectorRegistry | None = None) -> None:
        self.trust_domain = trust_domain
        self.synced = False
        self._pods: dict[str, PodInfo] = {}  # namespace/name -> running pod
        self._by_node: dict[str, Counter[tuple[str, str]]] = {}
        self.pods_gauge = Gauge("nodemesh_ca_pod_cache_pods",
                                "Running pods in the CA's node-authorization cache",
                                registry=registry)

    # -- EventSink -------------------------------------------------------------------------

    def on_event(self, resource: str, type: str, obj: Obj) -> None:  # EventSink
        if resource != "pods":
            return
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        self._remove(key)
        if type != "DELETED" and (info := _pod_info(obj)) is not None:
            self._pods[key] = info
            self._by_node.setdefault(info.node, Counter())[
                (info.namespace, info.service_account)] += 1
        self.pods_gauge.set(len(self._pods))

    def on_synced(self) -> None:
        self.synced = True
        log.info("CA pod cache synced: %d running pods on %d nodes", len(self._pods),
                 len(self._by_node))

    def _remove(self, key: str) -> None:
        old = self._pods.pop(key, None)
        if old is None:
            return
        counts = self._by_node[old.node]
        counts[(old.namespace, old.service_account)] -= 1
        if counts[(old.namespace, old.service_account)] <= 0:
            del counts[(old.namespace, old.service_account)]
        if not counts:
            del self._by_node[old.node]

    # -- reads -----------------------------------------------------------------------------

    def _ready(self) -> None:
        if not self.synced:
            raise PodCacheNotReadyError("the CA's pod cache has not completed its first list "
                                        "of pods yet")

    def pod(self, namespace: str, name: str) -> PodInfo | None:
        self._ready()
        return self._pods.get(f"{namespace}/{name}")

    def identities_on_node(self, node: str) -> set[Identity]:
        self._ready()
        out = set()
        for ns, sa in self._by_node.get(node, Counter()):
            try:
                out.add(Identity(self.trust_domain, ns, sa))
            except IdentityError:
                log.warning("pod ServiceAccount %s/%s is not a valid SPIFFE path; skipped", ns, sa)
        return out


class ClusterPodSource(KubernetesSource):
    """The Kubernetes source reading every pod of the cluster (no spec.nodeName selector): the
    CA authorizes the agents of all nodes."""

    def __init__(self, config: ClusterConfig, index: PodIndex, **kwargs: Any) -> None:
        super().__init__(config, "nodemesh-ca", index, resources=("pods",), **kwargs)
