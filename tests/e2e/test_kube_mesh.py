"""Agents on the Kubernetes source, meshing the test bed: one `nodemesh run` per node, each
watching the same test API server (reached over the underlay, as a real cluster's agents reach
kube-apiserver), enrolling its own node's pods and dialing the other node's over HBONE."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prereq import require_root
from pyroute2 import IPRoute
from support.apiserver import ApiServer, Kubectl
from support.mesh import LoopThread

from agent.commands.demo import MARKER, SERVER, Sniffer, _run_client, http_get
from agent.config import DEFAULT_PIN_ROOT
from agent.datapath.datapath import Datapath
from agent.datapath.options import BuildOptions
from agent.host import netns
from agent.runtime.certs import load_or_create_authority
from agent.sources.kubernetes import RESOURCES
from agent.testbed import Cluster, PodProcess

WATCHES = 2 * len(RESOURCES)  # two agents, one watch per resource type each

API_IP = "10.250.0.250"  # on the underlay bridge; the test bed gives nodes .10 and up
TOKEN = "agent-token"
NS = "mesh"


def ready_status(node: Any) -> tuple[int, str]:
    """(HTTP status, body) of the agent's /healthz/ready; (0, error) while it is not up."""
    try:
        with netns.entered(node.netns):
            s = socket.create_connection(("127.0.0.1", 15021), timeout=2)
        with s:
            s.sendall(b"GET /healthz/ready HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError as e:
        return 0, str(e)
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body.strip()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


@dataclass
class KubeBed:
    cluster: Cluster
    loop: LoopThread
    server: ApiServer
    kubectl: Kubectl
    work: Path
    agents: list[PodProcess] = field(default_factory=list)

    def k(self, coro: Any) -> Any:
        return self.loop.run(coro)

    def log(self, node: int) -> str:
        return (self.work / f"agent-n{node}.log").read_text()

    def flows(self, node: int) -> list[dict[str, Any]]:
        path = self.work / f"flows-n{node}.log"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]

    def status(self, node: int) -> tuple[int, str]:
        return ready_status(self.cluster.nodes[node])

    def wait_status(self, node: int, code: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.status(node)[0] != code:
            assert time.monotonic() < deadline, (
                f"agent {node} never answered {code}: {self.status(node)}\n{self.log(node)}")
            time.sleep(0.1)

    def start_agents(self, *extra: str) -> None:
        c = self.cluster
        kubeconfig = self.work / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "bed",
            "clusters": [{"name": "bed", "cluster": {"server": self.server.url}}],
            "users": [{"name": "agent", "user": {"token": TOKEN}}],
            "contexts": [{"name": "bed", "context": {"cluster": "bed", "user": "agent"}}],
        }))
        ca_cert = self.work / "ca" / "root-cert.pem"
        load_or_create_authority(ca_cert, ca_cert.with_name("root-key.pem"), "cluster.local")
        for node in c.nodes:
            with (self.work / f"agent-n{node.index}.log").open("w") as log:
                self.agents.append(node.spawn(
                    [sys.executable, "-m", "agent.cli", "run", "--log-format", "text",
                     "--source", "kubernetes", "--kubeconfig", str(kubeconfig),
                     "--node-name", f"node{node.index}", "--testbed-run", c.run_id,
                     "--cgroup-root", str(node.cgroup_root), "--pin-dir", str(self.pin(node.index)),
                     "--ca-root-cert", str(ca_cert),
                     "--flow-log", str(self.work / f"flows-n{node.index}.log"), *extra],
                    stdout=log, stderr=subprocess.STDOUT))

    def pin(self, node: int) -> Path:
        return DEFAULT_PIN_ROOT / f"kube-{self.cluster.run_id}-n{node}"

    def pod(self, node: int, index: int, name: str, account: str, ip: bool = True) -> None:
        p = self.cluster.pod(node, index)
        self.k(self.kubectl.pod(NS, name, f"node{node}", ip=str(p.ip) if ip else None,
                                service_account=account))


