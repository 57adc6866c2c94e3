"""KubernetesStateSink: the Kubernetes source's events, applied to the state store one by one.

Each ADDED/MODIFIED object is converted (`agent.state.k8s`, the policy parsers) and upserted;
each DELETED one is removed by its key. An object that does not convert (a malformed
AuthorizationPolicy, say) is rejected on its own: the error names the object and the field, is
logged and kept in `rejected`, and the store keeps that object's previous good version, if any,
while every other object goes on updating. Raising instead would stop the whole source.

Several sources share one store. This sink edits only objects it wrote itself: it removes a key
only while the store still holds the instance it put there (see docs/kubernetes.md, "Several
sources").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from agent.state.k8s import object_from_k8s, pod_uid
from agent.state.snapshot import MeshObject, MeshState
from agent.state.store import StateStore

log = logging.getLogger(__name__)

# The source's resource names and the mesh kind each becomes.
KIND_OF_RESOURCE: Mapping[str, str] = {
    "pods": "Workload",
    "namespaces": "Namespace",
    "services": "Service",
    "authorizationpolicies": "AuthorizationPolicy",
    "peerauthentications": "PeerAuthentication",
}
# The Kubernetes kind each resource's objects carry.
API_KIND_OF_RESOURCE: Mapping[str, str] = {
    "pods": "Pod",
    "namespaces": "Namespace",
    "services": "Service",
    "authorizationpolicies": "AuthorizationPolicy",
    "peerauthentications": "PeerAuthentication",
}


@dataclass(frozen=True)
class Rejection:
    """An object version the store did not take, and why (`error` names the field)."""

    resource: str
    ref: str  # namespace/name, or name for a namespace
    resource_version: str
    error: str
    kept_previous: bool  # the store still holds the last good version

    def __str__(self) -> str:
        kept = ("keeping its last good version" if self.kept_previous
                else "it is not in the mesh state until fixed")
        return (f"{self.resource} {self.ref} (resourceVersion {self.resource_version}) "
                f"rejected: {self.error}; {kept}")


class KubernetesStateSink:
    """The `EventSink` that `KubernetesSource` feeds: Kubernetes changes into a StateStore."""

    def __init__(self, store: StateStore, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 on_reject: Callable[[Rejection], None] | None = None) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self.on_reject = on_reject
        self._mine: dict[tuple[str, str], MeshObject] = {}  # (kind, key) -> what we wrote
        self._rejected: dict[tuple[str, str], Rejection] = {}
        self._synced = asyncio.Event()

    # -- what the agent reads ------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once every resource's first list is in the store (readiness waits on this)."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    @property
    def rejected(self) -> Mapping[tuple[str, str], Rejection]:
        """Objects whose current version is invalid, by (kind, store key)."""
        return dict(self._rejected)

    # -- EventSink -----------------------------------------------------------------------------

    def on_synced(self) -> None:
        log.info("kubernetes: initial lists applied (%d objects, %d rejected)",
                 len(self._mine), len(self._rejected))
        self._synced.set()

    def on_event(self, resource: str, type: str, obj: dict[str, Any]) -> None:
        kind = KIND_OF_RESOURCE.get(resource)
        if kind is None:
            raise ValueError(f"resource {resource!r} has no mesh kind; want one of "
                             f"{', '.join(KIND_OF_RESOURCE)}")
        meta = obj["metadata"]  # the source's cache validated name/namespace/uid/version
        ref = f"{meta['namespace']}/{meta['name']}" if "namespace" in meta else meta["name"]
        key = pod_uid(meta["namespace"], meta["name"]) if resource == "pods" else ref
        if type == "DELETED":
            self._rejected.pop((kind, key), None)
            self._remove(kind, key)
            return
        try:
            if obj.get("kind") != API_KIND_OF_RESOURCE[resource]:
                # The source fills `kind` only when the server left it out: a server (or a
                # proxy) may still send another kind in this watch. Not this resource's object.
                raise ValueError(f"kind: {obj.get('kind')!r} in the {resource} watch; want "
                                 f"{API_KIND_OF_RESOURCE[resource]}")
            converted = object_from_k8s(obj, trust_domain=self.trust_domain)
        except ValueError as e:  # FieldError names the field; others come from value checks
            kept = (kind, key) in self._mine
            self._reject(kind, key, Rejection(resource, ref, meta["resourceVersion"], str(e), kept))
            return
        self._rejected.pop((kind, key), None)
        if converted is None:  # a finished pod: its IP may already belong to a new one
            self._remove(kind, key)
            return
        for warning in getattr(converted, "warnings", ()):
            log.warning("%s %s: %s", resource, ref, warning)
        self._write(kind, key, converted)

    # -- store edits ---------------------------------------------------------------------------

    def _write(self, kind: str, key: str, obj: MeshObject) -> None:
        mine = self._mine.get((kind, key))

        def change(state: MeshState) -> MeshState:
            current = state.objects[kind].get(key)
            if current is not None and current is mine and current == obj:
                return state  # e.g. a pod status update that changes nothing the mesh uses
            if current is not None and current is not mine:
                log.warning("kubernetes: %s %s replaces the one another source wrote", kind, key)
            self._mine[(kind, key)] = obj  # under the store's lock, with the write itself
            return state.with_object(obj)

        self.store.update(change)

    def _remove(self, kind: str, key: str) -> None:
        mine = self._mine.pop((kind, key), None)
        if mine is None:
            return

        def change(state: MeshState) -> MeshState:
            if state.objects[kind].get(key) is not mine:
                return state  # another source wrote this key since: it is theirs now
            return state.without(kind, key)

        self.store.update(change)

    def _reject(self, kind: str, key: str, rejection: Rejection) -> None:
        self._rejected[(kind, key)] = rejection
        log.error("%s", rejection)
        if self.on_reject is not None:
            self.on_reject(rejection)
