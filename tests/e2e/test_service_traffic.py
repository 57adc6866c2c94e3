"""Services end to end: two `nodemesh run` agents, a Service with three endpoints (two on the
other node), load-balanced in the kernel at connect() and carried over HBONE.

The client's payloads start with a marker; a raw capture on both nodes' underlay must never see
it. Each endpoint's server tags the connection first, then answers with the length and SHA-256
of what it received, so every payload is verified end to end.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prereq import require_root
from prometheus_client.parser import text_string_to_metric_families

from agent.commands.demo import MARKER, Sniffer, _start_agents, _wait_ready, http_get
from agent.config import DEFAULT_PIN_ROOT
from agent.datapath.datapath import Datapath
from agent.datapath.options import BuildOptions
from agent.testbed import Cluster, PodProcess

VIP, PORT = "10.96.0.50", 80
# name -> (node, pod index, named port "http" of the endpoint)
ENDPOINTS = {"web-0": (0, 1, 8080), "web-1": (1, 0, 8081), "web-2": (1, 1, 8080)}

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
kind: Workload
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {serviceAccount: client, ips: [10.251.0.10], node: node0}
""" + "".join(f"""---
kind: Workload
metadata: {{name: {name}, namespace: shop, labels: {{app: web}}}}
spec: {{serviceAccount: web, ips: [10.251.{n}.{10 + j}], node: node{n}, ports: {{http: {port}}}}}
""" for name, (n, j, port) in ENDPOINTS.items()) + """---
kind: Service
metadata: {name: web, namespace: shop}
spec: {vips: [10.96.0.50], ports: [{port: 80, targetPort: http, name: http}], selector: {app: web}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
"""

SERVER = """
import hashlib, socket, sys, threading
tag, port = sys.argv[1], int(sys.argv[2])
srv = socket.create_server(("0.0.0.0", port))
print("ready", flush=True)
def handle(c):
    with c:
        c.sendall(f"{tag}\\n".encode())
        h, n = hashlib.sha256(), 0
        while d := c.recv(65536):
            h.update(d)
            n += len(d)
        c.sendall(f"{n} {h.hexdigest()}".encode())
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

# n connects to the VIP, each with its own payload, verified by length and digest.
CONNECTS = """
import hashlib, json, os, socket, sys
ip, port, n, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
out = []
for _ in range(n):
    payload = marker + os.urandom(2000)
    try:
        s = socket.create_connection((ip, port), timeout=10)
        f = s.makefile("rb")
        tag = f.readline().decode().strip()
        peer, me = s.getpeername(), s.getsockname()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        ok = f.read().decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
        out.append({"tag": tag, "ok": ok, "peer": f"{peer[0]}:{peer[1]}", "local": me[0]})
        f.close()
        s.close()
    except OSError as e:
        out.append({"error": str(e)})
print(json.dumps(out))
"""

# A long transfer to one endpoint: connect to the VIP until it lands there, send a little,
# report, wait for a line on stdin, send the rest, verify the endpoint got every byte.
LONG = """
import hashlib, json, os, socket, sys
ip, port, want, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].encode()
for attempt in range(300):
    s = socket.create_connection((ip, port), timeout=60)
    f = s.makefile("rb")
    if f.readline().decode().strip() == want:
        break
    f.close()
    s.close()
else:
    raise SystemExit("never reached " + want)
h, n = hashlib.sha256(), 0
def send(chunks):
    global n
    for _ in range(chunks):
        chunk = marker + os.urandom(65536)
        s.sendall(chunk)
        h.update(chunk)
        n += len(chunk)
