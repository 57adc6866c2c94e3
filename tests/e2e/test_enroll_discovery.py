"""Finding test-bed pods' netns and cgroups: by IP (TestbedLocator), and from a process running
in the pod (the KubernetesLocator's /proc search, with the test bed's cgroup layout)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from pathlib import Path

from agent.enroll import Enroller, KubernetesLocator, PodPlacement, TestbedLocator
from agent.enroll.podcgroup import subtree_match
from agent.host import cgroup, netns
from agent.model.mesh import Workload
from agent.state.snapshot import MeshState
from agent.testbed import Cluster
from agent.testbed.cluster import Pod

SLEEPER = "import time; time.sleep(60)"


def workload(pod: Pod) -> Workload:
    return Workload(name=pod.name, namespace=pod.namespace, ips=(pod.ip,),
                    node=f"n{pod.node_index}", uid=f"testbed//Pod/{pod.name}")


def same_netns(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def v2_path(path: Path) -> str:
    """A cgroup directory as /proc/<pid>/cgroup names it."""
    return "/" + str(path.relative_to(cgroup.mount_point()))


def test_testbed_locator_finds_every_pod_by_ip(cluster: Cluster) -> None:
    locator = TestbedLocator.for_run(cluster.run_id)
    for pod in cluster.pods:
        found = locator.locate(workload(pod))
        assert found == PodPlacement(pod.netns_path, pod.cgroup, None), pod.name
        assert netns.cookie_of(found.netns_path) == pod.cookie()
    # With a process in the pod, that process is reported.
    pod = cluster.pod(1, 1)
    proc = pod.python(SLEEPER)
    try:
        found = locator.locate(workload(pod))
        assert found is not None and found.pid == proc.pid
    finally:
        proc.stop()
    # Node addresses and addresses of no pod are not pods.
    node = cluster.nodes[0]
    assert locator.locate(Workload(name="host", namespace="default", ips=(node.ip,))) is None
    stray = ipaddress.IPv4Address("10.251.0.99")
    assert locator.locate(Workload(name="gone", namespace="default", ips=(stray,))) is None
    # Another run's prefix sees none of this cluster's pods.
    other = TestbedLocator("nm-000000-")
    assert all(other.locate(workload(p)) is None for p in cluster.pods)


def test_process_search_finds_the_pod_a_process_runs_in(cluster: Cluster) -> None:
    target, idle = cluster.pod(0, 1), cluster.pod(1, 0)
    layouts = {p.name: subtree_match(v2_path(p.cgroup)) for p in (target, idle)}
    locator = KubernetesLocator(match_for=lambda w: layouts[w.name])
    assert locator.locate(workload(target)) is None  # nothing runs in it yet
    proc = target.python(SLEEPER)
    try:
        found = locator.locate(workload(target))
        assert found is not None
        assert found.pid == proc.pid
        assert found.netns_path == f"/proc/{proc.pid}/ns/net"
        assert same_netns(found.netns_path, target.netns_path)
        assert netns.cookie_of(found.netns_path) == target.cookie()
        assert found.cgroup_path == target.cgroup
        assert locator.locate(workload(idle)) is None  # its own pod only
    finally:
        proc.stop()
    assert locator.locate(workload(target)) is None  # gone with its last process


def test_enroller_enrolls_the_pods_of_one_node(cluster: Cluster) -> None:
    enrolled: dict[str, PodPlacement] = {}
    removed: list[str] = []

    def enroll(w: Workload, placement: PodPlacement) -> None:
        enrolled[w.name] = placement

    enroller = Enroller("n1", TestbedLocator.for_run(cluster.run_id), enroll, removed.append)
    state = MeshState.build([workload(p) for p in cluster.pods])
    done = asyncio.run(enroller.reconcile(state))
    assert done.settled
    assert {name: p.netns_path for name, p in enrolled.items()} == {
        p.name: p.netns_path for p in cluster.nodes[1].pods}
    done = asyncio.run(enroller.reconcile(MeshState.build([workload(cluster.pod(1, 0))])))
    assert removed == [f"testbed//Pod/{cluster.pod(1, 1).name}"] and done.settled
