"""Enroller: keeps the set of enrolled pods equal to this node's in-mesh workloads.

Each pass compares what the state wants (in-mesh workloads on this node) with what is enrolled,
and calls the agent's callbacks: `unenroll(uid)` for pods that left the mesh, left the node or
were replaced, then `enroll(workload, placement)` for pods not yet enrolled. A pod is replaced when
what its enrollment depends on changed: its Kubernetes UID (deleted and recreated under the same
name: a new netns), its IPs or its identity. Label and PeerAuthentication changes need no
re-enroll (the agent recompiles kernel entries and updates the pod's tunnel in place). Passes are
idempotent: with nothing changed, nothing is called. A pod that cannot be enrolled yet (no IP,
netns not found, an enroll callback that failed) is reported as pending, with the reason, and
retried on the next pass; `run` makes that pass soon even when the state does not change.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from agent.enroll.placement import LocateError, PodLocator, PodPlacement
from agent.identity.spiffe import Identity
from agent.model.fields import IPAddress
from agent.model.mesh import Workload
from agent.state.snapshot import MeshState

log = logging.getLogger(__name__)

EnrollFn = Callable[[Workload, PodPlacement], Awaitable[None] | None]
UnenrollFn = Callable[[str], Awaitable[None] | None]


def enrollment_key(w: Workload) -> tuple[str, tuple[IPAddress, ...], Identity]:
    """What an enrollment depends on; when it changes the pod is enrolled again."""
    return w.k8s_uid, w.ips, w.identity


@dataclass(frozen=True)
class Enrollment:
    workload: Workload
    placement: PodPlacement


@dataclass
class Pass:
    """What one reconcile pass did (uids), and what is still waiting and why."""

    enrolled: list[str] = field(default_factory=list)
    unenrolled: list[str] = field(default_factory=list)
    pending: dict[str, str] = field(default_factory=dict)
    failed_unenroll: dict[str, str] = field(default_factory=dict)

    @property
    def settled(self) -> bool:
        """Everything wanted is enrolled and everything unwanted is gone."""
        return not self.pending and not self.failed_unenroll


async def _call(result: Awaitable[None] | None) -> None:
    if inspect.isawaitable(result):
        await result


class Enroller:
    def __init__(self, node: str, locator: PodLocator, enroll: EnrollFn,
                 unenroll: UnenrollFn) -> None:
        """`enroll`/`unenroll` may be plain or async functions; an exception from either is
        logged and retried on the next pass, and does not stop the other pods' changes."""
        self.node = node
        self.locator = locator
        self._enroll = enroll
        self._unenroll = unenroll
        self._enrolled: dict[str, Enrollment] = {}
        self.last = Pass()
        # (uid, seconds) of the latest successful enroll and unenroll call (config_dump; the
        # footprint benchmark reports them)
        self.last_enroll: tuple[str, float] | None = None
        self.last_unenroll: tuple[str, float] | None = None

    @property
    def enrolled(self) -> Mapping[str, Enrollment]:
        return dict(self._enrolled)

    @property
    def pending(self) -> Mapping[str, str]:
        """uid -> why it is not enrolled yet, as of the last pass."""
        return dict(self.last.pending)

    def wanted(self, state: MeshState) -> dict[str, Workload]:
        return {w.uid: w for w in state.workloads_on_node(self.node) if state.in_mesh(w)}

    async def reconcile(self, state: MeshState) -> Pass:
        wanted = self.wanted(state)
        done = Pass()
        for uid, current in list(self._enrolled.items()):
            w = wanted.get(uid)
            if w is not None and enrollment_key(w) == enrollment_key(current.workload):
                self._enrolled[uid] = Enrollment(w, current.placement)  # e.g. new labels
                continue
            began = time.monotonic()
            try:
                await _call(self._unenroll(uid))
            except Exception as e:
                log.exception("unenrolling %s failed; retrying on the next pass",
                              current.workload.ref)
                done.failed_unenroll[uid] = f"unenroll failed: {e}"
                continue
            del self._enrolled[uid]
            self.last_unenroll = (uid, time.monotonic() - began)
            done.unenrolled.append(uid)
            log.info("unenrolled %s (%s)", current.workload.ref,
                     "replaced" if w is not None else "no longer an in-mesh pod of this node")
        for uid, w in sorted(wanted.items()):
            if uid in done.failed_unenroll:  # replaced, but the old pod is still enrolled
                done.pending[uid] = "waiting for the previous pod to be unenrolled"
                continue
            if uid in self._enrolled:
                continue
            reason = await self._try_enroll(w)
            if reason is None:
                done.enrolled.append(uid)
            else:
                done.pending[uid] = reason
        if done.pending:
            log.debug("pending enrollment: %s", done.pending)
        self.last = done
        return done

    async def _try_enroll(self, w: Workload) -> str | None:
        """None on success, else why not yet."""
        if not w.ips:
            return "no pod IP yet (the pod sandbox is not up)"
        try:
            placement = self.locator.locate(w)
        except (OSError, LocateError, ValueError) as e:
            return f"locating the pod failed: {e}"
        if placement is None:
            return "pod netns not found yet"
        began = time.monotonic()
        try:
            await _call(self._enroll(w, placement))
        except Exception as e:
            log.exception("enrolling %s (netns %s) failed; retrying on the next pass", w.ref,
                          placement.netns_path)
            return f"enroll failed: {e}"
        self._enrolled[w.uid] = Enrollment(w, placement)
        self.last_enroll = (w.uid, time.monotonic() - began)
        log.info("enrolled %s (netns %s, cgroup %s)", w.ref, placement.netns_path,
                 placement.cgroup_path)
        return None
