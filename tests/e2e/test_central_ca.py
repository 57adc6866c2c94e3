"""Real agents against a central `nodemesh ca serve` (no agent holds a signing key): the CA
restarts under continuous cross-node traffic, and the root is rotated under traffic following
docs/install.md ("Rotating the root")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from pyroute2 import IPRoute
from support.agents import LiveMesh, live_mesh
from support.apiserver import ApiServer, Kubectl
from support.centralca import CentralCa, wait_for
from support.mesh import LoopThread

from agent.commands.demo import _run_client, http_get
from agent.identity import pki
from agent.identity.spiffe import Identity
from agent.testbed import Cluster

API_IP = "10.250.0.250"  # on the underlay bridge; the test bed gives nodes .10 and up
SYS = "nodemesh-system"
TTL = 40  # seconds: renewals every ~20s, several during one test
DB: tuple[int, int, str, str] = (1, 0, "db", "5432")  # backend (node0) -> db (node1) is allowed
PLACEMENT = {"node0": ["spiffe://cluster.local/ns/shop/sa/frontend",
                       "spiffe://cluster.local/ns/shop/sa/backend"],
             "node1": ["spiffe://cluster.local/ns/shop/sa/db",
                       "spiffe://cluster.local/ns/tools/sa/default"]}


def fingerprint(pem: str | bytes) -> str:
    return pki.certs_from_pem(pem)[0].fingerprint(hashes.SHA256()).hex()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Traffic:
    """backend (node0) -> db (node1), one new connection after another, until stopped."""

    live: LiveMesh
    results: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _loop(self) -> None:
        c = self.live.cluster
        while not self._stop.is_set():
            self.results.append(_run_client(c.pod(0, 1), str(c.pod(1, 0).ip), 5432, "x"))

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def failures(self) -> list[str]:
        return [r for r in self.results if not r.startswith("OK db got")]


def dump(live: LiveMesh, node: int) -> dict[str, Any]:
    text = http_get(live.cluster.nodes[node].netns, 15000, "/config_dump")
    assert text is not None, live.log(node)
    out: dict[str, Any] = json.loads(text)
    return out


def certificates(live: LiveMesh) -> dict[str, dict[str, Any]]:
    """Every agent's current certificates by identity (each with the root it chains to)."""
    out: dict[str, dict[str, Any]] = {}
    for n in (0, 1):
        certs = dump(live, n)["certificates"]
        out.update({k: v for k, v in certs.items() if k != "trust_bundle"})
    return out


def bundles(live: LiveMesh) -> list[list[str]]:
    return [dump(live, n)["certificates"]["trust_bundle"] for n in (0, 1)]


@contextmanager
def kube_api(c: Cluster, work: Path, ca: CentralCa) -> Iterator[None]:
    """The test API server on the underlay, holding the bed's pods; each agent's token is a
    bound ServiceAccount token (audience istio-ca) of its pod, as the DaemonSet projects it,
    and the CA runs `--kube` with its own token (TokenReview, a watch of pods)."""
    with IPRoute(netns=c.plan.underlay_ns) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="br0")[0], address=API_IP, prefixlen=24)
    loop = LoopThread()
    server = ApiServer(token="admin-token", host=API_IP, netns=c.plan.underlay_ns)
    loop.run(server.__aenter__())
    try:
        async def populate() -> None:
            async with Kubectl(server) as k:
                for ns in (SYS, "shop", "tools"):
                    await k.namespace(ns)
                for ns, sa in ((SYS, "nodemesh"), (SYS, "nodemesh-ca"), ("shop", "frontend"),
                               ("shop", "backend"), ("shop", "db"), ("tools", "default")):
                    await k.service_account(ns, sa)
                for n in (0, 1):
                    await k.pod(SYS, f"agent-{n}", f"node{n}", ip=str(c.nodes[n].ip),
                                service_account="nodemesh")
                for uri in (u for ids in PLACEMENT.values() for u in ids):
                    ident = Identity.parse(uri)
                    node, pod = next((n, j) for n, ids in enumerate(PLACEMENT.values())
                                     for j, u in enumerate(ids) if u == uri)
                    await k.pod(ident.namespace, ident.service_account, f"node{node}",
                                ip=str(c.pod(node, pod).ip), service_account=ident.service_account)

        loop.run(populate())
        for n in (0, 1):
            token = loop.call(lambda n=n: server.mint_token(SYS, "nodemesh", ("istio-ca",),
                                                            pod=f"agent-{n}"))
            (work / f"token-node{n}").write_text(token)
        server.bind_cluster_role("system:auth-delegator",
                                 f"system:serviceaccount:{SYS}:nodemesh-ca")
        ca_token = loop.call(lambda: server.mint_token(SYS, "nodemesh-ca"))
        kubeconfig = work / "ca-kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "bed",
            "clusters": [{"name": "bed", "cluster": {"server": server.url}}],
            "users": [{"name": "ca", "user": {"token": ca_token}}],
            "contexts": [{"name": "bed", "context": {"cluster": "bed", "user": "ca"}}]}))
        ca.mode_args = ["--kube", "--kubeconfig", str(kubeconfig), "--cluster-id", "Kubernetes"]
        yield
    finally:
        loop.run(server.__aexit__(None, None, None))
        loop.stop()


