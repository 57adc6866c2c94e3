"""Sans-IO per-resource object cache that turns watch events and relists into the events a
consumer should see: exactly one ADDED/MODIFIED/DELETED per real change, none duplicated.

Objects are keyed namespace/name (name for cluster-scoped resources) and tracked by uid, so an
object deleted and recreated under the same name is a DELETED then an ADDED, even when the watch
that saw it was lost in between and only a relist shows the new uid. Resource versions are
compared only for equality: the API treats them as opaque.

A `slim` cache keeps only each object's uid and resourceVersion (what deduplication and relist
differences need), not the object: for pods, which every agent holds for the whole cluster, the
consumer keeps what it converted and the cache would be a second copy. Its DELETED changes and
`objects` carry stubs with just the metadata (name, namespace, uid, resourceVersion).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

Obj = dict[str, Any]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]
Change = tuple[EventType, Obj]


class InvalidObjectError(ValueError):
    """An object from the API server lacks the metadata every Kubernetes object has."""


def meta_of(obj: Any, namespaced: bool) -> tuple[str, str, str]:
    """(key, uid, resourceVersion), validated."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        raise InvalidObjectError(f"object without metadata: {str(obj)[:200]}")
    meta = obj["metadata"]
    name, uid, rv = meta.get("name"), meta.get("uid"), meta.get("resourceVersion")
    for field, value in (("name", name), ("uid", uid), ("resourceVersion", rv)):
        if not isinstance(value, str) or not value:
            raise InvalidObjectError(f"object {name!r} has no metadata.{field} (got {value!r})")
    assert isinstance(name, str) and isinstance(uid, str) and isinstance(rv, str)
    if not namespaced:
        return name, uid, rv
    ns = meta.get("namespace")
    if not isinstance(ns, str) or not ns:
        raise InvalidObjectError(f"namespaced object {name!r} has no metadata.namespace")
    return f"{ns}/{name}", uid, rv


class _Stubs(Mapping[str, Obj]):
    """A slim cache's entries, as metadata-only objects made on access."""

    def __init__(self, versions: dict[str, tuple[str, str]], namespaced: bool) -> None:
        self._versions = versions
        self._namespaced = namespaced

    def __getitem__(self, key: str) -> Obj:
        uid, rv = self._versions[key]
        return _stub(key, uid, rv, self._namespaced)

    def __iter__(self) -> Iterator[str]:
        return iter(self._versions)

    def __len__(self) -> int:
        return len(self._versions)


def _stub(key: str, uid: str, rv: str, namespaced: bool) -> Obj:
    ns, _, name = key.partition("/") if namespaced else ("", "", key)
    meta = {"name": name, "uid": uid, "resourceVersion": rv}
    if namespaced:
        meta["namespace"] = ns
    return {"metadata": meta}


class ObjectCache:
    def __init__(self, namespaced: bool, slim: bool = False) -> None:
        self.namespaced = namespaced
        self.slim = slim
        self._objects: dict[str, Obj] = {}
        self._versions: dict[str, tuple[str, str]] = {}  # slim: key -> (uid, resourceVersion)

    @property
    def objects(self) -> Mapping[str, Obj]:
        return _Stubs(self._versions, self.namespaced) if self.slim else self._objects

    def _get(self, key: str) -> tuple[str, str, Obj] | None:
        if self.slim:
            v = self._versions.get(key)
            return None if v is None else (v[0], v[1], _stub(key, *v, self.namespaced))
        obj = self._objects.get(key)
        if obj is None:
            return None
        _, uid, rv = meta_of(obj, self.namespaced)
        return uid, rv, obj

    def _put(self, key: str, uid: str, rv: str, obj: Obj) -> None:
        if self.slim:
            self._versions[key] = (uid, rv)
        else:
            self._objects[key] = obj

    def _pop(self, key: str) -> Obj:
        if self.slim:
            return _stub(key, *self._versions.pop(key), self.namespaced)
        return self._objects.pop(key)

    def keys(self) -> set[str]:
        return set(self._versions if self.slim else self._objects)

    def apply(self, type_: str, obj: Obj) -> list[Change]:
        """One watch event in; the changes it makes (possibly none) out."""
        key, uid, rv = meta_of(obj, self.namespaced)
        old = self._get(key)
        if type_ == "DELETED":
            if old is None or old[0] != uid:
                return []  # never seen (or already replaced): nothing to take back
            self._pop(key)
            return [("DELETED", obj)]
        if type_ not in ("ADDED", "MODIFIED"):
            raise ValueError(f"not an object event type: {type_!r}")
        return self._upsert(key, uid, rv, obj, old)

    def replace(self, objs: Iterable[Obj]) -> list[Change]:
        """A fresh list in; the changes against the cache out.

        All deletions come first: a consumer indexing by something other than the key (a pod IP
        that moved to a new pod, say) must drop the old holder before it sees the new one.
        """
        fresh: dict[str, tuple[str, str, Obj]] = {}
        for obj in objs:
            key, uid, rv = meta_of(obj, self.namespaced)
            fresh[key] = (uid, rv, obj)
        deleted: list[Change] = []
        upserts: list[Change] = []
        for key in sorted(self.keys() - fresh.keys()):
            deleted.append(("DELETED", self._pop(key)))
        for key in sorted(fresh):
            uid, rv, obj = fresh[key]
            for change in self._upsert(key, uid, rv, obj, self._get(key)):
                (deleted if change[0] == "DELETED" else upserts).append(change)
        return deleted + upserts

    def _upsert(self, key: str, uid: str, rv: str, obj: Obj,
                old: tuple[str, str, Obj] | None) -> list[Change]:
        if old is None:
            self._put(key, uid, rv, obj)
            return [("ADDED", obj)]
        old_uid, old_rv, old_obj = old
        if old_uid == uid and old_rv == rv:
            return []  # already have exactly this version: a duplicate
        self._put(key, uid, rv, obj)
        if old_uid != uid:
            return [("DELETED", old_obj), ("ADDED", obj)]
        return [("MODIFIED", obj)]