@contextmanager
def kube_bed(tmp_path: Path, pods_per_node: int = 1) -> Iterator[KubeBed]:
    require_root()
    with Cluster(nodes=2, pods_per_node=pods_per_node, description="kube mesh test") as c:
        with IPRoute(netns=c.plan.underlay_ns) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="br0")[0], address=API_IP, prefixlen=24)
        loop = LoopThread()
        server = ApiServer(token=TOKEN, host=API_IP, netns=c.plan.underlay_ns)
        bed: KubeBed | None = None
        try:
            loop.run(server.__aenter__())
            kubectl = Kubectl(server)
            loop.run(kubectl.__aenter__())
            bed = KubeBed(c, loop, server, kubectl, tmp_path)
            bed.k(kubectl.create("namespaces", {"metadata": {
                "name": NS, "labels": {"istio.io/dataplane-mode": "ambient"}}}))
            yield bed
        finally:
            if bed is not None:
                for a in bed.agents:
                    a.stop(grace=10)
                for n in c.nodes:
                    Datapath(c.nodes[0].cgroup_root, BuildOptions(pin_dir=bed.pin(n.index))
                             ).uninstall()
                loop.run(bed.kubectl.__aexit__(None, None, None))
            loop.run(server.__aexit__(None, None, None))
            loop.stop()


def strict(bed: KubeBed) -> None:
    bed.k(bed.kubectl.create("peerauthentications", {
        "metadata": {"namespace": NS, "name": "default"}, "spec": {"mtls": {"mode": "STRICT"}}}))


def test_pod_to_pod_across_nodes_is_carried_over_hbone(tmp_path: Path) -> None:
    """The pod on node1 is known to node0's agent from the API server alone, so node0 dials it
    over HBONE with its identity: the destination's tunnel reports the connection as mutual TLS,
    a STRICT destination accepts it, and the underlay never carries the payload in clear."""
    with kube_bed(tmp_path) as bed:
        c = bed.cluster
        strict(bed)
        bed.pod(0, 0, "client", "client")
        bed.pod(1, 0, "server", "server")
        bed.start_agents()
        for i in (0, 1):
            bed.wait_status(i, 200)
        dump = json.loads(http_get(c.nodes[0].netns, 15000, "/config_dump") or "{}")
        assert set(dump["workloads"]) == {f"{NS}/client", f"{NS}/server"}
        # One watch per resource type per agent, pods unfiltered (every node's).
        wait_for(lambda: bed.loop.call(lambda: bed.server.open_watches) == WATCHES,
                 f"{WATCHES} watches")
        watched = bed.loop.call(lambda: list(bed.server.watch_log))
        assert sorted(w.resource for w in watched) == sorted(
            ["pods", "namespaces", "services", "endpointslices", "authorizationpolicies",
             "peerauthentications", "connectionratelimits"] * 2)
        assert {w.field_selector for w in watched} == {""}
        assert [e["workload"] for e in dump["enrolled"].values()] == [f"{NS}/client"]

        server = c.pod(1, 0).python(SERVER, "server", "8080", stdout=subprocess.PIPE)
        assert server.popen is not None and server.popen.stdout is not None
        server.popen.stdout.readline()
        sniffers = [Sniffer(n.netns) for n in c.nodes]
        try:
            payload = MARKER.decode() * 4
            out = _run_client(c.pod(0, 0), str(c.pod(1, 0).ip), 8080, payload)
        finally:
            for sn in sniffers:
                sn.stop()
        assert out == f"OK server got {len(payload)} bytes from {c.pod(0, 0).ip}", out
        metrics = http_get(c.nodes[0].netns, 15020, "/metrics") or ""
        # The source's counters are on the agent's /metrics: one ADDED per pod of the cluster.
        assert 'nodemesh_kube_events_total{resource="pods",type="ADDED"} 2.0' in metrics
        assert sum(s.frames for s in sniffers) > 0
        assert sum(s.seen for s in sniffers) == 0, "the payload crossed the underlay in clear"

        def closed(node: int, reporter: str) -> list[dict[str, Any]]:
            return [r for r in bed.flows(node) if r["kind"] == "close"
                    and r["reporter"] == reporter and r["destination"]["port"] == 8080]

        wait_for(lambda: bool(closed(1, "destination") and closed(0, "source")), "flow records")
        for rec in closed(1, "destination") + closed(0, "source"):
            assert rec["tunneled"] is True and rec["connection_security_policy"] == "mutual_tls"
            assert rec["source"]["principal"].endswith(f"/ns/{NS}/sa/client"), rec
            assert rec["destination"]["workload"] == "server", rec


