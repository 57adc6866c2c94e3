"""The test API server mints bound ServiceAccount tokens and reviews them as kube-apiserver does
(authentication.k8s.io/v1 TokenReview), over real HTTP, with the auth-delegator RBAC check."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiohttp
import pytest
from support.apiserver import ApiServer, Kubectl
from support.satokens import (
    EXTRA_CREDENTIAL_ID,
    EXTRA_NODE_NAME,
    EXTRA_NODE_UID,
    EXTRA_POD_NAME,
    EXTRA_POD_UID,
    ISSUER,
    TokenAuthority,
    TokenRequestError,
)

REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await coro

    asyncio.run(bounded())


@contextlib.asynccontextmanager
async def world() -> AsyncIterator[tuple[ApiServer, Kubectl, aiohttp.ClientSession]]:
    async with ApiServer() as server, Kubectl(server) as k, aiohttp.ClientSession(
            server.url) as http:
        await k.namespace("nodemesh-system")
        await k.namespace("app")
        await k.service_account("nodemesh-system", "nodemesh")
        await k.service_account("nodemesh-system", "nodemesh-ca")
        await k.service_account("app", "web")
        await k.node("node0")
        await k.pod("nodemesh-system", "agent-0", "node0", service_account="nodemesh")
        await k.pod("nodemesh-system", "agent-1", "node1", service_account="nodemesh")
        server.bind_cluster_role("system:auth-delegator",
                                 "system:serviceaccount:nodemesh-system:nodemesh-ca")
        yield server, k, http


async def review(server: ApiServer, http: aiohttp.ClientSession, token: str, *,
                 audiences: list[str] | None = None, caller: str = "test-token",
                 want_status: int = 201) -> dict[str, Any]:
    spec: dict[str, Any] = {"token": token}
    if audiences is not None:
        spec["audiences"] = audiences
    async with http.post(REVIEWS, json={"apiVersion": "authentication.k8s.io/v1",
                                        "kind": "TokenReview", "spec": spec},
                         headers={"Authorization": f"Bearer {caller}"}) as r:
        body: dict[str, Any] = await r.json()
        assert r.status == want_status, body
        return body


@pytest.mark.unit
def test_bound_token_review_carries_pod_and_node_as_kube_apiserver_does() -> None:
    async def body() -> None:
        async with world() as (server, _, http):
            token = server.mint_token("nodemesh-system", "nodemesh", ("istio-ca",),
                                      pod="agent-0")
            out = await review(server, http, token, audiences=["istio-ca", "other"])
            st = out["status"]
            assert st["authenticated"] is True
            assert st["audiences"] == ["istio-ca"]
            user = st["user"]
            assert user["username"] == "system:serviceaccount:nodemesh-system:nodemesh"
            sa = server.get("serviceaccounts", "nodemesh-system", "nodemesh")
            pod = server.get("pods", "nodemesh-system", "agent-0")
            node = server.get("nodes", "", "node0")
            assert sa and pod and node
            assert user["uid"] == sa["metadata"]["uid"]
            assert "system:serviceaccounts:nodemesh-system" in user["groups"]
            extra = user["extra"]
            assert extra[EXTRA_POD_NAME] == ["agent-0"]
            assert extra[EXTRA_POD_UID] == [pod["metadata"]["uid"]]
            assert extra[EXTRA_NODE_NAME] == ["node0"]
            assert extra[EXTRA_NODE_UID] == [node["metadata"]["uid"]]
            assert extra[EXTRA_CREDENTIAL_ID][0].startswith("JTI=")
            # node1 has no Node object: the token carries no node claim, as the real server
            # omits it when the Node cannot be read.
            t1 = server.mint_token("nodemesh-system", "nodemesh", ("istio-ca",), pod="agent-1")
            st1 = (await review(server, http, t1, audiences=["istio-ca"]))["status"]
            extra1 = st1["user"]["extra"]
            assert EXTRA_NODE_NAME not in extra1 and extra1[EXTRA_POD_NAME] == ["agent-1"]

    run(body())


@pytest.mark.unit
def test_refused_tokens_say_why() -> None:
    async def body() -> None:
        async with world() as (server, k, http):
            def err(st: dict[str, Any]) -> str:
                assert not st.get("authenticated"), st
                msg: str = st["error"]
                assert msg.startswith("[invalid bearer token, ")
                return msg

            wrong_aud = server.mint_token("nodemesh-system", "nodemesh", ("vault",), pod="agent-0")
            msg = err((await review(server, http, wrong_aud, audiences=["istio-ca"]))["status"])
            assert 'token audiences ["vault"] is invalid for the target audiences ["istio-ca"]' \
                in msg
            # No spec.audiences: the API server's own audience is required.
            ca_tok = server.mint_token("nodemesh-system", "nodemesh", ("istio-ca",))
            msg = err((await review(server, http, ca_tok))["status"])
            assert f'target audiences ["{ISSUER}"]' in msg

            past = time.time() - 3600 - 120  # expired two minutes ago: past the 60 s leeway
            expired = server.mint_token("nodemesh-system", "nodemesh", ("istio-ca",),
                                        pod="agent-0", now=past)
            assert "service account token has expired" in err(
                (await review(server, http, expired, audiences=["istio-ca"]))["status"])
            # One minute late is still inside go-jose's leeway.
            late = server.mint_token("nodemesh-system", "nodemesh", ("istio-ca",),
                                     pod="agent-0", now=time.time() - 3600 - 30)
            st = (await review(server, http, late, audiences=["istio-ca"]))["status"]
            assert st["authenticated"]

            # Same issuer and claims, another key: a forgery.
            forger = TokenAuthority()
            forged = forger.mint(server.get_any, "nodemesh-system", "nodemesh", ["istio-ca"],
                                 pod="agent-0")
            assert "error in cryptographic primitive" in err(
                (await review(server, http, forged, audiences=["istio-ca"]))["status"])
            garbage = await review(server, http, "garbage", audiences=["istio-ca"])
            assert "not a JWT" in err(garbage["status"])

            # The bound pod is deleted: the token dies with it.
            bound = server.mint_token("nodemesh-system", "nodemesh", ("istio-ca",),
                                      pod="agent-0")
            await k.delete("pods", "nodemesh-system", "agent-0")
            assert "has been invalidated" in err(
                (await review(server, http, bound, audiences=["istio-ca"]))["status"])

    run(body())


@pytest.mark.unit
def test_token_request_rules() -> None:
    async def body() -> None:
        async with world() as (server, k, _):
            await k.pod("app", "web-0", "node0", service_account="web")
            await k.service_account("app", "default")
            with pytest.raises(TokenRequestError, match="different serviceaccount"):
                server.mint_token("app", "default", pod="web-0")
            with pytest.raises(TokenRequestError, match="not found"):
                server.mint_token("app", "nosuch")
            with pytest.raises(TokenRequestError, match="10 minutes"):
                server.mint_token("app", "web", expiration_seconds=60)

    run(body())


@pytest.mark.unit
def test_only_auth_delegators_may_review_and_sa_tokens_authenticate_for_the_api_audience() -> None:
    async def body() -> None:
        async with world() as (server, _, http):
            agent_tok = server.mint_token("nodemesh-system", "nodemesh", ("istio-ca",),
                                          pod="agent-0")
            # The agent's own API token (API audience) authenticates but is not a delegator.
            agent_api = server.mint_token("nodemesh-system", "nodemesh", pod="agent-0")
            out = await review(server, http, agent_tok, audiences=["istio-ca"], caller=agent_api,
                               want_status=403)
            assert out["reason"] == "Forbidden"
            assert 'User "system:serviceaccount:nodemesh-system:nodemesh" cannot create ' \
                   'resource "tokenreviews"' in out["message"]
            ca_api = server.mint_token("nodemesh-system", "nodemesh-ca")
            ok = await review(server, http, agent_tok, audiences=["istio-ca"], caller=ca_api)
            assert ok["status"]["authenticated"] is True
            ca_user = "system:serviceaccount:nodemesh-system:nodemesh-ca"
            assert server.token_reviews[-1][0] == ca_user
            # A token for another audience does not authenticate to the API server at all.
            async with http.get("/api/v1/pods",
                                headers={"Authorization": f"Bearer {agent_tok}"}) as r:
                assert r.status == 401
            async with http.get("/api/v1/pods",
                                headers={"Authorization": f"Bearer {ca_api}"}) as r:
                assert r.status == 200
            # The JWKS publishes the signing key with its kid.
            async with http.get("/openid/v1/jwks",
                                headers={"Authorization": f"Bearer {ca_api}"}) as r:
                keys = (await r.json())["keys"]
                assert keys[0]["kid"] == server.tokens.kid and keys[0]["alg"] == "RS256"

    run(body())