@contextmanager
def central_mesh(work: Path, description: str, *, kube: bool = False
                 ) -> Iterator[tuple[LiveMesh, CentralCa]]:
    """Two agents whose certificates all come from a central CA; the CA's key lives in a
    directory no agent is told about, and the agents get only its root and a bearer token
    (static tokens, or with `kube` bound ServiceAccount tokens checked by TokenReview)."""
    private = work / "ca-private"
    private.mkdir(mode=0o700)
    ca = CentralCa(work, private / "root-a.pem", private / "root-a-key.pem")
    subprocess.run([sys.executable, "-m", "agent.cli", "ca", "init", "--root-cert",
                    str(ca.root_cert), "--root-key", str(ca.root_key)], check=True,
                   capture_output=True)
    (work / "ca").mkdir()
    write_atomic(work / "ca" / "root-cert.pem", ca.root_cert.read_text())
    tokens = {f"node{n}": os.urandom(16).hex() for n in (0, 1)}
    (work / "tokens.yaml").write_text(json.dumps({t: n for n, t in tokens.items()}))
    (work / "placement.yaml").write_text(json.dumps(PLACEMENT))
    for n, token in tokens.items():
        (work / f"token-{n}").write_text(token)

    api = ExitStack()

    def start_ca(c: Cluster) -> None:
        ca.cluster = c
        if kube:
            api.enter_context(kube_api(c, work, ca))
        ca.start()

    def per_node(i: int) -> list[str]:
        assert ca.cluster is not None
        return ["--ca-address", ca.address, "--ca-token", str(work / f"token-node{i}"),
                "--cert-ttl", str(TTL)]

    with live_mesh(work, description, servers=[DB], embedded_ca=False, before_agents=start_ca,
                   per_node=per_node) as live:
        try:
            yield live, ca
        finally:
            if ca.proc is not None:
                ca.stop()
            api.close()


def assert_no_agent_can_name_a_key(live: LiveMesh, ca: CentralCa) -> None:
    """Nothing the agents were given (argv, environment, config) is a private key, and no
    agent has the CA's key file open."""
    assert ca.root_key.exists() and ca.root_key.stat().st_mode & 0o077 == 0
    for node, agent in enumerate(live.agents):
        proc = Path(f"/proc/{agent.pid}")
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        env = [e.partition(b"=")[2] for e in (proc / "environ").read_bytes().split(b"\0")]
        config = dump(live, node)["config"]
        named = [a.decode() for a in argv + env if a] + [str(v) for v in config.values()]
        assert config["ca_address"] == ca.address
        for value in named:
            path = Path(value)
            if value.startswith("/") and path.is_file():
                assert b"PRIVATE KEY" not in path.read_bytes(), f"agent {node} is given {path}"
            assert "ca-private" not in value, f"agent {node} is told about {value}"
        for fd in (proc / "fd").iterdir():
            target = os.readlink(fd)
            assert "ca-private" not in target and not target.endswith("key.pem"), target


def test_central_ca_restart_under_traffic(tmp_path: Path) -> None:
    with central_mesh(tmp_path, "central CA restart") as (live, ca):
        assert_no_agent_can_name_a_key(live, ca)
        before = certificates(live)
        assert set(before) == {i for ids in PLACEMENT.values() for i in ids}
        root = fingerprint(ca.root_cert.read_text())
        assert {c["root"] for c in before.values()} == {root}
        with Traffic(live) as traffic:
            wait_for(lambda: len(traffic.results) >= 3, "first connections")
            ca.stop()
            # Down until a renewal has failed (at the latest half a TTL later): the agents keep
            # serving the certificates they have.
            wait_for(lambda: any("certificate for" in live.log(n) and "failed" in live.log(n)
                                 for n in (0, 1)), "a renewal to fail while the CA is down")
            down = len(traffic.results)
            time.sleep(3)
            ca.start()
            # Rotation resumes: the restarted CA signs renewals for both nodes.
            wait_for(lambda: all(f"for node node{n}" in ca.log(2) for n in (0, 1)),
                     "renewals from the restarted CA", lambda: ca.log(2))
            # ...and every identity's certificate is renewed again (within half a TTL).
            wait_for(lambda: all(certificates(live)[i]["serial"] != before[i]["serial"]
                                 for i in before), "every certificate to be renewed",
                     lambda: str(certificates(live)))
            wait_for(lambda: len(traffic.results) >= down + 3, "connections after the restart")
        assert traffic.failures() == [], traffic.failures()
        assert down >= 3 and len(traffic.results) > down
        print(f"CA restart: {len(traffic.results)} connections, none failed")
        assert_no_agent_can_name_a_key(live, ca)


