"""The Kubernetes source against the test API server, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from support.apiserver import ApiServer, Kubectl, make_tls

from agent.sources.kube.config import ClusterConfig, explicit, from_kubeconfig, in_cluster
from agent.sources.kubernetes import AuthError, KubernetesSource

NODE = "node-a"
APS = "authorizationpolicies"
RESOURCES = ("pods", "namespaces", "services", "endpointslices", APS, "peerauthentications",
             "connectionratelimits")
TIMEOUT = 20.0  # a stuck test fails here, long before pytest's own timeout


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TIMEOUT):
            await coro

    asyncio.run(bounded())


class Recorder:
    """The sink: records every call, lets the test wait for a condition."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.synced_calls = 0
        self._changed = asyncio.Event()

    def on_event(self, resource: str, type: str, obj: dict[str, Any]) -> None:
        self.events.append((resource, type, obj))
        self._changed.set()

    def on_synced(self) -> None:
        self.synced_calls += 1
        self._changed.set()

    def of(self, resource: str) -> list[tuple[str, str, str, str]]:
        """(type, key, uid, resourceVersion) of one resource's events, in order."""
        out = []
        for res, type_, obj in self.events:
            if res == resource:
                meta = obj["metadata"]
                key = f"{meta['namespace']}/{meta['name']}" if "namespace" in meta else meta["name"]
                out.append((type_, key, meta["uid"], meta["resourceVersion"]))
        return out

    async def until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            self._changed.clear()
            # Conditions may also depend on server state: look again now and then.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.05)


