"""Kubernetes source: a policy object update -> the agent's policy compiled, with 10k rules.

The test API server (tests/support/apiserver.py) runs in its own process with a namespace in the
mesh, a client and a server pod on this node and an ALLOW AuthorizationPolicy of `rules` rules on
the server (one rule per principal, as benchmarks/meshfile.with_rules). It then replaces a DENY
policy over HTTP (as `kubectl apply` would), alternating its principal between the client's and
one nobody has, and notes CLOCK_MONOTONIC before each request. This process runs what the agent
runs (KubernetesSource -> KubernetesStateSink -> StateStore -> PolicyCompiler in a worker
thread, as agent/runtime/node.py) and notes when a compile of a state with the new DENY ends.
The kernel map write is not included (no BPF here; benchmarks/policy_update.py includes it for the
file source: a few ms for this change).

`python -m benchmarks.kube_policy_update --rules 10000 --reps 10` prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.datapath.identities import IdentityTable
from agent.datapath.policymap import PolicyCompiler
from agent.sources.k8sstate import KubernetesStateSink
from agent.sources.kube.config import explicit
from agent.sources.kubernetes import KubernetesSource
from agent.state.snapshot import MeshState
from agent.state.store import StateStore
from benchmarks.kube_sync import api_server_process

ROOT = Path(__file__).resolve().parents[1]
CLIENT = "cluster.local/ns/shop/sa/client"
NOBODY = "cluster.local/ns/shop/sa/nobody"

# Runs in the server process: seed, print the URL, then one DENY replacement per stdin line
# (its principal), answering with the monotonic time the request was sent.
SERVER = r"""
import asyncio, json, logging, sys, time
from support.apiserver import ApiServer, Kubectl

RULES = int(sys.argv[1])
logging.getLogger("aiohttp").setLevel(logging.CRITICAL)

def pod(name, ip):
    return ({"metadata": {"namespace": "shop", "name": name, "labels": {"app": name}},
             "spec": {"nodeName": "node0", "serviceAccountName": name,
                      "containers": [{"name": "app", "image": "registry.example/app:1"}]}},
            {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
             "conditions": [{"type": "Ready", "status": "True"}]})

def policy(name, action, principals):
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"namespace": "shop", "name": name},
            "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": action,
                     "rules": [{"from": [{"source": {"principals": [p]}}]} for p in principals]}}

async def main():
    async with ApiServer(token="bench") as server, Kubectl(server) as kubectl:
        server.put("namespaces", {"metadata": {"name": "shop",
                   "labels": {"istio.io/dataplane-mode": "ambient"}}})
        server.put("pods", *pod("client", "10.64.0.1"))
        server.put("pods", *pod("server", "10.64.0.2"))
        callers = [f"cluster.local/ns/shop/sa/caller-{i}" for i in range(RULES - 1)]
        server.put("authorizationpolicies",
                   policy("allow-many", "ALLOW", ["cluster.local/ns/shop/sa/client", *callers]))
        server.put("authorizationpolicies", policy("deny-client", "DENY", ["%s"]))
        print(json.dumps({"url": server.url}), flush=True)
        loop = asyncio.get_running_loop()
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            t0 = time.monotonic()
            await kubectl.replace("authorizationpolicies", policy("deny-client", "DENY", [line]))
            print(t0, flush=True)

asyncio.run(main())
""".replace("%s", NOBODY)


def _denied_principal(state: MeshState) -> str | None:
    for p in state.policy_set.authorization:
        if p.key == "shop/deny-client":
            return next((sm.value for r in p.rules for m in r.all_matches()
                         for sm in m.principals), None)
    return None


async def _run(server: subprocess.Popen[str], url: str, reps: int) -> list[float]:
    store = StateStore()
    source = KubernetesSource(explicit(url, token="bench"), "node0", KubernetesStateSink(store))
    compiler = PolicyCompiler(IdentityTable())
    loop = asyncio.get_running_loop()
    dirty = asyncio.Event()

    def changed(_old: MeshState, _new: MeshState) -> None:
        loop.call_soon_threadsafe(dirty.set)

    store.subscribe(changed)
    compiled: asyncio.Queue[tuple[float, str | None]] = asyncio.Queue()

    async def compile_loop() -> None:  # what NodeAgent.run does on each store change
        while True:
            await dirty.wait()
            dirty.clear()
            state = store.current
            await asyncio.to_thread(compiler.compile, state.policy_set, state.workloads)
            compiled.put_nowait((time.monotonic(), _denied_principal(state)))

    tasks = [asyncio.create_task(source.run()), asyncio.create_task(compile_loop())]
    try:
        await source.wait_synced()
        while (await compiled.get())[1] != NOBODY:
            pass
        return [await _change(server, compiled, CLIENT if i % 2 == 0 else NOBODY)
                for i in range(2 * reps)]
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def _change(server: subprocess.Popen[str],
                  compiled: asyncio.Queue[tuple[float, str | None]], principal: str) -> float:
    """Seconds from the request that names `principal` in the DENY to its compile's end."""
    assert server.stdin is not None and server.stdout is not None
    while not compiled.empty():
        compiled.get_nowait()
    server.stdin.write(principal + "\n")
    server.stdin.flush()
    line = await asyncio.get_running_loop().run_in_executor(None, server.stdout.readline)
    t0 = float(line)
    while True:
        at, denied = await compiled.get()
        if denied == principal:
            return at - t0


def measure(rules: int, reps: int) -> dict[str, Any]:
    with api_server_process(SERVER, rules) as (server, info):
        secs = asyncio.run(_run(server, info["url"], reps))
    return {"rules": rules, "changes": len(secs), "median_s": statistics.median(secs),
            "min_s": min(secs), "max_s": max(secs), "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kube_policy_update", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.rules, args.reps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