send(8)
print(json.dumps({"attempts": attempt + 1}), flush=True)
sys.stdin.readline()
send(128)
s.shutdown(socket.SHUT_WR)
print(json.dumps({"ok": f.read().decode() == f"{n} {h.hexdigest()}", "bytes": n}), flush=True)
"""


def samples(text: str, name: str, **labels: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def start_server(c: Cluster, name: str) -> PodProcess:
    n, j, port = ENDPOINTS[name]
    proc = c.pod(n, j).python(SERVER, name, str(port), stdout=subprocess.PIPE)
    assert proc.popen is not None and proc.popen.stdout is not None
    assert proc.popen.stdout.readline().strip() == b"ready"
    return proc


@contextmanager
def running_mesh(tmp_path: Path, extra: tuple[str, ...] = ()
                 ) -> Iterator[tuple[Cluster, Path, Path, dict[str, PodProcess]]]:
    require_root()
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH)
    with Cluster(nodes=2, pods_per_node=2, description="services e2e") as c:
        pins = [DEFAULT_PIN_ROOT / f"svc-{c.run_id}-n{n.index}" for n in c.nodes]
        agents = _start_agents(c, argparse.Namespace(config=mesh), tmp_path, pins, extra)
        servers: dict[str, PodProcess] = {}
        try:
            for node in c.nodes:
                assert _wait_ready(node, 15021), (tmp_path / f"agent-n{node.index}.log").read_text()
            for name in ENDPOINTS:
                servers[name] = start_server(c, name)
            yield c, mesh, tmp_path, servers
        finally:
            for p in servers.values():
                p.stop()
            for a in agents:
                a.stop(grace=10)
            for pin in pins:
                Datapath(c.nodes[0].cgroup_root, BuildOptions(pin_dir=pin)).uninstall()


@pytest.fixture
def service_mesh(tmp_path: Path) -> Iterator[tuple[Cluster, Path, Path]]:
    # These tests follow each connection to its endpoint's tunnel over HBONE; web-0 shares the
    # client's node, where the same-node bypass would carry it (test_same_node_bypass.py).
    with running_mesh(tmp_path, ("--same-node-bypass", "off")) as (c, mesh, work, _servers):
        yield c, mesh, work


def connects(c: Cluster, n: int) -> list[dict[str, object]]:
    proc = c.pod(0, 0).python(CONNECTS, VIP, str(PORT), str(n), MARKER.decode(),
                              stdout=subprocess.PIPE)
    assert proc.popen is not None
    out, _ = proc.popen.communicate(timeout=300)
    return list(json.loads(out.decode().strip().splitlines()[-1]))


def destination_opens(c: Cluster) -> dict[str, float]:
    """Connections each endpoint's node tunnel accepted over mTLS, by destination workload."""
    out: dict[str, float] = collections.defaultdict(float)
    for node in c.nodes:
        text = http_get(node.netns, 15020, "/metrics")
        assert text is not None
        for name in ENDPOINTS:
            out[name] += samples(text, "istio_tcp_connections_opened_total",
                                 reporter="destination", destination_workload=name,
                                 connection_security_policy="mutual_tls")
    return out


def pool_counts(c: Cluster) -> dict[str, float]:
    """The client node's tunnel pool counters, as scraped."""
    text = http_get(c.nodes[0].netns, 15020, "/metrics")
    assert text is not None
    return {name: samples(text, f"nodemesh_hbone_{name}_total")
            for name in ("connections_opened", "streams_opened", "dial_failures")}


def lb_table(c: Cluster) -> list[str]:
    dump = http_get(c.nodes[0].netns, 15000, "/config_dump")
    assert dump is not None
    return list(json.loads(dump)["datapath"]["services"].get(f"{VIP}:{PORT}", []))