def identities(objs: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {k: (o["metadata"]["uid"], o["metadata"]["resourceVersion"]) for k, o in objs.items()}


def replay(events: list[tuple[str, str, str, str]]) -> dict[str, tuple[str, str]]:
    """Apply an event sequence, asserting it is one a correct watcher could have produced: no
    ADDED for a key already present, no MODIFIED/DELETED of something unknown, no version
    delivered twice."""
    state: dict[str, tuple[str, str]] = {}
    seen: set[tuple[str, str]] = set()
    for type_, key, uid, rv in events:
        if type_ == "ADDED":
            assert key not in state, f"ADDED {key} twice without a DELETED"
        else:
            assert key in state and state[key][0] == uid, f"{type_} of unknown {key} {uid}"
        if type_ != "DELETED":
            assert (uid, rv) not in seen, f"{key} version {rv} delivered twice"
            seen.add((uid, rv))
            state[key] = (uid, rv)
        else:
            del state[key]
    return state


def in_sync(server: ApiServer, source: KubernetesSource) -> Callable[[], bool]:
    def check() -> bool:
        return all(
            identities(dict(source.cache(r)))
            == identities(server.items(r))
            for r in RESOURCES
        )

    return check


@asynccontextmanager
async def running(
    server: ApiServer, config: ClusterConfig | None = None, **kwargs: Any
) -> AsyncIterator[tuple[KubernetesSource, Recorder]]:
    sink = Recorder()
    options: dict[str, Any] = {"watch_timeout": 60.0, "backoff_initial": 0.02}
    options.update(kwargs)
    source = KubernetesSource(
        config or explicit(server.url, token=server.token), NODE, sink, **options
    )
    task = asyncio.create_task(source.run())
    try:
        yield source, sink
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def seed(k: Kubectl) -> None:
    await k.namespace("ns1")
    await k.namespace("istio-system")
    await k.pod("ns1", "a1", NODE, ip="10.1.0.1")
    await k.pod("ns1", "b1", "node-b", ip="10.2.0.1")
    await k.create("services", {"metadata": {"namespace": "ns1", "name": "web"},
                                "spec": {"ports": [{"port": 80}]}})
    await k.authorization_policy("ns1", "p1", {"action": "ALLOW", "rules": [{}]})
    await k.create("peerauthentications", {"metadata": {"namespace": "istio-system",
                                                        "name": "default"},
                                           "spec": {"mtls": {"mode": "STRICT"}}})


async def watching_again(server: ApiServer, before: int) -> dict[str, str | None]:
    """Wait until every resource has asked for a new watch; the RV each one asked from."""
    while True:
        asked = {w.resource: w.resource_version for w in server.watch_log[before:]}
        if len(asked) == len(RESOURCES):
            return asked
        await asyncio.sleep(0.01)


def test_follows_every_pod_projected_and_the_policies() -> None:
    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            await seed(k)
            async with running(server) as (source, sink):
                await source.wait_synced()
                assert sink.synced_calls == 1
                # Every node's pods: the tunnel must know remote pods to dial them over HBONE.
                assert set(source.cache("pods")) == {"ns1/a1", "ns1/b1"}
                assert set(source.cache(APS)) == {"ns1/p1"}
                assert set(source.cache("namespaces")) == {"ns1", "istio-system"}
                assert [q.field_selector for q in server.list_log if q.resource == "pods"] == [""]

                await k.pod("ns1", "a2", NODE, ip="10.1.0.2")
                await k.pod("ns1", "b2", "node-b")
                await k.delete("pods", "ns1", "a1")
                # Scheduled later: a pod bound to this node afterwards enters the selection.
                await k.create("pods", {"metadata": {"namespace": "ns1", "name": "late"},
                                        "spec": {"containers": [{"name": "c", "image": "i"}]}})
                await k.patch("pods", "ns1", "late", {"spec": {"nodeName": NODE}})

                p1 = await k.replace(APS, {**server.items(APS)["ns1/p1"],
                                           "spec": {"action": "DENY", "rules": [{}]}})
                await k.authorization_policy("ns1", "p2", {"action": "ALLOW"})
                await k.delete(APS, "ns1", "p2")
                await sink.until(in_sync(server, source))

                assert source.cache(APS)["ns1/p1"]["spec"]["action"] == "DENY"
                assert p1["metadata"]["uid"] == source.cache(APS)["ns1/p1"]["metadata"]["uid"]
                # Every policy change, exactly as the server made them, in order.
                assert sink.of(APS) == server.changes(APS)
                pod_events = [(t, key) for t, key, _, _ in sink.of("pods")]
                assert pod_events == [
                    ("ADDED", "ns1/a1"),
                    ("ADDED", "ns1/b1"),
                    ("ADDED", "ns1/a2"),
                    ("MODIFIED", "ns1/a2"),  # the kubelet's status: Running, podIP
                    ("ADDED", "ns1/b2"),
                    ("DELETED", "ns1/a1"),
                    ("ADDED", "ns1/late"),
                    ("MODIFIED", "ns1/late"),  # bound to a node
                ]
                a2 = [o for r, _, o in sink.events if r == "pods"
                      and o["metadata"]["name"] == "a2"][-1]
                assert a2["status"]["podIP"] == "10.1.0.2"
                assert a2["kind"] == "Pod"
                assert a2["spec"]["nodeName"] == NODE
                # Projected: what the mesh reads, not the containers or managed fields.
                assert set(a2) == {"kind", "apiVersion", "metadata", "spec", "status"}
                assert "containers" not in a2["spec"] and "generation" not in a2["metadata"]
                # The cache keeps only the version (the sink holds what it converted).
                assert source.cache("pods")["ns1/a2"] == {"metadata": {
                    k: a2["metadata"][k] for k in ("name", "namespace", "uid",
                                                   "resourceVersion")}}
                assert sink.synced_calls == 1
                assert {w.field_selector for w in server.watch_log if w.resource == "pods"} == {
                    ""}

    run(body())


def test_dropped_watch_resumes_from_last_version_without_loss_or_duplicates() -> None:
    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            await seed(k)
            async with running(server) as (source, sink):
                await source.wait_synced()
                await k.authorization_policy("ns1", "p2", {"action": "DENY"})
                await sink.until(in_sync(server, source))
                last = {r: source.resource_version(r) for r in RESOURCES}
                before = len(server.watch_log)

                server.hold_watches()
                assert server.drop_watches() == len(RESOURCES)
                # Changes while no watch is open: they must arrive once the watches are back.
                await k.patch(APS, "ns1", "p1", {"spec": {"action": "DENY"}})
                await k.delete(APS, "ns1", "p2")
                await k.authorization_policy("ns1", "p3", {"action": "ALLOW"})
                await k.pod("ns1", "a2", NODE)
                await k.delete("pods", "ns1", "a1")
                assert await watching_again(server, before) == last
                server.release_watches()
                await sink.until(in_sync(server, source))

                # A marker after everything: any duplicate would have arrived before it.
                await k.authorization_policy("ns1", "marker", {"action": "ALLOW"})
                await sink.until(lambda: "ns1/marker" in source.cache(APS))
                assert sink.of(APS) == server.changes(APS)
                replay(sink.of("pods"))
                assert [(t, key) for t, key, _, _ in sink.of("pods")][-2:] == [
                    ("ADDED", "ns1/a2"), ("DELETED", "ns1/a1")]
                assert len(server.list_log) == len(RESOURCES)  # resumed: none listed again
                assert source.metrics.relists.labels(APS)._value.get() == 0
                assert source.metrics.watch_restarts.labels(APS, "dropped")._value.get() == 1

    run(body())


def test_410_gone_relists_and_synthesizes_exactly_the_missed_changes() -> None:
    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            await seed(k)
            for name in ("p2", "p3", "p4"):
                await k.authorization_policy("ns1", name, {"action": "ALLOW"})
            async with running(server) as (source, sink):
                await source.wait_synced()
                old_p3 = source.cache(APS)["ns1/p3"]["metadata"]["uid"]
                before = len(server.watch_log)
                server.hold_watches()
                server.drop_watches()
                await k.patch(APS, "ns1", "p1", {"spec": {"action": "DENY"}})
                await k.delete(APS, "ns1", "p2")
                await k.delete(APS, "ns1", "p3")  # deleted and recreated under the same name
                await k.authorization_policy("ns1", "p3", {"action": "DENY"})
                await k.authorization_policy("ns1", "p5", {"action": "ALLOW"})
                await k.authorization_policy("ns1", "brief", {"action": "ALLOW"})
                await k.delete(APS, "ns1", "brief")  # never seen: born and gone in the gap
                await k.pod("ns1", "a2", NODE)
                await k.delete("pods", "ns1", "a1")
                await k.namespace("ns2")
                await watching_again(server, before)
                server.compact()  # the history the watches need is gone: 410 for all
                server.release_watches()
                synced = in_sync(server, source)
                # A resource with nothing missed already matches while still backing off after
                # its 410: wait for every relist, not only for equal caches.
                await sink.until(lambda: synced() and all(
                    source.metrics.relists.labels(r)._value.get() >= 1 for r in RESOURCES))
                await k.authorization_policy("ns1", "marker", {"action": "ALLOW"})
                await sink.until(lambda: "ns1/marker" in source.cache(APS))

                for resource in RESOURCES:
                    expected = server.items(resource)
                    assert replay(sink.of(resource)) == identities(expected), resource
                    assert source.metrics.relists.labels(resource)._value.get() == 1, resource
                gap = [(t, key) for t, key, _, _ in sink.of(APS)][4:]
                assert gap == [
                    ("DELETED", "ns1/p2"),
                    ("DELETED", "ns1/p3"),
                    ("MODIFIED", "ns1/p1"),
                    ("ADDED", "ns1/p3"),
                    ("ADDED", "ns1/p5"),
                    ("ADDED", "ns1/marker"),
                ]
                assert sink.of(APS)[5][2] == old_p3
                assert source.cache(APS)["ns1/p3"]["metadata"]["uid"] != old_p3
                assert ("ADDED", "ns2") in [(t, key) for t, key, _, _ in sink.of("namespaces")]
                assert sink.synced_calls == 1

    run(body())


def test_bookmarks_advance_the_version_the_next_watch_starts_from() -> None:
    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            await seed(k)
            async with running(server) as (source, sink):
                await source.wait_synced()
                start = source.resource_version("pods")
                for i in range(5):  # other resources change: the RV moves, the pod watch is silent
                    await k.create("services", {"metadata": {"namespace": "ns1",
                                                             "name": f"other{i}"}})
                assert source.resource_version("pods") == start
                server.send_bookmarks()
                now = str(server.rv)
                await sink.until(lambda: source.resource_version("pods") == now)
                # Without the bookmark, the watch from `start` would now be 410 Gone.
                server.compact()
                before = len(server.watch_log)
                server.drop_watches()
                asked = await watching_again(server, before)
                assert asked["pods"] == now
                await k.pod("ns1", "a2", NODE)
                await sink.until(lambda: "ns1/a2" in source.cache("pods"))
                assert source.metrics.relists.labels("pods")._value.get() == 0
                assert all(w.bookmarks for w in server.watch_log)

    run(body())


def test_server_closing_a_watch_on_timeout_rewatches_without_relisting() -> None:
    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            await seed(k)
            async with running(server, watch_timeout=1.0) as (source, sink):
                await source.wait_synced()
                await sink.until(lambda: any(w.resource == APS for w in server.watch_log))
                first = next(w for w in server.watch_log if w.resource == APS)
                assert first.timeout_seconds in (1, 2)
                await sink.until(lambda: len([w for w in server.watch_log
                                              if w.resource == APS]) >= 2)
                again = [w for w in server.watch_log if w.resource == APS][1]
                assert again.resource_version == first.resource_version
                await k.authorization_policy("ns1", "p2", {"action": "DENY"})
                await sink.until(lambda: "ns1/p2" in source.cache(APS))
                assert source.metrics.watch_restarts.labels(APS, "closed")._value.get() >= 1
                assert [q.resource for q in server.list_log].count(APS) == 1

    run(body())


def test_paginated_list() -> None:
    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            await seed(k)
            for i in range(4):
                await k.authorization_policy("ns1", f"extra{i}", {"action": "ALLOW"})
            async with running(server, page_size=2) as (source, sink):
                await source.wait_synced()
                assert len(source.cache(APS)) == 5
                pages = [q.continue_token for q in server.list_log if q.resource == APS]
                assert len(pages) == 3 and pages[0] is None and all(pages[1:])
                assert replay(sink.of(APS)) == identities(server.items(APS))

    run(body())


def _delays(caplog: pytest.LogCaptureFixture, resource: str) -> list[float]:
    out = []
    for rec in caplog.records:
        msg = rec.getMessage()
        if rec.levelno == logging.ERROR and msg.startswith(f"{resource}: AuthError"):
            m = re.search(r"retrying in ([0-9.]+) s", msg)
            assert m, msg
            out.append(float(m.group(1)))
    return out


def test_401_is_a_clear_error_with_backoff_and_recovers_when_the_token_is_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In-cluster configuration over real TLS; the token file is wrong, then fixed, then the
    projected token rotates."""
    tls = make_tls(tmp_path)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(tls.ca_pem)
    (account / "namespace").write_text("nodemesh-system\n")
    token = account / "token"
    token.write_text("stale-token\n")

    async def body() -> None:
        async with ApiServer(token="good-token", tls=tls.server_context) as server, Kubectl(
            server, tls.client_context()
        ) as k:
            await seed(k)
            port = server.url.rsplit(":", 1)[1]
            env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
            config = in_cluster(env, account)
            assert config.namespace == "nodemesh-system"
            async with running(server, config) as (source, sink):
                await sink.until(lambda: len(_delays(caplog, APS)) >= 3)
                assert not source.synced and sink.synced_calls == 0
                error = source.last_error(APS)
                assert isinstance(error, AuthError)
                assert "401 Unauthorized" in str(error) and str(token) in str(error)
                delays = _delays(caplog, APS)
                assert len(delays) >= 3
                for n, d in enumerate(delays[:5]):  # the backoff schedule, jittered
                    nominal = 0.02 * 2**n
                    assert nominal / 2 <= d <= nominal, (n, d)

                token.write_text("good-token\n")  # read again after a 401
                await source.wait_synced()
                assert source.last_error(APS) is None

                # The kubelet rotates the projected token; the server stops accepting the old
                # one and a dropped watch reconnects with the new file contents.
                server.token = "rotated-token"
                token.write_text("rotated-token\n")
                server.drop_watches()
                await k.authorization_policy("ns1", "p2", {"action": "DENY"})
                await sink.until(lambda: "ns1/p2" in source.cache(APS))
                assert sink.of(APS) == server.changes(APS)

    with caplog.at_level(logging.INFO, logger="agent.sources.kubernetes"):
        run(body())


def test_kubeconfig_with_inline_ca_and_token(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    async def body() -> None:
        async with ApiServer(token="kc-token", tls=tls.server_context) as server, Kubectl(
            server, tls.client_context()
        ) as k:
            await seed(k)
            kubeconfig = tmp_path / "config"
            kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
current-context: test
clusters:
- name: c
  cluster:
    server: {server.url}
    certificate-authority-data: {base64.b64encode(tls.ca_pem).decode()}
users:
- name: u
  user:
    token: kc-token
contexts:
- name: test
  context: {{cluster: c, user: u, namespace: ns1}}
""")
            config = from_kubeconfig(kubeconfig)
            async with running(server, config) as (source, _):
                await source.wait_synced()
                assert set(source.cache("pods")) == {"ns1/a1", "ns1/b1"}

    run(body())


