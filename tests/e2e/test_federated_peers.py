"""Federated trust domains on the test bed: node1 is another mesh (trust domain partner.example,
its own central CA); node0 federates with it through a SPIFFE bundle in a ConfigMap-style
directory, and its policy names the partner principal. Removing the bundle makes the same
connection fail the handshake; restoring it lets it through again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.agents import live_mesh
from support.centralca import CentralCa, wait_for

from agent.commands.demo import _run_client
from agent.testbed import Cluster

NAMESPACES = """
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
kind: Namespace
metadata: {name: tools, labels: {istio.io/dataplane-mode: ambient}}
"""
BACKEND = """
---
kind: Workload
metadata: {name: backend, namespace: shop, labels: {app: backend}}
spec: {serviceAccount: backend, ips: [10.251.0.11], node: node0}
"""
# node0's view: its own workloads and a policy naming one partner principal. The partner's
# workloads are not in its state (another cluster's), only their certificates identify them.
MESH0 = NAMESPACES + BACKEND + """
---
kind: Workload
metadata: {name: frontend, namespace: shop, labels: {app: frontend}}
spec: {serviceAccount: frontend, ips: [10.251.0.10], node: node0}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend-allow, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/frontend", "partner.example/ns/tools/sa/client"]
    to:
    - operation: {ports: ["8080"]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
"""
# node1's view (the partner mesh): its two workloads and the destination it calls.
MESH1 = NAMESPACES + BACKEND + """
---
kind: Workload
metadata: {name: client, namespace: tools}
spec: {serviceAccount: client, ips: [10.251.1.10], node: node1, trustDomain: partner.example}
---
kind: Workload
metadata: {name: other, namespace: tools}
spec: {serviceAccount: other, ips: [10.251.1.11], node: node1, trustDomain: partner.example}
"""
PARTNER = ["spiffe://partner.example/ns/tools/sa/client",
           "spiffe://partner.example/ns/tools/sa/other"]


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "agent.cli", *args], check=True,
                         capture_output=True, text=True)
    return out.stdout


def test_federated_peer_reaches_a_policy_named_destination_until_its_bundle_goes(
        tmp_path: Path) -> None:
    work = tmp_path
    partner = work / "partner"  # the other mesh's CA (its key never leaves this directory)
    partner.mkdir(mode=0o700)
    ca = CentralCa(work, partner / "root.pem", partner / "root-key.pem",
                   trust_domain="partner.example", node=1)
    cli("ca", "init", "--trust-domain", "partner.example", "--root-cert", str(ca.root_cert),
        "--root-key", str(ca.root_key))
    (work / "tokens.yaml").write_text(json.dumps({"t-node1": "node1"}))
    (work / "placement.yaml").write_text(json.dumps({"node1": PARTNER}))
    (work / "token-node1").write_text("t-node1")
    (work / "mesh-n1.yaml").write_text(MESH1)
    partner_root = work / "partner-root.pem"  # what node1's agent is given
    partner_root.write_text(ca.root_cert.read_text())
    fed0, fed1 = work / "federation-n0", work / "federation-n1"  # ConfigMap mounts
    fed0.mkdir()
    fed1.mkdir()
    (fed0 / "partner.example.json").write_text(cli("ca", "bundle", "--root-cert",
                                                   str(ca.root_cert)))

    def start_ca(c: Cluster) -> None:
        # Runs once the bed is up: the partner CA in node1's netns; our root exists by now.
        ca.cluster = c
        ca.start()
        (fed1 / "cluster.local.json").write_text(
            cli("ca", "bundle", "--root-cert", str(work / "ca" / "root-cert.pem")))

    def per_node(i: int) -> list[str]:
        if i == 0:
            return ["--federated-bundle", str(fed0)]
        assert ca.cluster is not None
        return ["--config", str(work / "mesh-n1.yaml"), "--trust-domain", "partner.example",
                "--ca-address", ca.address, "--ca-root-cert", str(partner_root),
                "--ca-token", str(work / "token-node1"), "--federated-bundle", str(fed1)]

    with live_mesh(work, "federation", mesh_text=MESH0, per_node=per_node,
                   before_agents=start_ca) as live:
        try:
            c = live.cluster
            backend = str(c.pod(0, 1).ip)

            def call(pod: int) -> str:
                return _run_client(c.pod(1, pod), backend, 8080, "x")

            # The partner principal the policy names gets through; another partner identity,
            # equally well authenticated, is refused by policy (kernel: EPERM or reset).
            assert call(0).startswith("OK backend got"), live.log(0) + live.log(1)
            assert not call(1).startswith("OK"), live.log(0)
            # Both hold certificates of the partner root (nothing from ours).
            assert "issued spiffe://partner.example/ns/tools/sa/client for node node1" in \
                ca.log(1)
            # Remove the bundle: the same connection now fails the TLS handshake at node0.
            os.unlink(fed0 / "partner.example.json")
            wait_for(lambda: not call(0).startswith("OK"), "the partner to be refused",
                     lambda: live.log(0)[-3000:])
            wait_for(lambda: "rejected HBONE connection from 10.251.1.10" in live.log(0),
                     "node0 to log the refused handshake", lambda: live.log(0)[-3000:])
            # Put it back: trusted again, without restarting anything.
            (fed0 / "partner.example.json").write_text(cli("ca", "bundle", "--root-cert",
                                                           str(ca.root_cert)))
            wait_for(lambda: call(0).startswith("OK backend got"), "the partner to be let in",
                     lambda: live.log(0)[-3000:])
        finally:
            if ca.proc is not None:
                ca.stop()
