"""KubernetesLocator over a /proc tree laid out as on a kubelet node, and over the real /proc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakeproc import FakeProc

from agent.enroll import KubernetesLocator, LocateError, PodPlacement
from agent.model.mesh import Workload

UID = "7f9c6e2a-5b1d-4c3e-8a9f-0b1c2d3e4f5a"
POD = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice"


def scope(name: str) -> str:
    return f"0::/{POD}/{name}.scope\n"


def pod(uid: str = UID) -> Workload:
    return Workload(name="web", namespace="shop", uid="Kubernetes//Pod/shop/web", k8s_uid=uid)


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def locator(proc: FakeProc, mount: Path) -> KubernetesLocator:
    return KubernetesLocator(proc=proc.root, cgroup_mount=mount, pids=proc.pids)


def test_finds_the_pod_netns_and_skips_what_is_not_in_it(proc: FakeProc, tmp_path: Path) -> None:
    mount = tmp_path / "cgroup"
    (mount / POD).mkdir(parents=True)
    proc.add(40, "0::/system.slice/containerd.service\n")
    proc.add(50, scope("crio-conmon-aaa"), same_netns_as=1)  # CRI-O's conmon, host netns
    proc.add(55, scope("odd-helper"), same_netns_as=1)  # unknown helper: host netns, skipped
    proc.add(60, scope("cri-containerd-pause"))
    proc.drop_netns(60)  # exiting: skipped
    proc.add(70, scope("cri-containerd-pause"))
    proc.add(80, scope("cri-containerd-app"), same_netns_as=70)
    loc = locator(proc, mount)
    found = loc.locate(pod())
    assert found == PodPlacement(str(proc.root / "70" / "ns" / "net"), mount / POD, 70)
    assert found.netns == found.netns_path and found.cgroup == found.cgroup_path

    proc.exit(70)  # the pause process went; the app container shares the same netns
    found = loc.locate(pod())
    assert found is not None and found.pid == 80
    assert os.path.samefile(found.netns_path, proc.root / "80" / "ns" / "net")


def test_not_there_yet_and_unusable_workloads(proc: FakeProc, tmp_path: Path) -> None:
    loc = locator(proc, tmp_path / "cgroup")
    assert loc.locate(pod()) is None  # nothing of that pod runs yet
    proc.add(70, scope("cri-containerd-pause"))
    assert loc.locate(pod("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d")) is None  # another pod
    with pytest.raises(LocateError, match=r"shop/x has no Kubernetes pod UID"):
        loc.locate(Workload(name="x", namespace="shop"))


def test_pids_that_vanish_during_the_scan_are_skipped(proc: FakeProc, tmp_path: Path) -> None:
    proc.add(70, scope("cri-containerd-pause"))
    loc = KubernetesLocator(proc=proc.root, cgroup_mount=tmp_path,
                            pids=lambda: [*proc.pids(), 5, 99999])
    found = loc.locate(pod())
    assert found is not None and found.pid == 70


def test_private_cgroup_namespace_paths_are_resolved(proc: FakeProc, tmp_path: Path) -> None:
    mount = tmp_path / "cgroup"
    (mount / POD).mkdir(parents=True)
    tail = POD.split("/", 1)[1]  # what a process in another pod sees below "/../.."
    proc.add(70, f"0::/../../{tail}/cri-containerd-pause.scope\n")
    found = locator(proc, mount).locate(pod())
    assert found is not None and found.cgroup_path == mount / POD
    (mount / POD).rmdir()
    found = locator(proc, mount).locate(pod())
    assert found is not None and found.pid == 70 and found.cgroup_path is None


def test_on_this_host_no_process_belongs_to_an_unknown_pod() -> None:
    # The real /proc, real psutil: scanning every process works and finds nothing for a UID
    # no pod here has.
    assert KubernetesLocator().locate(pod("00000000-0000-4000-8000-000000000000")) is None
