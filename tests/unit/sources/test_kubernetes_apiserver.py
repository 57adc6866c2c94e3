"""The test API server keeps the promises of the real one that the Kubernetes source relies on.

Checked with a plain HTTP client, and with the real kubectl binary."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prereq import require_tool
from support.apiserver import ApiError, ApiServer, Kubectl, make_tls

TOKEN = {"Authorization": "Bearer test-token"}
APS = "/apis/security.istio.io/v1/authorizationpolicies"


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await coro

    asyncio.run(bounded())


@contextlib.asynccontextmanager
async def world() -> AsyncIterator[tuple[ApiServer, Kubectl, aiohttp.ClientSession]]:
    async with ApiServer() as server, Kubectl(server) as k, aiohttp.ClientSession(
        server.url, headers=TOKEN
    ) as http:
        await k.namespace("ns1")
        yield server, k, http


async def watch(
    server: ApiServer, http: aiohttp.ClientSession, path: str, count: int, **params: str
) -> list[dict[str, Any]]:
    """The first `count` events of a watch, and proof there are no more: the stream ends after
    an ERROR, else a bookmark requested now is the very next event."""
    params = {"watch": "1", "allowWatchBookmarks": "true", **params}
    async with http.get(path, params=params) as r:
        assert r.status == 200
        assert r.headers["Transfer-Encoding"] == "chunked"
        events = [json.loads(await r.content.readline()) for _ in range(count)]
        if events and events[-1]["type"] == "ERROR":
            assert await r.read() == b""
        else:
            server.send_bookmarks()
            assert json.loads(await r.content.readline())["type"] == "BOOKMARK"
        return events


def test_auth_errors_and_statuses_are_kubernetes_status_objects() -> None:
    async def body() -> None:
        async with world() as (server, k, http):
            async with aiohttp.ClientSession() as anonymous, anonymous.get(
                server.url + APS
            ) as r:
                assert r.status == 401
                assert (await r.json())["reason"] == "Unauthorized"
            ap = await k.authorization_policy("ns1", "p", {"action": "DENY"})
            assert ap["metadata"]["uid"] and ap["metadata"]["creationTimestamp"]
            with pytest.raises(ApiError, match="already exists"):
                await k.authorization_policy("ns1", "p", {})
            with pytest.raises(ApiError, match='namespaces "nope" not found'):
                await k.authorization_policy("nope", "p", {})
            stale = {**ap, "spec": {"action": "ALLOW"}}
            await k.patch("authorizationpolicies", "ns1", "p", {"spec": {"action": "AUDIT"}})
            with pytest.raises(ApiError, match="has been modified"):
                await k.replace("authorizationpolicies", stale)
            rv = server.rv
            await k.patch("authorizationpolicies", "ns1", "p", {"spec": {"action": "AUDIT"}})
            assert server.rv == rv  # no-op writes do not bump the resourceVersion
            async with http.get(APS, params={"fieldSelector": "spec.foo=x"}) as r:
                assert r.status == 400
                assert "field label not supported" in (await r.json())["message"]
            async with http.get(APS) as r:
                doc = await r.json()
                assert doc["metadata"]["resourceVersion"] == str(server.rv)
                assert [i["metadata"]["name"] for i in doc["items"]] == ["p"]

    run(body())


def test_watch_streams_changes_after_the_version_asked_and_410_when_too_old() -> None:
    async def body() -> None:
        async with world() as (server, k, http):
            start = str(server.rv)
            await k.authorization_policy("ns1", "a", {})
            await k.patch("authorizationpolicies", "ns1", "a", {"spec": {"action": "DENY"}})
            middle = str(server.rv)
            await k.delete("authorizationpolicies", "ns1", "a")
            events = await watch(server, http, APS, 3, resourceVersion=start)
            assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
            assert [e["object"]["metadata"]["resourceVersion"] for e in events] == [
                str(int(start) + 1), middle, str(server.rv)]
            events = await watch(server, http, APS, 1, resourceVersion=middle)
            assert [e["type"] for e in events] == ["DELETED"]

            server.compact()
            events = await watch(server, http, APS, 1, resourceVersion=middle)
            assert len(events) == 1 and events[0]["type"] == "ERROR"
            err = events[0]["object"]
            assert (err["kind"], err["code"], err["reason"]) == ("Status", 410, "Expired")
            assert "too old resource version" in err["message"]

    run(body())


def test_history_is_bounded_and_continue_tokens_expire() -> None:
    async def body() -> None:
        async with ApiServer(history=3) as server, Kubectl(server) as k, aiohttp.ClientSession(
            server.url, headers=TOKEN
        ) as http:
            await k.namespace("ns1")
            first = str(server.rv)
            for i in range(4):
                await k.authorization_policy("ns1", f"p{i}", {})
            events = await watch(server, http, APS, 1, resourceVersion=first)
            assert events[0]["object"]["code"] == 410
            recent = str(server.rv - 2)
            events = await watch(server, http, APS, 2, resourceVersion=recent)
            assert [e["object"]["metadata"]["name"] for e in events] == ["p2", "p3"]

            async with http.get(APS, params={"limit": "3"}) as r:
                page = await r.json()
            assert len(page["items"]) == 3 and page["metadata"]["remainingItemCount"] == 1
            server.compact()
            async with http.get(APS, params={"limit": "3",
                                             "continue": page["metadata"]["continue"]}) as r:
                assert r.status == 410

    run(body())


def test_field_selected_watch_sees_objects_enter_and_leave() -> None:
    """A pod bound to the node after creation is ADDED for that node's watch, as on a real
    server; deleting it is DELETED; other nodes' pods never show."""

    async def body() -> None:
        async with world() as (server, k, http):
            start = str(server.rv)
            await k.create("pods", {"metadata": {"namespace": "ns1", "name": "p"},
                                    "spec": {"containers": []}})
            await k.pod("ns1", "elsewhere", "node-b")
            await k.patch("pods", "ns1", "p", {"spec": {"nodeName": "node-a"}})
            with pytest.raises(ApiError, match="may not change"):
                await k.patch("pods", "ns1", "p", {"spec": {"nodeName": "node-b"}})
            await k.patch("pods", "ns1", "p", {"status": {"podIP": "10.0.0.9"}}, "status")
            await k.delete("pods", "ns1", "p")
            events = await watch(server, http, "/api/v1/pods", 3, resourceVersion=start,
                                 fieldSelector="spec.nodeName=node-a")
            assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
                ("ADDED", "p"), ("MODIFIED", "p"), ("DELETED", "p")]
            assert events[1]["object"]["status"]["podIP"] == "10.0.0.9"

    run(body())