def test_root_rotation_under_traffic(tmp_path: Path) -> None:
    """The documented procedure: bundle old+new everywhere, CA signs with new, every certificate
    re-issued from new, then old dropped; zero failed connections throughout."""
    with central_mesh(tmp_path, "root rotation") as (live, ca):
        bundle_file = tmp_path / "ca" / "root-cert.pem"
        old_pem = ca.root_cert.read_text()
        old = fingerprint(old_pem)
        new_cert, new_key = ca.root_cert.with_name("root-b.pem"), ca.root_key.with_name(
            "root-b-key.pem")
        with Traffic(live) as traffic:
            wait_for(lambda: len(traffic.results) >= 3, "first connections")
            # 1. a new root
            subprocess.run([sys.executable, "-m", "agent.cli", "ca", "init", "--root-cert",
                            str(new_cert), "--root-key", str(new_key)], check=True,
                           capture_output=True)
            new_pem = new_cert.read_text()
            new = fingerprint(new_pem)
            # 2. distribute old+new; wait until every agent trusts both
            write_atomic(bundle_file, old_pem + new_pem)
            wait_for(lambda: all(sorted(b) == sorted([old, new]) for b in bundles(live)),
                     "both agents to trust old and new roots", lambda: str(bundles(live)))
            # 3. the CA signs with the new root (a restart with the new key)
            ca.stop()
            ca.root_cert, ca.root_key = new_cert, new_key
            ca.start()
            # 4. every workload certificate is re-issued from the new root (within a TTL)
            wait_for(lambda: {c["root"] for c in certificates(live).values()} == {new},
                     "every certificate to chain to the new root", lambda: str(certificates(live)))
            mixed = len(traffic.results)
            # 5. drop the old root
            write_atomic(bundle_file, new_pem)
            wait_for(lambda: all(b == [new] for b in bundles(live)),
                     "both agents to drop the old root", lambda: str(bundles(live)))
            wait_for(lambda: len(traffic.results) >= mixed + 3, "connections after the drop")
        final = certificates(live)
        assert set(final) == {i for ids in PLACEMENT.values() for i in ids}
        assert {c["root"] for c in final.values()} == {new}, final
        assert traffic.failures() == [], traffic.failures()
        print(f"root rotation: {len(traffic.results)} connections, none failed")
        assert_no_agent_can_name_a_key(live, ca)


def test_istio_compatible_mode_bound_tokens_impersonation_and_cluster_id(tmp_path: Path) -> None:
    """What ztunnel sends istiod, against `ca serve --kube` (there is no istiod here): a bound
    ServiceAccount token of the agent's pod (TokenReview), ImpersonatedIdentity (without it the
    agent's ServiceAccount would get only its own identity) and clusterid (a CA of another
    cluster refuses it, naming the cluster the agent sent)."""
    with central_mesh(tmp_path, "central CA, kube mode", kube=True) as (live, ca):
        assert_no_agent_can_name_a_key(live, ca)
        assert set(certificates(live)) == {i for ids in PLACEMENT.values() for i in ids}
        c = live.cluster
        assert _run_client(c.pod(0, 1), str(c.pod(1, 0).ip), 5432, "x").startswith("OK db got")
        log = ca.log(1)
        for uri in (u for ids in PLACEMENT.values() for u in ids):
            assert uri in log
        ca.stop()
        assert ca.mode_args is not None
        ca.mode_args[-1] = "other-cluster"
        ca.start()
        wait_for(lambda: "caller is in cluster 'Kubernetes'" in ca.log(2),
                 "a renewal refused for its clusterid", lambda: ca.log(2))
        # The agents keep serving the certificates they have.
        assert _run_client(c.pod(0, 1), str(c.pod(1, 0).ip), 5432, "x").startswith("OK db got")
