"""StateStore: the current MeshState, swapped atomically, with change subscribers.

Readers take `store.current` and use that snapshot for a whole decision; it never changes under
them. Writers either replace the snapshot (file source) or upsert/delete single objects
(Kubernetes watches). Subscribers run synchronously, in order, after each change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent.identity.spiffe import Identity
from agent.state.snapshot import KINDS, MeshObject, MeshState

log = logging.getLogger(__name__)

Subscriber = Callable[[MeshState, MeshState], None]  # (old, new)


class StateStore:
    def __init__(self, initial: MeshState | None = None) -> None:
        self._state = initial if initial is not None else MeshState()
        self._subscribers: list[Subscriber] = []
        # Held across the update and the notifications so subscribers see changes in order.
        self._lock = threading.RLock()

    @property
    def current(self) -> MeshState:
        return self._state

    def identities_on_node(self, node: str) -> set[Identity]:
        """The CA's WorkloadLocator, answered from the state current at each call."""
        return self._state.identities_on_node(node)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(old, new)` after every change; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def replace(self, snapshot: MeshState) -> None:
        self._swap(lambda _old: snapshot)

    def upsert(self, obj: MeshObject) -> None:
        self._swap(lambda old: old.with_object(obj))

    def delete(self, kind: str, key: str) -> None:
        """Remove one object; `key` as `agent.state.snapshot.key_of` gives it. Missing is fine."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}: want one of {', '.join(KINDS)}")
        self._swap(lambda old: old.without(kind, key))

    def update(self, change: Callable[[MeshState], MeshState]) -> None:
        """Replace the snapshot with `change(current)`, atomically: no other write lands between
        the read and the swap (sources that share the store edit only their own objects)."""
        self._swap(change)

    def _swap(self, change: Callable[[MeshState], MeshState]) -> None:
        with self._lock:
            old = self._state
            new = change(old)
            if new is old:
                return
            self._state = new
            for callback in list(self._subscribers):
                try:
                    callback(old, new)
                except Exception:
                    # One broken subscriber must not keep the others from seeing the change.
                    log.exception("state subscriber %r failed", callback)
