"""Readiness: whether /healthz/ready may say 200, and why not.

Ready means the agent enforces what the cluster says: every resource's first list is in the
store, a reconcile that began after that compiled and applied the kernel state, and every local
in-mesh pod is enrolled. A pod still pending after `enroll_grace` is reported as failing, with
its reason, and stops holding readiness back (one broken pod must not keep a node unready).
Pending enrollment gates only the start: once ready, a pod that arrives later is enrolled while
the agent stays ready. Unready again while the state source has failed for longer than
`source_grace` (an API-server outage): enforcement continues meanwhile from the pinned kernel
state and the last known mesh state, but the state may be stale. Unready, too, while no
data-plane worker runs (`data_plane` says why): the pods' traffic is refused meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

DEFAULT_SOURCE_GRACE = 30.0
DEFAULT_ENROLL_GRACE = 60.0


@dataclass
class Readiness:
    source_grace: float = DEFAULT_SOURCE_GRACE
    enroll_grace: float = DEFAULT_ENROLL_GRACE
    # Seconds the state source has been failing (0: healthy); None: a source that cannot fail.
    source_outage: Callable[[], float] | None = None
    # Why the data plane cannot carry traffic now (None: it can), e.g. Supervisor.unserving.
    data_plane: Callable[[], str | None] | None = None
    clock: Callable[[], float] = time.monotonic
    synced: bool = False  # every resource's initial list applied
    reconciled: bool = False  # a pass that began after `synced` compiled and enrolled
    started: bool = False  # has been ready once
    _pending: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # uid: ref, why, t

    def pass_done(self, began_synced: bool, ok: bool,
                  pending: Mapping[str, tuple[str, str]]) -> None:
        """After each reconcile: whether it began with the state synced, whether it compiled and
        applied, and the pods it could not enroll yet (uid: (namespace/name, reason))."""
        now = self.clock()
        self._pending = {uid: (ref, why, self._pending.get(uid, (ref, why, now))[2])
                         for uid, (ref, why) in pending.items()}
        if ok and began_synced:
            self.reconciled = True
        if not self.started and self.check()[0]:
            self.started = True

    def failing(self) -> dict[str, str]:
        """Pods pending longer than the grace: namespace/name -> reason."""
        now = self.clock()
        return {ref: why for ref, why, since in self._pending.values()
                if now - since >= self.enroll_grace}

    def _blocked(self) -> str | None:
        """What keeps the agent unready whatever its pods: state not yet synced and applied,
        the source down past its grace, or no data-plane worker."""
        if not self.synced:
            return "waiting for the first list of every resource"
        if not self.reconciled:
            return "waiting for the first reconcile after sync"
        outage = self.source_outage() if self.source_outage is not None else 0.0
        if outage > self.source_grace:
            return (f"state source failing for {outage:.0f}s (grace {self.source_grace:g}s);"
                    " enforcement continues from the pinned kernel state")
        return self.data_plane() if self.data_plane is not None else None

    def check(self) -> tuple[bool, str]:
        blocked = self._blocked()
        if blocked is not None:
            return False, blocked
        now = self.clock()
        waiting = sorted(f"{ref}: {why}" for ref, why, since in self._pending.values()
                         if now - since < self.enroll_grace)
        if waiting and not self.started:
            return False, "enrollment pending: " + "; ".join(waiting)
        failing = self.failing()
        if failing:
            return True, "ready; not enrolled: " + "; ".join(
                f"{ref}: {why}" for ref, why in sorted(failing.items()))
        return True, "ready"
