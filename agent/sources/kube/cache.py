"""Sans-IO per-resource object cache that turns watch events and relists into the events a
consumer should see: exactly one ADDED/MODIFIED/DELETED per real change, none duplicated.

Objects are keyed namespace/name (name for cluster-scoped resources) and tracked by uid, so an
object deleted and recreated under the same name is a DELETED then an ADDED, even when the watch
that saw it was lost in between and only a relist shows the new uid. Resource versions are
compared only for equality: the API treats them as opaque.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


class ObjectCache:
    def __init__(self, namespaced: bool) -> None:
        self.namespaced = namespaced
        self._objects: dict[str, Obj] = {}

    @property
    def objects(self) -> Mapping[str, Obj]:
        return self._objects

    def apply(self, type_: str, obj: Obj) -> list[Change]:
        """One watch event in; the changes it makes (possibly none) out."""
        key, uid, rv = meta_of(obj, self.namespaced)
        old = self._objects.get(key)
        if type_ == "DELETED":
            if old is None or meta_of(old, self.namespaced)[1] != uid:
                return []  # never seen (or already replaced): nothing to take back
            del self._objects[key]
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
        for key in sorted(self._objects.keys() - fresh.keys()):
            deleted.append(("DELETED", self._objects.pop(key)))
        for key in sorted(fresh):
            uid, rv, obj = fresh[key]
            for change in self._upsert(key, uid, rv, obj, self._objects.get(key)):
                (deleted if change[0] == "DELETED" else upserts).append(change)
        return deleted + upserts

    def _upsert(self, key: str, uid: str, rv: str, obj: Obj, old: Obj | None) -> list[Change]:
        if old is None:
            self._objects[key] = obj
            return [("ADDED", obj)]
        _, old_uid, old_rv = meta_of(old, self.namespaced)
        if old_uid == uid and old_rv == rv:
            return []  # already have exactly this version: a duplicate
        self._objects[key] = obj
        if old_uid != uid:
            return [("DELETED", old), ("ADDED", obj)]
        return [("MODIFIED", obj)]
