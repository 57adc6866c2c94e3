"""The measured test bed: a 2-node cluster where the same kind of pod pair is reached three ways.

  no mesh   node0 pod1 -> node1 pod1, direct (neither pod is enrolled)
  nodemesh  node0 pod0 -> node1 pod0, both enrolled: connect4 capture, HBONE tunnel, policy
  Envoy     node0 pod1 -> 127.0.0.1 (Envoy client) -> HBONE -> Envoy server in node1 pod1

One `nodemesh run` agent per node (as `nodemesh demo` starts them) stays up for the whole run, so
the no-mesh pair also passes the agent's cgroup programs, which let unenrolled pods through after
one netns-cookie lookup (benchmarks/connect_cost.py measures that cost on its own).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent.commands.demo import _start_agents, _wait_ready, http_get
from agent.config import DEFAULT_PIN_ROOT
from agent.datapath.datapath import Datapath
from agent.datapath.options import BuildOptions
from agent.host import netns
from agent.testbed import Cluster
from agent.testbed.cluster import Node, Place, Pod, PodProcess
from benchmarks import envoy, meshfile, programs

BULK_PORT = 5201  # iperf3
ECHO_PORT = 7000
MODES = ("no-mesh", "nodemesh", "envoy")
ENVOY_CLIENT_ID = f"spiffe://cluster.local/ns/{meshfile.NAMESPACE}/sa/envoy-client"
ENVOY_SERVER_ID = f"spiffe://cluster.local/ns/{meshfile.NAMESPACE}/sa/envoy-server"


class BedError(RuntimeError):
    """The test bed (agents, Envoy, servers) could not be brought up."""


@dataclass
class Route:
    """How a client pod reaches the server side in one mode."""

    mode: str
    client: Pod
    ip: str
    bulk_port: int
    echo_port: int
    proxies: list[PodProcess] = field(default_factory=list)


def sysctls(place: Place, values: dict[str, str]) -> None:
    # /proc/sys/net resolves against the calling thread's netns at open time.
    with netns.entered(place.netns):
        for key, value in values.items():
            Path(f"/proc/sys/{key}").write_text(value, encoding="ascii")


# Connection-per-request runs open tens of thousands of connections: let TIME_WAIT ports be reused
# and widen the ephemeral range, in every netns that originates connections.
CONN_SYSCTLS = {
    "net/ipv4/tcp_tw_reuse": "1",
    "net/ipv4/ip_local_port_range": "1024 65000",
}


# Envoy's BoringSSL always picks AES-128-GCM for TLS 1.3 and offers no setting to change that;
# OpenSSL (the agents) prefers AES-256-GCM and Python's ssl cannot set TLS 1.3 suites either. An
# OpenSSL config file given to the agents alone makes both tunnels use the same suite.
OPENSSL_SUITE = "TLS_AES_128_GCM_SHA256"
_OPENSSL_CONF = f"""openssl_conf = nodemesh_bench
[nodemesh_bench]
ssl_conf = nodemesh_bench_ssl
[nodemesh_bench_ssl]
system_default = nodemesh_bench_tls
[nodemesh_bench_tls]
Ciphersuites = {OPENSSL_SUITE}
"""


def start_agents(c: Cluster, config: Path, work: Path, prefix: str,
                 extra: tuple[str, ...] = ()) -> tuple[list[PodProcess], list[Path]]:
    """One agent per node (demo's helper) with `extra` arguments; the pins are returned so the
    caller removes them."""
    pins = [DEFAULT_PIN_ROOT / f"{prefix}-{c.run_id}-n{n.index}" for n in c.nodes]
    conf = work / "openssl-bench.cnf"
    conf.write_text(_OPENSSL_CONF, encoding="ascii")
    env = {**os.environ, "OPENSSL_CONF": str(conf)}
    agents = _start_agents(c, argparse.Namespace(config=config), work, pins, extra, env=env)
    for node in c.nodes:
        if not _wait_ready(node, 15021, timeout=120):
            log = (work / f"agent-n{node.index}.log").read_text()[-3000:]
            raise BedError(f"agent on node{node.index} not ready; its log:\n{log}")
    return agents, pins


def stop_agents(c: Cluster, agents: list[PodProcess], pins: list[Path]) -> None:
    for a in agents:
        a.stop(grace=10)
    for pin in pins:
        Datapath(c.nodes[0].cgroup_root, BuildOptions(pin_dir=pin)).uninstall()


def config_dump(node: Node) -> dict[str, Any]:
    text = http_get(node.netns, 15000, "/config_dump")
    if text is None:
        raise BedError(f"node{node.index}: the agent's admin endpoint does not answer")
    dump: dict[str, Any] = json.loads(text)
    return dump


def nodemesh_cipher(c: Cluster, ca_dir: Path, work: Path) -> str:
    """The TLS 1.3 suite the agent's HBONE listener picks for a Python (OpenSSL) client, i.e.
    what two agents negotiate with each other."""
    cert, key = envoy.issue(ca_dir, ENVOY_CLIENT_ID, work, "cipher-probe")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(str(ca_dir / "root-cert.pem"))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2"])
    # From node1's netns: the node's own sockets are not captured, and it routes to the pod.
    with c.nodes[1].socket() as raw:
        raw.settimeout(5)
        raw.connect((str(c.pod(1, 0).ip), 15008))
        with ctx.wrap_socket(raw) as tls:
            got = tls.cipher()
    return got[0] if got else "unknown"


def wait_listening(pod: Pod, port: int, proc: PodProcess | None = None,
                   timeout: float = 10) -> None:
    """Until a listener on `port` exists in the pod (asked of `ss`: a test connect would count as
    a client to iperf3); BedError at once if `proc`, the server meant to listen, has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and (code := proc.poll()) is not None:
            raise BedError(f"the server for port {port} in {pod.netns} exited ({code})")
        out = subprocess.run(
            ["ip", "netns", "exec", pod.netns, "ss", "-Hltn", f"sport = :{port}"],
            capture_output=True, check=False,
        ).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise BedError(f"nothing listens on port {port} in {pod.netns}")


IPERF_BIND_TRIES = 5


@dataclass
class Bed:
    cluster: Cluster
    work: Path
    mesh_file: Path
    agents: list[PodProcess]
    envoys: list[envoy.Envoy]
    routes: dict[str, Route]
    servers: dict[str, PodProcess]
    ciphers: dict[str, list[str]]

    def server_pod(self, route: Route) -> Pod:
        """Where the route's servers run: node1, pod0 meshed, pod1 for the other modes."""
        return self.cluster.pod(1, 0 if route.mode == "nodemesh" else 1)

    def iperf_server(self, route: Route) -> PodProcess:
        """A one-off iperf3 server (-1) in the route's server pod: every run starts clean.

        The previous run's accepted sockets can still hold the port for a moment after a 100-
        stream run (seen: "Address already in use"), so a server that fails on that is started
        again, a bounded number of times."""
        pod = self.server_pod(route)
        log = self.work / f"iperf3-server-{route.mode}.log"
        for attempt in range(IPERF_BIND_TRIES):
            start = log.stat().st_size if log.exists() else 0
            with log.open("ab") as out:
                proc = pod.spawn(["iperf3", "-s", "-1", "-p", str(BULK_PORT)],
                                 stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_listening(pod, BULK_PORT, proc)
                return proc
            except BedError as e:
                proc.stop()
                output = log.read_bytes()[start:].decode(errors="replace")
                if "Address already in use" in output and attempt + 1 < IPERF_BIND_TRIES:
                    time.sleep(1.0)
                    continue
                raise BedError(f"{e}; iperf3 server output:\n{output[-800:]}") from e
        raise AssertionError("unreachable: the last attempt returns or raises")


def cpu_seconds(procs: list[PodProcess]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(p.pid)
            for q in (proc, *proc.children(recursive=True)):
                t = q.cpu_times()
                total += t.user + t.system
    return total


@contextlib.contextmanager
def bring_up(work: Path, workers: int = 1) -> Iterator[Bed]:
    """The three routes with `workers` data-plane workers per agent and as many Envoy worker
    threads (the same CPU parallelism for both tunnels)."""
    mesh_file = work / "mesh.yaml"
    mesh_file.write_text(meshfile.pair())
    with Cluster(nodes=2, pods_per_node=2, description="nodemesh benchmarks") as c:
        for pod in c.pods:
            sysctls(pod, CONN_SYSCTLS)
        agents: list[PodProcess] = []
        pins: list[Path] = []
        envoys: list[envoy.Envoy] = []
        try:
            agents, pins = start_agents(c, mesh_file, work, "bench", ("--workers", str(workers)))
            dump = config_dump(c.nodes[0])
            if len(dump["enrolled"]) != 1:
                raise BedError(f"node0 enrolled {dump['enrolled']}, expected only the client pod")
            servers = {}
            for pod in (c.pod(1, 0), c.pod(1, 1)):
                servers[f"echo-{pod.name}"] = programs.start_ready(
                    pod, programs.ECHO_SERVER, str(ECHO_PORT)
                )
            ca = work / "ca"
            plain_src, plain_dst = c.pod(0, 1), c.pod(1, 1)
            scert, skey = envoy.issue(ca, ENVOY_SERVER_ID, work, "envoy-server")
            ccert, ckey = envoy.issue(ca, ENVOY_CLIENT_ID, work, "envoy-client")
            envoys.append(envoy.start(
                plain_dst, "hbone-server.yaml", work, workers,
                listen_ip=plain_dst.ip, cert=scert, key=skey, ca=ca / "root-cert.pem",
            ))
            envoys.append(envoy.start(
                plain_src, "hbone-client.yaml", work, workers,
                bulk_listen=envoy.BULK_LISTEN, echo_listen=envoy.ECHO_LISTEN,
                bulk_target=f"{plain_dst.ip}:{BULK_PORT}",
                echo_target=f"{plain_dst.ip}:{ECHO_PORT}",
                peer_ip=plain_dst.ip, peer_identity=ENVOY_SERVER_ID,
                cert=ccert, key=ckey, ca=ca / "root-cert.pem",
            ))
            routes = {
                "no-mesh": Route("no-mesh", plain_src, str(plain_dst.ip), BULK_PORT, ECHO_PORT),
                "nodemesh": Route("nodemesh", c.pod(0, 0), str(c.pod(1, 0).ip), BULK_PORT,
                                  ECHO_PORT, list(agents)),
                "envoy": Route("envoy", plain_src, "127.0.0.1", envoy.BULK_LISTEN,
                               envoy.ECHO_LISTEN, [e.proc for e in envoys]),
            }
            bed = Bed(c, work, mesh_file, agents, envoys, routes, servers, {})
            # One exchange per mode so the Envoys' TLS counters exist before reading ciphers.
            for r in routes.values():
                programs.run_json(r.client, programs.PINGPONG, r.ip, str(r.echo_port), "10", "0")
            bed.ciphers = {
                "nodemesh": [nodemesh_cipher(c, ca, work)],
                "envoy": sorted({s for e in envoys for s in e.ciphers()}),
            }
            yield bed
        finally:
            for e in envoys:
                e.proc.stop()
            stop_agents(c, agents, pins)


__all__ = ["MODES", "Bed", "BedError", "Route", "bring_up", "cpu_seconds"]