def test_command_line_prints_what_the_source_delivers(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)

    async def body() -> None:
        async with ApiServer(token="kc-token", tls=tls.server_context) as server, Kubectl(
            server, tls.client_context()
        ) as k:
            await seed(k)
            kubeconfig = tmp_path / "config"
            kubeconfig.write_text(json.dumps({
                "current-context": "t",
                "clusters": [{"name": "c", "cluster": {"server": server.url,
                                                       "certificate-authority": "ca.crt"}}],
                "users": [{"name": "u", "user": {"token": "kc-token"}}],
                "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}],
            }))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.sources.kube", "--kubeconfig", str(kubeconfig),
                "--node", NODE, "--resources", f"pods,{APS}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            try:
                assert proc.stdout is not None
                lines = []
                while not lines or lines[-1] != {"synced": True}:
                    lines.append(json.loads(await proc.stdout.readline()))
                assert {(x["resource"], x["name"]) for x in lines[:-1]} == {
                    ("pods", "a1"), ("pods", "b1"), (APS, "p1")}
                await k.authorization_policy("ns1", "p2", {"action": "DENY"})
                line = json.loads(await proc.stdout.readline())
                assert (line["resource"], line["type"], line["name"]) == (APS, "ADDED", "p2")
            finally:
                if proc.returncode is None:
                    proc.terminate()
                await proc.wait()

    run(body())


