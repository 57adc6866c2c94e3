"""The compiled-module cache never hands out a module that Datapath.uninstall() has closed."""

from __future__ import annotations

import shutil

import pytest

from agent.datapath.bccloader import compile_module
from agent.datapath.datapath import Datapath
from agent.datapath.options import BuildOptions
from agent.testbed import Cluster

pytestmark = pytest.mark.kernel


def test_uninstall_evicts_the_cached_module(kcluster: Cluster) -> None:
    opts = BuildOptions(pin_dir=kcluster.pin_dir(0, "modcache"), max_pods=16, max_policy=64,
                        max_ipcache=64, max_conns=64, max_services=16, max_backends=64)
    dp = Datapath(kcluster.nodes[0].cgroup_root, opts)
    try:
        first = compile_module(opts)
        assert compile_module(opts) is first  # equal options share one module while it is open
        dp._module = first
        dp.uninstall()
        second = compile_module(opts)
        try:
            assert second is not first
            assert second.map_fd("nm_enrolled_v1") >= 0  # a live module, maps and all
        finally:
            second.close()
        assert compile_module(opts, cached=False) is not second
    finally:
        dp.uninstall()
        shutil.rmtree(opts.pin_dir, ignore_errors=True)
