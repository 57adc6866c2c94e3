"""`nodemesh ca serve | init | node-cert | issue` end to end on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from cryptography import x509
from support.apiserver import ApiServer, Kubectl

from agent.cli import main
from agent.identity import pki
from agent.identity.caclient import CaClient
from agent.identity.caerror import CaError
from agent.identity.spiffe import Identity, from_certificate

FE = Identity("cluster.local", "shop", "frontend")


@pytest.fixture
def ca_process(tmp_path: Path):  # type: ignore[no-untyped-def]  # generator fixture
    (tmp_path / "tokens.yaml").write_text("secret-n1: n1\n")
    (tmp_path / "workloads.yaml").write_text(f"n1: [{FE.uri}]\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "ca", "serve", "--listen", "127.0.0.1:0",
         "--root-cert", str(tmp_path / "root.pem"), "--root-key", str(tmp_path / "root.key"),
         "--tokens", str(tmp_path / "tokens.yaml"),
         "--workloads", str(tmp_path / "workloads.yaml"), "--max-ttl", "2h"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def test_serve_generates_root_and_issue_prints_chain(
        ca_process: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert stat.S_IMODE(os.stat(tmp_path / "root.key").st_mode) == 0o600
    (tmp_path / "token").write_text("secret-n1\n")
    argv = ["ca", "issue", "--ca", ca_process, "--ca-root", str(tmp_path / "root.pem"),
            "--identity", FE.uri, "--token-file", str(tmp_path / "token"), "--ttl", "1h",
            "--key-out", str(tmp_path / "fe.key")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    chain = pki.certs_from_pem(out)
    root = pki.certs_from_pem((tmp_path / "root.pem").read_bytes())[0]
    assert from_certificate(chain[0]) == FE
    assert chain[-1] == root
    assert "PRIVATE KEY" not in out
    assert stat.S_IMODE(os.stat(tmp_path / "fe.key").st_mode) == 0o600
    key = pki.key_from_pem((tmp_path / "fe.key").read_bytes())
    assert key.public_key() == chain[0].public_key()

    # Over the configured --max-ttl: refused, with the CA's reason on stderr.
    assert main([*argv[:-2], "--ttl", "3h"]) == 1
    assert "requested TTL 10800s exceeds the CA's maximum of 7200s" in capsys.readouterr().err


def test_node_cert_command(tmp_path: Path) -> None:
    authority = pki.Authority.generate("cluster.local")
    (tmp_path / "ca.pem").write_text(pki.cert_to_pem(authority.root))
    (tmp_path / "ca.key").write_bytes(pki.key_to_pem(authority.key))
    assert main(["ca", "node-cert", "--root-cert", str(tmp_path / "ca.pem"),
                 "--root-key", str(tmp_path / "ca.key"), "--node", "n7",
                 "--cert-out", str(tmp_path / "n7.pem"),
                 "--key-out", str(tmp_path / "n7.key")]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "n7.pem").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier) == [
            "spiffe://cluster.local/nodemesh/node/n7"]
    cert.verify_directly_issued_by(authority.root)
    assert stat.S_IMODE(os.stat(tmp_path / "n7.key").st_mode) == 0o600
    with pytest.raises(SystemExit, match="is missing"):
        main(["ca", "node-cert", "--root-cert", str(tmp_path / "ca.pem"),
              "--root-key", str(tmp_path / "nope.key"), "--node", "n7",
              "--cert-out", str(tmp_path / "x.pem"), "--key-out", str(tmp_path / "x.key")])


async def cluster_for_ca(server: ApiServer, k: Kubectl, tmp_path: Path) -> Path:
    """Two nodes' agents, a web pod on node0, the CA's ServiceAccount (an auth-delegator) and
    a kubeconfig with its token."""
    for ns in ("nodemesh-system", "app"):
        await k.namespace(ns)
    for ns, sa in (("nodemesh-system", "nodemesh"), ("nodemesh-system", "nodemesh-ca"),
                   ("app", "web")):
        await k.service_account(ns, sa)
    await k.node("node0")
    await k.pod("nodemesh-system", "agent-0", "node0", service_account="nodemesh")
    await k.pod("nodemesh-system", "agent-1", "node1", service_account="nodemesh")
    await k.pod("app", "web-0", "node0", service_account="web")
    server.bind_cluster_role("system:auth-delegator",
                             "system:serviceaccount:nodemesh-system:nodemesh-ca")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "ca",
        "clusters": [{"name": "test", "cluster": {"server": server.url}}],
        "users": [{"name": "ca", "user": {
            "token": server.mint_token("nodemesh-system", "nodemesh-ca")}}],
        "contexts": [{"name": "ca", "context": {"cluster": "test", "user": "ca"}}]}))
    return kubeconfig


def test_init_writes_a_root_once(tmp_path: Path) -> None:
    cert, key = tmp_path / "root-cert.pem", tmp_path / "root-key.pem"
    assert main(["ca", "init", "--root-cert", str(cert), "--root-key", str(key)]) == 0
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    root = x509.load_pem_x509_certificate(cert.read_bytes())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    before = key.read_bytes()
    with pytest.raises(SystemExit, match="not overwriting"):
        main(["ca", "init", "--root-cert", str(cert), "--root-key", str(key)])
    assert key.read_bytes() == before


def test_serve_kube_authenticates_agents_by_token_and_authorizes_by_node(
        tmp_path: Path) -> None:
    """`nodemesh ca serve --kube` as a process, as the CA Deployment runs it: kubeconfig with
    its own ServiceAccount token, TokenReview, the pod watch, /metrics and the audit log."""
    web = Identity("cluster.local", "app", "web")

    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            kubeconfig = await cluster_for_ca(server, k, tmp_path)
            main(["ca", "init", "--root-cert", str(tmp_path / "root-cert.pem"),
                  "--root-key", str(tmp_path / "root-key.pem")])
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.cli", "ca", "serve", "--kube",
                "--kubeconfig", str(kubeconfig), "--listen", "127.0.0.1:0",
                "--root-cert", str(tmp_path / "root-cert.pem"),
                "--root-key", str(tmp_path / "root-key.pem"),
                "--metrics-listen", "127.0.0.1:0", "--audit-log", str(tmp_path / "audit.log"),
                stdout=subprocess.PIPE)
            try:
                assert proc.stdout is not None
                line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
                assert line.startswith("listening on "), line
                address = line.split()[-1]
                metrics = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
                assert metrics.startswith("metrics on "), metrics
                root = (tmp_path / "root-cert.pem").read_text()

                async def issue(pod: str) -> Identity:
                    token = server.mint_token("nodemesh-system", "nodemesh", ("istio-ca",),
                                              pod=pod)
                    client = CaClient(address, root, token=token, cluster_id="Kubernetes")
                    try:
                        return (await client.issue(web)).identity
                    finally:
                        await client.close()

                # Until the pod cache's first list, the CA answers UNAVAILABLE; then it works.
                async with asyncio.timeout(30):
                    while True:
                        try:
                            assert await issue("agent-0") == web
                            break
                        except CaError as e:
                            assert e.reason == "unavailable", e
                            await asyncio.sleep(0.1)
                with pytest.raises(CaError, match="is not scheduled on node node1") as err:
                    await issue("agent-1")
                assert err.value.reason == "permission_denied"
                entries = [json.loads(x) for x in
                           (tmp_path / "audit.log").read_text().splitlines()]
                assert entries[-1]["reason"] == "not_on_node" and entries[-1]["node"] == "node1"
                async with aiohttp.ClientSession() as http, http.get(
                        f"http://{metrics.split()[-1]}/metrics") as r:
                    text = await r.text()
                assert ('nodemesh_ca_csr_refusals_total{code="PERMISSION_DENIED",'
                        'reason="not_on_node"} 1.0') in text
                assert "nodemesh_ca_certificates_issued_total 1.0" in text
                assert [r for r, _ in server.token_reviews] and all(
                    r == "system:serviceaccount:nodemesh-system:nodemesh-ca"
                    for r, _ in server.token_reviews)
            finally:
                proc.terminate()
                await proc.wait()

    asyncio.run(body())
