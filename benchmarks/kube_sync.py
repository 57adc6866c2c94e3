"""What cluster-wide pod knowledge costs an agent: memory per remote pod and initial sync time.

The test API server (tests/support/apiserver.py) runs in its own process with N pods spread
over 100 other nodes, each a realistic Pod (containers, env, volumes, probes, managedFields,
conditions: ~4 KB of JSON, like a Deployment's pod). This process runs what the agent runs for
the Kubernetes source (KubernetesSource -> KubernetesStateSink -> StateStore) and measures:

- sync time: from starting the source to every first list applied (`on_synced`), and to the
  state's IP index built (what the tunnel's first lookup pays), without tracemalloc;
- memory: Python heap still allocated after sync (tracemalloc, a second run), divided by N:
  the source's projected cache, the workloads in the state, the sink's bookkeeping, the IP
  index. The process RSS growth is reported too (it also holds freed-but-kept pages).

`python -m benchmarks.kube_sync --pods 10000` prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from agent.sources.k8sstate import KubernetesStateSink
from agent.sources.kube.config import explicit
from agent.sources.kubernetes import KubernetesSource
from agent.state.store import StateStore

ROOT = Path(__file__).resolve().parents[1]

# Runs in the server process: seed N pods, print the URL, serve until stdin closes.
SERVER = r"""
import asyncio, json, logging, sys
from support.apiserver import ApiServer

N = int(sys.argv[1])
logging.getLogger("aiohttp").setLevel(logging.CRITICAL)  # the benchmark cancels its watches

def pod(i):
    node, app = f"node{i % 100}", f"app{i % 500}"
    name = f"{app}-7d9f8b6c5d-{i:05d}"
    env = [{"name": f"VAR_{k}", "value": f"value-{k}"} for k in range(8)]
    return {
        "metadata": {"namespace": f"ns{i % 50}", "name": name,
                     "generateName": f"{app}-7d9f8b6c5d-",
                     "labels": {"app": app, "pod-template-hash": "7d9f8b6c5d", "version": "v1"},
                     "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z",
                                     "prometheus.io/scrape": "true"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                          "name": f"{app}-7d9f8b6c5d", "uid": "0" * 36,
                                          "controller": True, "blockOwnerDeletion": True}],
                     "managedFields": [{"manager": "kube-controller-manager",
                                        "operation": "Update", "apiVersion": "v1",
                                        "fieldsType": "FieldsV1",
                                        "fieldsV1": {"f:metadata": {"f:labels": {
                                            "f:app": {}, "f:pod-template-hash": {}}},
                                            "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {
                                                "f:image": {}, "f:env": {}}}}}}]},
        "spec": {"nodeName": node, "serviceAccountName": app,
                 "containers": [{"name": "app", "image": f"registry.example/{app}:1.2.3",
                                 "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                                 "env": env,
                                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                               "limits": {"memory": "256Mi"}},
                                 "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080},
                                                    "periodSeconds": 10},
                                 "volumeMounts": [{
                                     "name": "kube-api-access-abcde", "readOnly": True,
                                     "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                                 }]}],
                 "volumes": [{"name": "kube-api-access-abcde", "projected": {"sources": [
                     {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                     {"configMap": {"name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
                 "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
                 "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                                  "effect": "NoExecute", "tolerationSeconds": 300}]},
    }

def status(i):
    ip = f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}"
    cond = [{"type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
            for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")]
    return {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "10.0.0.1",
            "conditions": cond, "qosClass": "Burstable", "startTime": "2026-01-01T00:00:00Z",
            "containerStatuses": [{"name": "app", "ready": True, "restartCount": 0,
                                   "image": "registry.example/app:1.2.3",
                                   "imageID": "registry.example/app@sha256:" + "0" * 64,
                                   "containerID": "containerd://" + "0" * 64,
                                   "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}

async def main():
    async with ApiServer(token="bench") as server:
        for n in range(50):
            server.put("namespaces", {"metadata": {"name": f"ns{n}",
                       "labels": {"istio.io/dataplane-mode": "ambient"}}})
        for i in range(N):
            server.put("pods", pod(i), status(i))
        size = len(json.dumps(pod(0))) + len(json.dumps(status(0)))
        print(json.dumps({"url": server.url, "pod_json_bytes": size}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


class _Synced:
    def __init__(self, sink: KubernetesStateSink) -> None:
        self.sink = sink
        self.at = 0.0

    def on_event(self, resource: str, type: str, obj: dict[str, Any]) -> None:
        self.sink.on_event(resource, type, obj)

    def on_events(self, resource: str, changes: Sequence[tuple[str, dict[str, Any]]]) -> None:
        self.sink.on_events(resource, changes)

    def on_synced(self) -> None:
        self.at = time.perf_counter()
        self.sink.on_synced()


async def _sync(url: str) -> tuple[float, float, StateStore, KubernetesSource]:
    store = StateStore()
    sink = _Synced(KubernetesStateSink(store))
    source = KubernetesSource(explicit(url, token="bench"), "this-node", sink)
    start = time.perf_counter()
    task = asyncio.create_task(source.run())
    await source.wait_synced()
    store.current.workload_by_ip(next(iter(store.current.workloads)).ips[0])  # builds the index
    indexed = time.perf_counter()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return sink.at - start, indexed - start, store, source


@contextlib.contextmanager
def api_server_process(script: str, arg: int
                       ) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """The test API server in a process of its own (its work is not the agent's to measure),
    running `script` with `arg`; yields it and the JSON line it prints first (its URL, ...).
    Leaving closes its stdin, which stops it."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    server = subprocess.Popen([sys.executable, "-c", script, str(arg)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert server.stdout is not None
        yield server, json.loads(server.stdout.readline())
    finally:
        server.communicate(timeout=30)


def measure(pods: int) -> dict[str, Any]:
    with api_server_process(SERVER, pods) as (_server, info):
        synced, indexed, store, _source = asyncio.run(_sync(info["url"]))
        assert len(store.current.workloads) == pods, len(store.current.workloads)
        # A traced warm-up run first: one-time growth (the interned-string table, type caches)
        # is freed with it instead of counted against the pods of the measured run.
        tracemalloc.start()
        del store, _source
        asyncio.run(_sync(info["url"]))
        gc.collect()
        rss0 = psutil.Process().memory_info().rss
        base = tracemalloc.get_traced_memory()[0]
        _s, _i, store, source = asyncio.run(_sync(info["url"]))
        gc.collect()
        heap = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        rss = psutil.Process().memory_info().rss - rss0
        assert len(store.current.workloads) == pods and len(source.cache("pods")) == pods
        return {
            "pods": pods,
            "pod_json_bytes": info["pod_json_bytes"],
            "initial_sync_seconds": round(synced, 3),
            "sync_and_ip_index_seconds": round(indexed, 3),
            "heap_bytes_per_pod": round(heap / pods),
            "rss_growth_bytes_per_pod": round(rss / pods),
            "watches_per_resource": 1,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kube_sync", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pods", type=int, default=10_000)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.pods)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
