"""KubernetesStateSink: the Kubernetes source's events, applied to the state store one by one.

Each ADDED/MODIFIED object is converted (`agent.sources.k8sconvert`, the policy parsers) and
upserted; each DELETED one is removed by its key. An object that does not convert (a malformed
AuthorizationPolicy, say) is rejected on its own: the error names the object and the field, is
logged and kept in `rejected`, and the store keeps that object's previous good version, if any,
while every other object goes on updating. Raising instead would stop the whole source.

Several sources share one store. This sink edits only objects it wrote itself: it removes a key
only while the store still holds the instance it put there (see docs/kubernetes.md, "Several
sources").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from agent.model.mesh import Labels, Workload
from agent.sources.k8sconvert import object_from_k8s, pod_uid
from agent.state.snapshot import MeshObject, MeshState
from agent.state.store import StateStore

log = logging.getLogger(__name__)

_Op = tuple[str, str, "MeshObject | None"]  # (kind, key, object to write or None to remove)

# The Kubernetes kind each resource's objects carry.
API_KIND_OF_RESOURCE: Mapping[str, str] = {
    "pods": "Pod",
    "namespaces": "Namespace",
    "services": "Service",
    "endpointslices": "EndpointSlice",
    "authorizationpolicies": "AuthorizationPolicy",
    "peerauthentications": "PeerAuthentication",
    "connectionratelimits": "ConnectionRateLimit",
}
# The source's resource names and the mesh kind each becomes: the same but for pods.
KIND_OF_RESOURCE: Mapping[str, str] = {**API_KIND_OF_RESOURCE, "pods": "Workload"}


@dataclass(frozen=True)
class ObjectRejection:
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
                 on_reject: Callable[[ObjectRejection], None] | None = None) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self.on_reject = on_reject
        # kind -> key -> what we wrote (per kind, not by (kind, key): one pair fewer per pod)
        self._mine: dict[str, dict[str, MeshObject]] = {k: {} for k in KIND_OF_RESOURCE.values()}
        self._rejected: dict[tuple[str, str], ObjectRejection] = {}
        self._synced = asyncio.Event()
        self._batch: list[_Op] | None = None  # inside on_events: edits collected, not applied
        # The pods of a ReplicaSet carry equal labels: they share one Labels, kept while in use.
        self._labels: weakref.WeakValueDictionary[frozenset[tuple[str, str]], Labels] = (
            weakref.WeakValueDictionary())

    # -- what the agent reads ------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once every resource's first list is in the store (readiness waits on this)."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    @property
    def rejected(self) -> Mapping[tuple[str, str], ObjectRejection]:
        """Objects whose current version is invalid, by (kind, store key)."""
        return dict(self._rejected)

    # -- EventSink -----------------------------------------------------------------------------

    def on_synced(self) -> None:
        log.info("kubernetes: initial lists applied (%d objects, %d rejected)",
                 sum(map(len, self._mine.values())), len(self._rejected))
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
            kept = key in self._mine[kind]
            self._reject(kind, key, ObjectRejection(resource, ref, meta["resourceVersion"], str(e),
                kept))
            return
        self._rejected.pop((kind, key), None)
        if converted is None:  # a finished pod: its IP may already belong to a new one
            self._remove(kind, key)
            return
        for warning in getattr(converted, "warnings", ()):
            log.warning("%s %s: %s", resource, ref, warning)
        if isinstance(converted, Workload):
            converted = self._shared_labels(converted)
            key = converted.uid  # equal to key; the store and this sink keep this one copy
        self._write(kind, key, converted)

    def _shared_labels(self, w: Workload) -> Workload:
        items = frozenset(w.labels.items())
        shared = self._labels.get(items)
        if shared is None:
            self._labels[items] = w.labels
            return w
        return w if shared is w.labels else dataclasses.replace(w, labels=shared)

    # -- store edits ---------------------------------------------------------------------------

    def on_events(self, resource: str, changes: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """A list's (or relist's) changes: each handled as `on_event` does, all applied to the
        store in one update. One update per object would copy the kind's mapping each time:
        quadratic in the number of pods, seconds for a 10,000-pod cluster."""
        self._batch = []
        try:
            for type_, obj in changes:
                self.on_event(resource, type_, obj)
        finally:
            ops, self._batch = self._batch, None
        if ops:
            self._commit(ops)

    def _write(self, kind: str, key: str, obj: MeshObject) -> None:
        self._edit((kind, key, obj))

    def _remove(self, kind: str, key: str) -> None:
        self._edit((kind, key, None))  # a no-op unless this sink wrote the key

    def _edit(self, op: _Op) -> None:
        if self._batch is not None:
            self._batch.append(op)
        else:
            self._commit([op])

    def _commit(self, ops: list[_Op]) -> None:
        def change(state: MeshState) -> MeshState:
            edits: dict[str, dict[str, MeshObject | None]] = {}
            for kind, key, obj in ops:
                pending = edits.get(kind, {})
                current = pending[key] if key in pending else state.objects[kind].get(key)
                mine = self._mine[kind].get(key)
                if obj is None:
                    self._mine[kind].pop(key, None)
                    if mine is None or current is not mine:
                        continue  # another source wrote this key since: it is theirs now
                elif current is not None and current is mine and current == obj:
                    continue  # e.g. a pod status update that changes nothing the mesh uses
                else:
                    if current is not None and current is not mine:
                        log.warning("kubernetes: %s %s replaces the one another source wrote",
                                    kind, key)
                    self._mine[kind][key] = obj  # under the store's lock, with the write itself
                edits.setdefault(kind, {})[key] = obj
            return state.with_edits(edits) if edits else state

        self.store.update(change)

    def _reject(self, kind: str, key: str, rejection: ObjectRejection) -> None:
        self._rejected[(kind, key)] = rejection
        log.error("%s", rejection)
        if self.on_reject is not None:
            self.on_reject(rejection)