def test_429_waits_at_least_retry_after() -> None:
    """API priority and fairness sheds the first list: the source comes back no sooner than
    the server asked, although its own backoff would have retried at once."""

    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            await seed(k)
            server.throttle(1, retry_after=1)
            async with running(server, resources=("pods",)) as (source, _sink):
                await source.wait_synced()
                first, second = server.request_times[-2:]  # the 429, then the list that worked
                assert second - first >= 1.0
                assert source.metrics.watch_restarts.labels("pods", "error")._value.get() == 1

    run(body())


def test_403_is_a_warning_naming_the_grant_until_it_persists(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A restarted API server denies until its RBAC cache has loaded: WARNING, with the grant the
    ClusterRole gives; the same 403 after the grace is an ERROR saying what is missing."""

    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            await seed(k)
            server.forbid("pods")
            caplog.set_level(logging.WARNING, "agent.sources.kubernetes")
            async with running(server, resources=("pods",), forbidden_grace=0.3) as (source, s):
                def levels() -> list[int]:
                    return [r.levelno for r in caplog.records if "403 Forbidden" in r.getMessage()]

                await s.until(lambda: logging.ERROR in levels())
                first = next(r.getMessage() for r in caplog.records)
                assert levels()[0] == logging.WARNING
                assert "grants list and watch on pods (apiGroup \"\")" in first
                error = next(r.getMessage() for r in caplog.records
                             if r.levelno == logging.ERROR)
                assert "needs list and watch on pods" in error
                assert not source.synced
                server.allow("pods")
                await source.wait_synced()
                assert source.last_error("pods") is None

    run(body())


def test_an_outage_is_measured_and_recovery_resumes_from_the_last_version(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server stops (connections reset, new ones refused): unreachable_for grows; once it
    is back on the same address the source resumes from its resourceVersion, no relist."""

    async def body() -> None:
        async with ApiServer() as server, Kubectl(server) as k:
            await seed(k)
            async with running(server, backoff_initial=0.05, backoff_cap=0.2) as (source, s):
                await source.wait_synced()
                assert source.unreachable_for() == 0.0
                await server.stop_serving()
                await s.until(lambda: source.unreachable_for() > 1.0)
                # However long the outage, retries stay at most backoff_cap apart.
                delays = [float(m.group(1)) for r in caplog.records
                          if (m := re.search(r"retrying in ([0-9.]+) s", r.getMessage()))]
                assert len(delays) >= 10 and max(delays) <= 0.2 and max(delays) >= 0.1
                await server.start_serving()
                await k.pod("ns1", "after", NODE, ip="10.1.0.9")
                await s.until(lambda: "ns1/after" in source.cache("pods"))
                await s.until(lambda: source.unreachable_for() == 0.0)  # every resource back
                assert source.metrics.relists.labels("pods")._value.get() == 0

    run(body())


EXEC_PLUGIN = """#!{python}
# A kubeconfig exec credential plugin, as aws/gke/kubelogin are: reads KUBERNETES_EXEC_INFO,
# prints an ExecCredential. Each run is logged; the token is whatever the file holds now.
import json, os, pathlib, sys
here = pathlib.Path(sys.argv[0]).parent
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
assert info["kind"] == "ExecCredential", info
with open(here / "runs", "a") as f:
    f.write(os.environ.get("PLUGIN_REGION", "") + "\\n")
print(json.dumps({{"apiVersion": info["apiVersion"], "kind": "ExecCredential",
                  "status": {{"token": (here / "current").read_text().strip(),
                             "expirationTimestamp": "2999-01-01T00:00:00Z"}}}}))
"""


def test_kubeconfig_exec_plugin_authenticates_and_runs_again_after_a_401(
    tmp_path: Path,
) -> None:
    """An EKS/GKE/AKS-style kubeconfig: the user is an exec plugin (a script printing an
    ExecCredential). Its token authenticates; it is cached while valid, and a 401 (the server
    no longer accepts it) runs the plugin again."""
    plugin = tmp_path / "bin" / "get-token"
    plugin.parent.mkdir()
    plugin.write_text(EXEC_PLUGIN.format(python=sys.executable))
    plugin.chmod(0o755)
    (plugin.parent / "current").write_text("exec-token-1\n")
    runs = plugin.parent / "runs"

    async def body() -> None:
        async with ApiServer(token="exec-token-1") as server, Kubectl(server) as k:
            await seed(k)
            kubeconfig = tmp_path / "config"
            kubeconfig.write_text(json.dumps({
                "current-context": "eks",
                "clusters": [{"name": "c", "cluster": {"server": server.url}}],
                "users": [{"name": "u", "user": {"exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": "bin/get-token",  # relative: to the kubeconfig's directory
                    "args": ["--cluster", "test"],
                    "env": [{"name": "PLUGIN_REGION", "value": "eu-west-1"}],
                    "interactiveMode": "Never"}}}],
                "contexts": [{"name": "eks", "context": {"cluster": "c", "user": "u"}}],
            }))
            config = from_kubeconfig(kubeconfig)
            assert config.credentials is not None
            assert "exec plugin 'bin/get-token'" in config.credentials.describe()
            async with running(server, config) as (source, sink):
                await source.wait_synced()
                assert set(source.cache("pods")) == {"ns1/a1", "ns1/b1"}
                assert runs.read_text() == "eu-west-1\n"  # once: the token is still valid
                assert server.unauthorized == 0
                # The credential is rotated: the old token is refused, the plugin runs again.
                server.token = "exec-token-2"
                (plugin.parent / "current").write_text("exec-token-2\n")
                server.drop_watches()
                await k.authorization_policy("ns1", "after", {"action": "ALLOW"})
                await sink.until(lambda: "ns1/after" in source.cache(APS))
                assert server.unauthorized >= 1
                assert runs.read_text().count("\n") >= 2

    run(body())
