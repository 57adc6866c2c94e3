"""Finding the agent's own cgroup (the one the kernel trusts with the tunnel mark)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.datapath import trust
from agent.datapath.layouts import TrustedEntry
from agent.host.cgroup import CgroupError

# A DaemonSet pod: its namespaced cgroupfs at /sys/fs/cgroup, and the host's hierarchy mounted
# first at /run/nodemesh/cgroupv2 (root outside the pod's cgroup namespace).
DAEMONSET = """\
700 650 0:30 /../../.. /run/nodemesh/cgroupv2 rw,nosuid - cgroup2 cgroup rw
701 650 0:30 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
"""


def test_the_namespaced_mount_wins_over_the_hosts() -> None:
    assert trust.cgroup2_ns_root(DAEMONSET) == Path("/sys/fs/cgroup")


def test_escaped_mount_points_are_decoded() -> None:
    text = r"41 31 0:38 / /mnt/cg\040two rw - cgroup2 cgroup2 rw" + "\n"
    assert trust.cgroup2_ns_root(text) == Path("/mnt/cg two")


def test_no_cgroup2_root_is_a_clear_error() -> None:
    with pytest.raises(CgroupError, match="no cgroup2 mount"):
        trust.cgroup2_ns_root("22 1 0:5 / /proc rw - proc proc rw\n")


def test_own_cgroup_is_this_processes_directory() -> None:
    own = trust.own_cgroup()
    assert own.is_dir()
    assert str(os.getpid()) in (own / "cgroup.procs").read_text().split()


def test_process_start_tells_a_reused_pid_apart() -> None:
    me = trust.this_process()
    assert trust.owner_alive(me)
    assert not trust.owner_alive(TrustedEntry(me.owner_pid, me.owner_start + 1))
