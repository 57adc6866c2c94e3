"""Enroller: add, remove, replace, pending retry and failures, against a locator reading a
/proc tree laid out as on a kubelet node (processes appear and go as pods start and stop)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from fakeproc import FakeProc

from agent.enroll import Enroller, KubernetesLocator, Pass, PodPlacement
from agent.model.mesh import Labels, Namespace, Workload
from agent.state.snapshot import MeshObject, MeshState

NODE = "node-a"
TIMEOUT = 20.0


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TIMEOUT):
            await coro

    asyncio.run(bounded())


def uid_of(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def pod(name: str, n: int, ip: str | None = None, node: str = NODE, **kw: Any) -> Workload:
    return Workload(name=name, namespace="shop", uid=f"Kubernetes//Pod/shop/{name}",
                    k8s_uid=uid_of(n), node=node, in_mesh=kw.pop("in_mesh", None),
                    ips=(ipaddress.ip_address(ip),) if ip else (), **kw)


def state(*objs: MeshObject) -> MeshState:
    return MeshState.build([Namespace("shop", Labels({"istio.io/dataplane-mode": "ambient"})),
                            *objs])


class Agent:
    """The callbacks: records what the enroller asked for; can be told to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_enroll: set[str] = set()
        self.fail_unenroll: set[str] = set()
        self.placements: dict[str, PodPlacement] = {}

    def enroll(self, w: Workload, placement: PodPlacement) -> None:
        if w.name in self.fail_enroll:
            raise OSError(f"tunnel listener in {placement.netns_path}: address in use")
        self.calls.append(("enroll", w.name))
        self.placements[w.name] = placement

    async def unenroll(self, uid: str) -> None:  # async callbacks work as well
        await asyncio.sleep(0)
        name = uid.rsplit("/", 1)[-1]
        if name in self.fail_unenroll:
            raise OSError("datapath map update failed")
        self.calls.append(("unenroll", name))

    def take(self) -> list[tuple[str, str]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def start(proc: FakeProc, pid: int, n: int) -> None:
    """Pod n's pause process, in a netns of its own."""
    proc.add(pid, f"0::/kubepods/besteffort/pod{uid_of(n)}/pause\n")


def enroller(proc: FakeProc, agent: Agent, tmp_path: Path) -> Enroller:
    locator = KubernetesLocator(proc=proc.root, cgroup_mount=tmp_path, pids=proc.pids)
    return Enroller(NODE, locator, agent.enroll, agent.unenroll)


def test_add_pending_retry_and_idempotence(proc: FakeProc, tmp_path: Path) -> None:
    async def body() -> None:
        agent = Agent()
        e = enroller(proc, agent, tmp_path)
        start(proc, 100, 1)
        s = state(pod("ready", 1, "10.1.0.1"), pod("no-ip", 2), pod("not-started", 3, "10.1.0.3"),
                  pod("remote", 4, "10.2.0.1", node="node-b"),
                  pod("opted-out", 5, "10.1.0.5", in_mesh=False))
        start(proc, 105, 5)
        done = await e.reconcile(s)
        assert agent.take() == [("enroll", "ready")]
        assert agent.placements["ready"].pid == 100
        assert done.enrolled == ["Kubernetes//Pod/shop/ready"] and not done.settled
        assert done.pending == {"Kubernetes//Pod/shop/no-ip": "no pod IP yet (the pod sandbox "
                                                              "is not up)",
                                "Kubernetes//Pod/shop/not-started": "pod netns not found yet"}
        assert e.pending == done.pending and set(e.enrolled) == {"Kubernetes//Pod/shop/ready"}

        # Same state, nothing found yet: no calls, same pending.
        assert (await e.reconcile(s)).pending == done.pending and agent.take() == []

        # The pod's process appears: the retry enrolls it without any state change.
        start(proc, 103, 3)
        done = await e.reconcile(s)
        assert agent.take() == [("enroll", "not-started")] and len(done.pending) == 1
        s = state(pod("ready", 1, "10.1.0.1"), pod("no-ip", 2, "10.1.0.2"),
                  pod("not-started", 3, "10.1.0.3"))
        start(proc, 102, 2)
        done = await e.reconcile(s)
        assert agent.take() == [("enroll", "no-ip")] and done.settled
        assert await e.reconcile(s) == Pass() and agent.take() == []

    run(body())


def test_remove_leave_relabel_and_replace(proc: FakeProc, tmp_path: Path) -> None:
    async def body() -> None:
        agent = Agent()
        e = enroller(proc, agent, tmp_path)
        for n in (1, 2, 3):
            start(proc, 100 + n, n)
        await e.reconcile(state(pod("a", 1, "10.1.0.1"), pod("b", 2, "10.1.0.2"),
                                pod("c", 3, "10.1.0.3")))
        assert sorted(agent.take()) == [("enroll", "a"), ("enroll", "b"), ("enroll", "c")]

        # a: deleted; b: opted out of the mesh; c: only its labels changed.
        relabelled = pod("c", 3, "10.1.0.3", labels={"version": "v2"})
        done = await e.reconcile(state(pod("b", 2, "10.1.0.2", in_mesh=False), relabelled))
        assert agent.take() == [("unenroll", "a"), ("unenroll", "b")]
        assert done.unenrolled == ["Kubernetes//Pod/shop/a", "Kubernetes//Pod/shop/b"]
        assert e.enrolled["Kubernetes//Pod/shop/c"].workload is relabelled

        # c deleted and recreated under the same name: a new pod, in a new netns.
        proc.exit(103)
        start(proc, 200, 9)
        done = await e.reconcile(state(pod("c", 9, "10.1.0.9")))
        assert agent.take() == [("unenroll", "c"), ("enroll", "c")]
        assert agent.placements["c"].pid == 200 and done.settled

        # The namespace leaves the mesh: its pods that follow it are unenrolled.
        await e.reconcile(MeshState.build([Namespace("shop"), pod("c", 9, "10.1.0.9")]))
        assert agent.take() == [("unenroll", "c")] and not e.enrolled

    run(body())


def test_failed_callbacks_are_retried(proc: FakeProc, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        agent = Agent()
        e = enroller(proc, agent, tmp_path)
        start(proc, 101, 1)
        start(proc, 102, 2)
        agent.fail_enroll.add("a")
        s = state(pod("a", 1, "10.1.0.1"), pod("b", 2, "10.1.0.2"))
        done = await e.reconcile(s)
        assert agent.take() == [("enroll", "b")]  # a's failure did not stop b
        assert done.pending["Kubernetes//Pod/shop/a"].startswith("enroll failed: tunnel "
                                                                 "listener in")
        assert any(r.levelno == logging.ERROR and "shop/a" in r.getMessage()
                   for r in caplog.records)
        agent.fail_enroll.clear()
        assert (await e.reconcile(s)).settled and agent.take() == [("enroll", "a")]

        # An unenroll that fails keeps the pod enrolled and is tried again.
        agent.fail_unenroll.add("b")
        done = await e.reconcile(state(pod("a", 1, "10.1.0.1")))
        assert done.failed_unenroll == {"Kubernetes//Pod/shop/b": "unenroll failed: datapath "
                                                                  "map update failed"}
        assert "Kubernetes//Pod/shop/b" in e.enrolled and not done.settled
        # Replaced meanwhile: the new pod waits until the old one is gone.
        start(proc, 300, 7)
        done = await e.reconcile(state(pod("a", 1, "10.1.0.1"), pod("b", 7, "10.1.0.7")))
        assert done.pending == {"Kubernetes//Pod/shop/b": "waiting for the previous pod to be "
                                                          "unenrolled"}
        agent.fail_unenroll.clear()
        done = await e.reconcile(state(pod("a", 1, "10.1.0.1"), pod("b", 7, "10.1.0.7")))
        assert agent.take() == [("unenroll", "b"), ("enroll", "b")] and done.settled
        assert agent.placements["b"].pid == 300

    run(body())
