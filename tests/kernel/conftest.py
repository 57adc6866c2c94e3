"""Kernel-tier fixtures: one test-bed node and one installed datapath per session (one compile)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prereq import require_root, requires

from agent.datapath.datapath import Datapath
from agent.datapath.options import DEFAULT_PIN_ROOT, BuildOptions
from agent.testbed import Cluster


@pytest.fixture(scope="session")
def kcluster() -> Iterator[Cluster]:
    require_root()
    requires(Path("/sys/fs/bpf").is_mount(), "bpffs is not mounted at /sys/fs/bpf")
    with Cluster(nodes=1, pods_per_node=4, description="kernel tests") as c:
        yield c


@pytest.fixture(scope="session")
def datapath(kcluster: Cluster) -> Iterator[Datapath]:
    opts = BuildOptions(pin_dir=DEFAULT_PIN_ROOT / f"test-{kcluster.run_id}")
    dp = Datapath(kcluster.nodes[0].cgroup_root, opts)
    try:
        dp.install()
        # The tests' stand-ins for the tunnel run as node processes (the node's sys cgroup),
        # as the real agent does; only they may use the tunnel mark.
        dp.trust_cgroup(kcluster.nodes[0].cgroup)
        yield dp
    finally:
        dp.uninstall()


@pytest.fixture
def clean_policy(datapath: Datapath) -> Iterator[Datapath]:
    datapath.apply_policy({}, {})
    subs = list(datapath._subscribers)
    yield datapath
    datapath._subscribers[:] = subs
    datapath.apply_policy({}, {})
    for cookie in list(datapath.enrolled()):
        datapath.unenroll(cookie)
    datapath.set_exclusions()