def test_ready_only_after_the_first_lists_and_every_local_pod_is_enrolled(
        tmp_path: Path) -> None:
    """A slow first list and a pod without an IP yet: 503 throughout, 200 once the lists are
    in and the pod is enrolled."""
    with kube_bed(tmp_path) as bed:
        c = bed.cluster
        bed.pod(0, 0, "late", "late", ip=False)  # scheduled; the sandbox is not up yet
        bed.server.hold_lists()
        bed.start_agents()
        bed.wait_status(0, 503)
        assert "first list" in bed.status(0)[1]
        time.sleep(2)  # the agent keeps reconciling meanwhile; it must not call that ready
        assert bed.status(0)[0] == 503, bed.status(0)
        bed.loop.call(bed.server.release_lists)
        wait_for(lambda: "enrollment pending" in bed.status(0)[1], "lists applied")
        assert bed.status(0) == (503, f"enrollment pending: {NS}/late: no pod IP yet (the pod "
                                      "sandbox is not up)")
        time.sleep(2)
        assert bed.status(0)[0] == 503
        ip = str(c.pod(0, 0).ip)
        bed.k(bed.kubectl.patch("pods", NS, "late", {
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}, "status"))
        bed.wait_status(0, 200)
        dump = json.loads(http_get(c.nodes[0].netns, 15000, "/config_dump") or "{}")
        assert [e["workload"] for e in dump["enrolled"].values()] == [f"{NS}/late"]


def test_unready_during_an_api_server_outage_while_enforcement_goes_on(tmp_path: Path) -> None:
    """The API server stops: after the grace period the agent is unready, traffic is enforced
    exactly as before (allowed stays allowed over HBONE, denied stays denied); the server comes
    back on the same address and the agent is ready again."""
    with kube_bed(tmp_path, pods_per_node=2) as bed:
        c = bed.cluster
        strict(bed)
        bed.pod(0, 0, "client", "client")
        bed.pod(0, 1, "other", "other")
        bed.pod(1, 0, "server", "server")
        # Mesh-wide, from a custom root namespace: applies to the server in namespace mesh only
        # if the agent honours --root-namespace.
        bed.k(bed.kubectl.namespace("mesh-root"))
        bed.k(bed.kubectl.authorization_policy("mesh-root", "server-allow-client", {
            "selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/{NS}/sa/client"]}}]}],
        }))
        bed.start_agents("--source-grace", "3", "--root-namespace", "mesh-root")
        for i in (0, 1):
            bed.wait_status(i, 200)
        server = c.pod(1, 0).python(SERVER, "server", "8080", stdout=subprocess.PIPE)
        assert server.popen is not None and server.popen.stdout is not None
        server.popen.stdout.readline()
        target = str(c.pod(1, 0).ip)

        def enforced() -> tuple[str, str]:
            allowed = _run_client(c.pod(0, 0), target, 8080, "x")
            denied = _run_client(c.pod(0, 1), target, 8080, "x")
            return allowed.split(" ")[0], denied.split(" ")[0]

        before = enforced()
        assert before == ("OK", "ERR"), before
        bed.loop.run(bed.server.stop_serving())
        down_at = time.monotonic()
        for i in (0, 1):
            bed.wait_status(i, 503)
            assert "failing for" in bed.status(i)[1]
        assert time.monotonic() - down_at >= 3  # not before the grace period
        assert enforced() == before
        bed.loop.run(bed.server.start_serving())
        for i in (0, 1):
            bed.wait_status(i, 200)
        assert enforced() == before
        # The outage was logged at WARNING, not as a forbidden grant.
        assert "forbidden" not in bed.log(0).lower()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
