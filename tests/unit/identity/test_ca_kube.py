"""The central CA on Kubernetes, end to end over real HTTP and gRPC/TLS: node agents authenticate
with real bound ServiceAccount tokens (reviewed by the test API server's TokenReview, or checked
against its JWKS), and get certificates only for identities of pods on their own node (a cached
watch of pods). Every refusal has its status, a message naming the cause, a metric and an audit
line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from support.apiserver import ApiServer, Kubectl
from support.satokens import ISSUER, TokenAuthority

from agent.caauth.podindex import ClusterPodSource, PodIndex
from agent.caauth.tokenreview import (
    ApiTokenReviewer,
    JwksTokenVerifier,
    KubeTokenAuthenticator,
    TokenChecker,
)
from agent.identity import pki
from agent.identity.ca import CertificateAuthority, NodeAuthenticator
from agent.identity.caaudit import CaAudit
from agent.identity.caclient import CaClient
from agent.identity.caerror import CaError
from agent.identity.caserver import CaServer
from agent.identity.metrics import CaMetrics
from agent.identity.proto import (
    CREATE_CERTIFICATE_PATH,
    IMPERSONATED_IDENTITY,
    IstioCertificateRequest,
    IstioCertificateResponse,
)
from agent.identity.spiffe import Identity
from agent.sources.kube.config import explicit

TD = "cluster.local"
SYS = "nodemesh-system"
AGENT = Identity(TD, SYS, "nodemesh")
WEB = Identity(TD, "app", "web")  # a pod on node0
DB = Identity(TD, "app", "db")  # a pod on node1


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await body()

    asyncio.run(bounded())


@dataclass
class World:
    server: ApiServer
    kubectl: Kubectl
    pods: PodIndex
    ca: CertificateAuthority
    ca_server: CaServer
    metrics: CaMetrics
    address: str
    audit_path: Path

    @property
    def root_pem(self) -> str:
        return pki.cert_to_pem(self.ca.authority.root)

    def agent_token(self, pod: str, **kw: object) -> str:
        return self.server.mint_token(SYS, "nodemesh", ("istio-ca",), pod=pod,
                                      **kw)  # type: ignore[arg-type]

    def client(self, token: str) -> CaClient:
        return CaClient(self.address, self.root_pem, token=token)

    def refusals(self, code: str, reason: str) -> float:
        v = self.metrics.refusals.labels(code, reason)._value.get()  # type: ignore[attr-defined]
        return float(v)

    def audit(self) -> list[dict[str, object]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


@contextlib.asynccontextmanager
async def world(tmp_path: Path, *, jwks: bool = False, delegator: bool = True,
                cluster_id: str | None = None) -> AsyncIterator[World]:
    async with ApiServer() as server, Kubectl(server) as k:
        for ns in (SYS, "app"):
            await k.namespace(ns)
        for ns, sa in ((SYS, "nodemesh"), (SYS, "nodemesh-ca"), ("app", "web"), ("app", "db")):
            await k.service_account(ns, sa)
        # node0 has a Node object, so tokens of its pods carry the node claim; node1 has none,
        # so the CA finds node1's agent through its pod in the cache.
        await k.node("node0")
        await k.pod(SYS, "agent-0", "node0", ip="10.0.0.2", service_account="nodemesh")
        await k.pod(SYS, "agent-1", "node1", ip="10.0.1.2", service_account="nodemesh")
        await k.pod("app", "web-0", "node0", ip="10.0.0.10", service_account="web")
        await k.pod("app", "db-0", "node1", ip="10.0.1.10", service_account="db")
        if delegator:
            server.bind_cluster_role("system:auth-delegator",
                                     f"system:serviceaccount:{SYS}:nodemesh-ca")
        config = explicit(server.url, token=server.mint_token(SYS, "nodemesh-ca"))
        metrics = CaMetrics()
        pods = PodIndex(TD)
        checker: TokenChecker = (JwksTokenVerifier(config, ISSUER, server.url + "/openid/v1/jwks")
                                 if jwks else ApiTokenReviewer(config))
        auth = KubeTokenAuthenticator(checker, pods, [(SYS, "nodemesh")], TD, metrics)
        ca = CertificateAuthority(pki.Authority.generate(TD), pods, TD)
        audit_path = tmp_path / "ca-audit.log"
        audit = CaAudit(audit_path)
        ca_server = CaServer(ca, NodeAuthenticator({}, TD), token_auth=auth, metrics=metrics,
                             audit=audit, cluster_id=cluster_id)
        source = ClusterPodSource(config, pods)
        task = asyncio.create_task(source.run())
        port = await ca_server.start("127.0.0.1:0")
        try:
            await source.wait_synced()
            yield World(server, k, pods, ca, ca_server, metrics, f"127.0.0.1:{port}", audit_path)
        finally:
            await ca_server.stop(None)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await checker.close()
            audit.close()


async def issue(w: World, token: str, identity: Identity) -> str:
    client = w.client(token)
    try:
        cert = await client.issue(identity)
    finally:
        await client.close()
    return str(cert.identity)


async def refused(w: World, token: str, identity: Identity) -> CaError:
    with pytest.raises(CaError) as err:
        await issue(w, token, identity)
    return err.value


async def raw(w: World, token: str, identity: Identity,
              impersonate: str | None = None) -> IstioCertificateResponse:
    req = IstioCertificateRequest(csr=pki.build_csr(identity, pki.generate_key()),
                                  validity_duration=3600)
    if impersonate is not None:
        req.metadata.fields[IMPERSONATED_IDENTITY].string_value = impersonate
    creds = grpc.ssl_channel_credentials(w.root_pem.encode())
    async with grpc.aio.secure_channel(w.address, creds) as channel:
        call = channel.unary_unary(
            CREATE_CERTIFICATE_PATH, request_serializer=IstioCertificateRequest.SerializeToString,
            response_deserializer=IstioCertificateResponse.FromString)
        out: IstioCertificateResponse = await call(
            req, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        return out


@pytest.mark.unit
def test_node_agents_get_only_their_own_nodes_identities(tmp_path: Path) -> None:
    async def body() -> None:
        async with world(tmp_path) as w:
            t0, t1 = w.agent_token("agent-0"), w.agent_token("agent-1")
            assert await issue(w, t0, WEB) == str(WEB)
            # node1's agent: no node claim in its token, its node comes from its pod.
            assert await issue(w, t1, DB) == str(DB)
            e = await refused(w, t0, DB)
            assert e.reason == "permission_denied"
            assert f"identity {DB} is not scheduled on node node0" in str(e)
            e = await refused(w, t1, WEB)
            assert f"identity {WEB} is not scheduled on node node1" in str(e)
            assert w.refusals("PERMISSION_DENIED", "not_on_node") == 2
            lines = [a for a in w.audit() if a["reason"] == "not_on_node"]
            assert len(lines) == 2
            assert lines[0]["node"] == "node0" and lines[0]["requested_identity"] == DB.uri
            assert "system:serviceaccount:nodemesh-system:nodemesh" in str(lines[0]["caller"])
            assert lines[0]["code"] == "PERMISSION_DENIED"
            assert w.metrics.issued._value.get() == 2  # type: ignore[attr-defined]

            # The pod cache follows the cluster: web-0 leaves node0, node0 loses WEB.
            await w.kubectl.delete("pods", "app", "web-0")
            async with asyncio.timeout(10):
                while WEB in w.pods.identities_on_node("node0"):
                    await asyncio.sleep(0.02)
            e = await refused(w, t0, WEB)
            assert "is not scheduled on node node0" in str(e)
            # ... and a web pod scheduled to node1 makes it node1's.
            await w.kubectl.pod("app", "web-1", "node1", ip="10.0.1.11", service_account="web")
            async with asyncio.timeout(10):
                while WEB not in w.pods.identities_on_node("node1"):
                    await asyncio.sleep(0.02)
            assert await issue(w, t1, WEB) == str(WEB)
            # A finished pod runs nowhere.
            await w.kubectl.patch("pods", "app", "web-1", {"status": {"phase": "Succeeded"}},
                                  "status")
            async with asyncio.timeout(10):
                while WEB in w.pods.identities_on_node("node1"):
                    await asyncio.sleep(0.02)

    run(body)


@pytest.mark.unit
def test_bad_tokens_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    async def body() -> None:
        async with world(tmp_path) as w:
            web_tok = w.server.mint_token("app", "web", ("istio-ca",), pod="web-0")
            e = await refused(w, web_tok, WEB)
            assert e.reason == "permission_denied"
            assert ("caller system:serviceaccount:app:web is not a node agent ServiceAccount "
                    "(this CA accepts nodemesh-system/nodemesh)") in str(e)

            expired = w.agent_token("agent-0", now=time.time() - 3600 - 120)
            e = await refused(w, expired, WEB)
            assert e.reason == "unauthenticated"
            assert "service account token has expired" in str(e)

            wrong_aud = w.server.mint_token(SYS, "nodemesh", ("vault",), pod="agent-0")
            e = await refused(w, wrong_aud, WEB)
            assert e.reason == "unauthenticated"
            assert 'token audiences ["vault"] is invalid for the target audiences ["istio-ca"]' \
                in str(e)

            forged = TokenAuthority().mint(w.server.get_any, SYS, "nodemesh", ["istio-ca"],
                                           pod="agent-0")
            e = await refused(w, forged, WEB)
            assert e.reason == "unauthenticated"
            assert "error in cryptographic primitive" in str(e)

            unbound = w.server.mint_token(SYS, "nodemesh", ("istio-ca",))
            e = await refused(w, unbound, WEB)
            assert "is not bound to a pod" in str(e)

            assert w.refusals("UNAUTHENTICATED", "invalid_token") == 3
            assert w.refusals("PERMISSION_DENIED", "not_agent_account") == 1
            assert w.refusals("UNAUTHENTICATED", "token_not_pod_bound") == 1
            reasons = [a["reason"] for a in w.audit()]
            assert reasons == ["not_agent_account", "invalid_token", "invalid_token",
                               "invalid_token", "token_not_pod_bound"]
            assert all(a["severity"] == "error" for a in w.audit()
                       if a["code"] == "UNAUTHENTICATED")

    run(body)


@pytest.mark.unit
def test_impersonation_semantics_as_istiod(tmp_path: Path) -> None:
    async def body() -> None:
        async with world(tmp_path) as w:
            t0 = w.agent_token("agent-0")
            # No ImpersonatedIdentity: the caller's own identity, and nothing else.
            resp = await raw(w, t0, AGENT)
            assert len(resp.cert_chain) == 2
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(w, t0, WEB)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert f"a caller gets only its own identity {AGENT}" in (err.value.details() or "")
            # With it: an identity running on the caller's node.
            assert len((await raw(w, t0, WEB, impersonate=WEB.uri)).cert_chain) == 2
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(w, t0, WEB, impersonate=DB.uri)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not match the CSR's SAN" in (err.value.details() or "")
            assert w.refusals("PERMISSION_DENIED", "not_own_identity") == 1
            assert w.refusals("INVALID_ARGUMENT", "invalid_impersonation") == 1

    run(body)


@pytest.mark.unit
def test_ca_without_auth_delegator_is_unavailable_and_says_why(tmp_path: Path) -> None:
    async def body() -> None:
        async with world(tmp_path, delegator=False) as w:
            e = await refused(w, w.agent_token("agent-0"), WEB)
            assert e.reason == "unavailable"
            assert "403" in str(e) and "system:auth-delegator" in str(e)

    run(body)


@pytest.mark.unit
def test_jwks_mode_checks_tokens_against_the_issuer_keys(tmp_path: Path) -> None:
    async def body() -> None:
        async with world(tmp_path, jwks=True) as w:
            t0, t1 = w.agent_token("agent-0"), w.agent_token("agent-1")
            assert await issue(w, t0, WEB) == str(WEB)
            assert await issue(w, t1, DB) == str(DB)  # node from the pod cache
            e = await refused(w, t0, DB)
            assert "is not scheduled on node node0" in str(e)
            e = await refused(w, w.agent_token("agent-0", now=time.time() - 3600 - 120), WEB)
            assert "token has expired" in str(e)
            e = await refused(w, w.server.mint_token(SYS, "nodemesh", ("vault",),
                                                     pod="agent-0"), WEB)
            assert "not for audience ['istio-ca']" in str(e)
            forged = TokenAuthority().mint(w.server.get_any, SYS, "nodemesh", ["istio-ca"],
                                           pod="agent-0")
            e = await refused(w, forged, WEB)
            assert e.reason == "unauthenticated" and "forged" in str(e)
            # The pod the token is bound to is gone: JWKS alone cannot tell, the cache can.
            await w.kubectl.delete("pods", SYS, "agent-1")
            async with asyncio.timeout(10):
                while w.pods.pod(SYS, "agent-1") is not None:
                    await asyncio.sleep(0.02)
            e = await refused(w, t1, DB)
            assert "caller pod nodemesh-system/agent-1 is not running on any node" in str(e)

    run(body)


@pytest.mark.unit
def test_agent_client_rereads_its_projected_token_and_sends_the_cluster_id(
        tmp_path: Path) -> None:
    async def body() -> None:
        async with world(tmp_path, cluster_id="Kubernetes") as w:
            token_file = tmp_path / "istio-token"
            token_file.write_text(w.agent_token("agent-0") + "\n")
            client = CaClient(w.address, w.root_pem, token_file=token_file,
                              cluster_id="Kubernetes")
            try:
                assert (await client.issue(WEB)).identity == WEB
                # The kubelet rotates the token: an expired one in the file is refused, the
                # fresh one after it is used at once (no restart, no cached token).
                token_file.write_text(w.agent_token("agent-0", now=time.time() - 3600 - 120))
                with pytest.raises(CaError, match="token has expired"):
                    await client.issue(WEB)
                token_file.write_text(w.agent_token("agent-0"))
                assert (await client.issue(WEB)).identity == WEB
                token_file.write_text("")
                with pytest.raises(CaError, match="is empty") as err:
                    await client.issue(WEB)
                assert err.value.reason == "token_unreadable"
            finally:
                await client.close()
            other = CaClient(w.address, w.root_pem, token=w.agent_token("agent-0"),
                             cluster_id="east")
            try:
                with pytest.raises(CaError, match="caller is in cluster 'east'; this CA "
                                   "authorizes the nodes of cluster 'Kubernetes'"):
                    await other.issue(WEB)
            finally:
                await other.close()
            assert w.refusals("UNAUTHENTICATED", "other_cluster") == 1

    run(body)
