"""Recognising pod processes from /proc/<pid>/cgroup text, as kubelets of both drivers write it."""

from __future__ import annotations

import pytest

from agent.enroll.podcgroup import (
    is_runtime_helper,
    kubelet_match,
    pod_uid_of,
    subtree_match,
    unified_path,
)

UID = "7f9c6e2a-5b1d-4c3e-8a9f-0b1c2d3e4f5a"
U_ = UID.replace("-", "_")
OTHER = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
CID = "3c8a1f0e9d7b6a5c4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d"

# (the /proc/<pid>/cgroup text, the pod cgroup kubelet_match(UID) should give)
PROC_CGROUP = {
    "systemd burstable, containerd": (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice/"
        f"cri-containerd-{CID}.scope\n",
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice"),
    "systemd besteffort, CRI-O": (
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice/"
        f"crio-{CID}.scope\n",
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice"),
    "systemd guaranteed": (
        f"0::/kubepods.slice/kubepods-pod{U_}.slice/cri-containerd-{CID}.scope\n",
        f"/kubepods.slice/kubepods-pod{U_}.slice"),
    "cgroupfs burstable": (
        f"0::/kubepods/burstable/pod{UID}/{CID}\n", f"/kubepods/burstable/pod{UID}"),
    "cgroupfs besteffort": (
        f"0::/kubepods/besteffort/pod{UID}/{CID}\n", f"/kubepods/besteffort/pod{UID}"),
    "cgroupfs guaranteed": (f"0::/kubepods/pod{UID}/{CID}\n", f"/kubepods/pod{UID}"),
    "hybrid host (v1 controllers listed first)": (
        f"12:pids:/kubepods/burstable/pod{UID}/{CID}\n"
        f"4:memory:/kubepods/burstable/pod{UID}/{CID}\n"
        f"1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n"
        f"0::/kubepods/burstable/pod{UID}/{CID}\n",
        f"/kubepods/burstable/pod{UID}"),
    "private cgroup namespace (agent in a pod)": (
        f"0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice/"
        f"cri-containerd-{CID}.scope\n",
        f"/../../kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice"),
}

NOT_THE_POD = {
    "another pod": f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                   f"{OTHER.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n",
    "another pod, cgroupfs": f"0::/kubepods/besteffort/pod{OTHER}/{CID}\n",
    "a UID that only starts the same": f"0::/kubepods/pod{UID}0/{CID}\n",
    "system service": "0::/system.slice/containerd.service\n",
    "login session": "0::/user.slice/user-1000.slice/session-2.scope\n",
    "init": "0::/init.scope\n",
    "v1-only pod, v2 at the root": f"1:name=systemd:/kubepods/pod{UID}/{CID}\n0::/\n",
}


@pytest.mark.parametrize("case", sorted(PROC_CGROUP))
def test_kubelet_layouts_match_the_pod(case: str) -> None:
    text, pod_cgroup = PROC_CGROUP[case]
    path = unified_path(text)
    assert path is not None
    assert kubelet_match(UID)(path) == pod_cgroup
    assert pod_uid_of(path) == UID
    assert kubelet_match(OTHER)(path) is None


@pytest.mark.parametrize("case", sorted(NOT_THE_POD))
def test_other_processes_do_not_match(case: str) -> None:
    path = unified_path(NOT_THE_POD[case])
    assert path is not None
    assert kubelet_match(UID)(path) is None


def test_pod_uid_of_other_paths() -> None:
    assert pod_uid_of(f"/kubepods/besteffort/pod{OTHER}/{CID}") == OTHER
    assert pod_uid_of("/system.slice/containerd.service") is None
    # A "pod..." directory outside the kubelet's tree is not a pod cgroup.
    assert pod_uid_of(f"/machine.slice/pod{UID}/x") is None


def test_unified_path_needs_cgroup_v2() -> None:
    assert unified_path("12:pids:/kubepods/x\n1:name=systemd:/kubepods/x\n") is None
    assert unified_path("0::/\n") == "/"


def test_runtime_helpers() -> None:
    conmon = (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice/"
              f"crio-conmon-{CID}.scope")
    assert is_runtime_helper(conmon)
    assert kubelet_match(UID)(conmon) is not None  # in the pod's cgroup, yet not the pod
    assert not is_runtime_helper(conmon.replace("crio-conmon-", "crio-"))


def test_subtree_match_for_the_test_bed_layout() -> None:
    match = subtree_match("/nm-abc123/n0/p1")
    assert match("/nm-abc123/n0/p1") == "/nm-abc123/n0/p1"
    assert match("/nm-abc123/n0/p1/app") == "/nm-abc123/n0/p1"
    assert match("/nm-abc123/n0/p10") is None
    assert match("/nm-abc123/n1/p1") is None
    assert match("/nm-abc123/n0") is None
    assert subtree_match("nm-abc123/n0/p1/")("/nm-abc123/n0/p1") == "/nm-abc123/n0/p1"


def test_malformed_uid_is_refused() -> None:
    with pytest.raises(ValueError, match="not a Kubernetes pod UID"):
        kubelet_match("../x")