def wait_table(c: Cluster, want: set[str], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while set(lb_table(c)) != want:
        assert time.monotonic() < deadline, f"load balancer never became {want}: {lb_table(c)}"
        time.sleep(0.1)


def test_service_traffic_is_balanced_over_three_endpoints_on_two_nodes_over_hbone(
        service_mesh: tuple[Cluster, Path, Path]) -> None:
    c, _mesh, _work = service_mesh
    client = c.pod(0, 0)
    before = destination_opens(c)
    pool_before = pool_counts(c)
    sniffers = [Sniffer(n.netns) for n in c.nodes]
    try:
        results = connects(c, 300)
    finally:
        for sn in sniffers:
            sn.stop()
    assert all(r.get("ok") is True for r in results), [r for r in results if not r.get("ok")][:3]
    assert {r["peer"] for r in results} == {f"{VIP}:{PORT}"}  # the app sees the VIP
    assert {r["local"] for r in results} == {str(client.ip)}  # and its own pod address
    per = collections.Counter(str(r["tag"]) for r in results)
    assert set(per) == set(ENDPOINTS)
    assert all(0.15 <= n / 300 <= 0.55 for n in per.values()), per
    time.sleep(1.0)  # the destination tunnels' close-side bookkeeping
    after = destination_opens(c)
    # every connection arrived at its endpoint's tunnel over HBONE (mTLS), none bypassed it
    assert {k: after[k] - before[k] for k in ENDPOINTS} == {k: float(per[k]) for k in ENDPOINTS}
    assert sum(s.frames for s in sniffers) > 0
    assert sum(s.seen for s in sniffers) == 0  # no plaintext on the underlay
    # the client node's pool carried (at least) every connection to the other node as a stream
    pool_after = pool_counts(c)
    remote = sum(per[k] for k, (n, _j, _p) in ENDPOINTS.items() if n != 0)
    assert remote > 0 and pool_after["streams_opened"] - pool_before["streams_opened"] >= remote
    assert pool_after["connections_opened"] >= 1
    assert pool_after["dial_failures"] == pool_before["dial_failures"]


def test_an_unready_endpoint_gets_no_new_connections_while_an_established_one_completes(
        service_mesh: tuple[Cluster, Path, Path]) -> None:
    c, mesh, _work = service_mesh
    all_backends = {f"10.251.{n}.{10 + j}:{p}" for n, j, p in ENDPOINTS.values()}
    wait_table(c, all_backends)
    long = c.pod(0, 0).python(LONG, VIP, str(PORT), "web-1", MARKER.decode(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert long.popen is not None and long.popen.stdin and long.popen.stdout
    try:
        assert "attempts" in json.loads(long.popen.stdout.readline())
        # web-1 stops being ready (file edit): new connects skip it within one update
        mesh.write_text(MESH.replace("ports: {http: 8081}}", "ports: {http: 8081}, ready: false}"))
        wait_table(c, all_backends - {"10.251.1.10:8081"})
        results = connects(c, 60)
        assert all(r.get("ok") is True for r in results), results[:3]
        assert {str(r["tag"]) for r in results} == {"web-0", "web-2"}
        # the transfer to web-1 that was established before goes on to the last byte
        long.popen.stdin.write("go\n")
        long.popen.stdin.flush()
        done = json.loads(long.popen.stdout.readline())
        assert done["ok"] is True and done["bytes"] == 136 * (len(MARKER) + 65536)
    finally:
        long.stop()
    # ready again: back in selection
    mesh.write_text(MESH)
    wait_table(c, all_backends)
    assert "web-1" in {str(r["tag"]) for r in connects(c, 60)}


# Outlier detection: a first ejection long enough for the checks made while it lasts (30 s,
# Envoy's default) and short enough for the test to see the endpoint return.
FAILURES, EJECTION = 3, 30.0


def test_an_endpoint_that_refuses_is_ejected_and_returns_after_the_backoff(
        tmp_path: Path) -> None:
    """web-1's server dies: connects the kernel sends there fail (its node's tunnel answers
    503), after FAILURES in a row the source agent ejects it, the connections that follow all
    land on the others; the server comes back and, after the backoff, so does web-1."""
    extra = ("--outlier-failures", str(FAILURES), "--outlier-ejection", str(EJECTION))
    with running_mesh(tmp_path, extra) as (c, _mesh, work, servers):
        all_backends = {f"10.251.{n}.{10 + j}:{p}" for n, j, p in ENDPOINTS.values()}
        web1 = "10.251.1.10:8081"
        wait_table(c, all_backends)
        servers.pop("web-1").stop()
        failed = 0
        deadline = time.monotonic() + 120
        while web1 in lb_table(c):
            assert time.monotonic() < deadline, "web-1 was never ejected"
            results = connects(c, 6)
            failed += sum(1 for r in results if r.get("ok") is not True)
            assert all(r.get("tag") in ("web-0", "web-2") for r in results if r.get("ok"))
        assert failed >= FAILURES
        # Ejected: every connection that follows lands on the two that accept.
        results = connects(c, 30)
        assert all(r.get("ok") is True for r in results), [r for r in results if not r.get("ok")]
        assert {str(r["tag"]) for r in results} == {"web-0", "web-2"}
        text = http_get(c.nodes[0].netns, 15020, "/metrics") or ""
        assert samples(text, "nodemesh_endpoint_ejections_total", service="web.shop.svc."
                       "cluster.local", port="80", endpoint=web1) == 1
        assert samples(text, "nodemesh_endpoints_ejected", service="web.shop.svc."
                       "cluster.local", port="80") == 1
        records = [json.loads(x) for x in (work / "flows-n0.log").read_text().splitlines()]
        (ejecting,) = [r for r in records if r["ejected"]]
        assert (ejecting["service_address"], ejecting["response_flags"],
                f"{ejecting['destination']['ip']}:{ejecting['destination']['port']}") == (
            f"{VIP}:{PORT}", "CONNECT", web1)
        assert ejecting["destination"]["service"] == "web.shop.svc.cluster.local"
        # It accepts again; after the backoff it is back in selection.
        servers["web-1"] = start_server(c, "web-1")
        wait_table(c, all_backends, limit=EJECTION + 60)
        assert "web-1" in {str(r["tag"]) for r in connects(c, 60)}