def test_bookmarks_only_for_watches_that_ask() -> None:
    async def body() -> None:
        async with world() as (server, _, http):
            rv = str(server.rv)
            async with http.get(APS, params={"watch": "1", "resourceVersion": rv,
                                             "allowWatchBookmarks": "true"}) as with_bm, \
                    http.get(APS, params={"watch": "1", "resourceVersion": rv,
                                          "timeoutSeconds": "1"}) as without:
                while server.open_watches < 2:
                    await asyncio.sleep(0.01)
                server.send_bookmarks()
                line = json.loads(await with_bm.content.readline())
                assert line["type"] == "BOOKMARK"
                assert line["object"]["metadata"]["resourceVersion"] == rv
                assert await without.read() == b""

    run(body())


def test_real_kubectl_can_drive_it(tmp_path: Path) -> None:
    kubectl = require_tool("kubectl")
    tls = make_tls(tmp_path)

    async def body() -> None:
        async with ApiServer(tls=tls.server_context) as server:
            assert server.token is not None
            base = [kubectl, "--server", server.url, "--token", server.token,
                    "--certificate-authority", str(tls.ca_file), "--cache-dir",
                    str(tmp_path / "cache")]

            async def kc(*args: str, stdin: bytes | None = None) -> str:
                proc = await asyncio.create_subprocess_exec(
                    *base, *args, stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await proc.communicate(stdin)
                assert proc.returncode == 0, err.decode()
                return out.decode()

            ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns1"}}
            await kc("create", "--validate=false", "-f", "-", stdin=json.dumps(ns).encode())
            ap = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                  "metadata": {"name": "p", "namespace": "ns1"}, "spec": {"action": "DENY"}}
            await kc("apply", "--validate=false", "-f", "-", stdin=json.dumps(ap).encode())
            ap["spec"] = {"action": "ALLOW"}
            await kc("apply", "--validate=false", "-f", "-", stdin=json.dumps(ap).encode())
            assert server.objects[("authorizationpolicies", "ns1", "p")]["spec"] == {
                "action": "ALLOW"}
            listed = json.loads(await kc("get", "authorizationpolicies", "-A", "-o", "json"))
            assert [i["metadata"]["name"] for i in listed["items"]] == ["p"]
            await kc("delete", "authorizationpolicy", "p", "-n", "ns1", "--wait=false")
            assert [t for t, *_ in server.changes("authorizationpolicies")] == [
                "ADDED", "MODIFIED", "DELETED"]

    run(body())
