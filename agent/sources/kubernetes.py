"""The Kubernetes source: list+watch of the objects the node agent needs, fed to the state store.

Per resource it runs the reflector loop client-go runs: list (paginated), then watch from the
list's resourceVersion with bookmarks; a watch the server closes or a proxy drops is re-opened
from the last resourceVersion seen (event or bookmark), so nothing is replayed; a 410 Gone (the
server no longer has history that old) forces a fresh list, whose difference from the local cache
becomes synthesized ADDED/MODIFIED/DELETED events, so nothing is lost either. Errors back off
exponentially with jitter, capped at a few seconds, and never shorter than a 429's
Retry-After.

Pods are read for the whole cluster, projected to the fields the mesh reads
(`kube/project.py`): the tunnel must know every remote pod's IP and identity to dial it over
HBONE, while only this node's pods are enrolled (docs/kubernetes.md, "Scale").

The consumer sees `on_event(resource, type, obj)` per change and `on_synced()` once, after every
resource's first list has been delivered (the agent is not ready before that).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import aiohttp
from prometheus_client import CollectorRegistry

from agent.backoff import Backoff, Retries
from agent.sources.kube.cache import Change, InvalidObjectError, ObjectCache, meta_of
from agent.sources.kube.config import ClusterConfig, KubeConfigError, auth_headers
from agent.sources.kube.metrics import KubeMetrics
from agent.sources.kube.project import Projection, project_endpoint_slice, project_pod
from agent.sources.kube.stream import WatchDecoder, WatchEvent, WatchProtocolError

log = logging.getLogger(__name__)

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    name: str  # the plural, as in the URL and in RBAC rules
    group_version: str
    kind: str
    namespaced: bool
    # What of each object the consumer gets (None: all of it); a projected resource's cache
    # keeps only uid and resourceVersion (kube/cache.py, "slim"): the consumer holds the rest.
    project: Projection | None = None

    @property
    def path(self) -> str:
        """The all-namespaces collection path."""
        gv = self.group_version
        return f"/api/{gv}/{self.name}" if "/" not in gv else f"/apis/{gv}/{self.name}"


# Exactly what the agent reads, and so exactly what its ClusterRole grants (list, watch).
RESOURCES: dict[str, Resource] = {
    r.name: r
    for r in (
        Resource("pods", "v1", "Pod", namespaced=True, project=project_pod),
        Resource("namespaces", "v1", "Namespace", namespaced=False),
        Resource("services", "v1", "Service", namespaced=True),
        # A Service's endpoints, selector or not, in the mesh or not (state/services.py).
        Resource("endpointslices", "discovery.k8s.io/v1", "EndpointSlice", namespaced=True,
                 project=project_endpoint_slice),
        Resource("authorizationpolicies", "security.istio.io/v1", "AuthorizationPolicy", True),
        Resource("peerauthentications", "security.istio.io/v1", "PeerAuthentication", True),
        Resource("connectionratelimits", "nodemesh.io/v1alpha1", "ConnectionRateLimit", True),
    )
}


class EventSink(Protocol):
    """What the state store implements. Calls come from the event loop running the source; the
    objects are the source's cache entries, so a sink must not modify them."""

    def on_event(self, resource: str, type: str, obj: Obj) -> None: ...

    def on_synced(self) -> None: ...


@runtime_checkable
class BatchSink(EventSink, Protocol):
    """A sink that takes a list's changes at once (one store update for a whole list)."""

    def on_events(self, resource: str, changes: Sequence[tuple[str, Obj]]) -> None: ...


class ApiStatusError(Exception):
    """The API server answered with an error Status."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class AuthError(ApiStatusError):
    """401/403: the credentials are wrong, expired, or lack the RBAC grant."""


class TooManyRequestsError(ApiStatusError):
    """429: API priority and fairness shed the request; Retry-After says when to come back."""

    def __init__(self, code: int, reason: str, message: str, retry_after: float) -> None:
        super().__init__(code, reason, message)
        self.retry_after = retry_after


# An API server that just restarted answers 403 until its RBAC informers have synced, for a few
# seconds; a 403 that lasts longer than this is a missing grant.
FORBIDDEN_GRACE = 10.0
MAX_RETRY_AFTER = 60.0  # a larger Retry-After is a server bug; do not go quiet for longer


class ResourceExpiredError(ApiStatusError):
    """410 Gone: the resourceVersion (or continue token) is older than the server's history."""


_DROPPED = (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
            aiohttp.ClientConnectionError)
_RETRYABLE = (aiohttp.ClientError, TimeoutError, ApiStatusError, WatchProtocolError,
              InvalidObjectError, KubeConfigError)


class _Reflector:
    def __init__(self, resource: Resource, initial: float, cap: float) -> None:
        self.resource = resource
        self.cache = ObjectCache(resource.namespaced, slim=resource.project is not None)
        self.rv: str | None = None  # where the next watch starts; None: list first
        self.listed = False
        self.fresh_list = False  # no watch event since the last list
        self.backoff = Retries(Backoff(initial, cap=cap, equal_jitter=True))
        self.last_error: Exception | None = None
        self.failing_since: float | None = None  # first failure since the last success
        self.forbidden_since: float | None = None  # first of a run of 403s


class KubernetesSource:
    def __init__(
        self,
        config: ClusterConfig,
        node_name: str,
        sink: EventSink,
        *,
        resources: Iterable[str] = tuple(RESOURCES),
        page_size: int = 500,
        watch_timeout: float = 300.0,
        request_timeout: float = 30.0,
        backoff_initial: float = 0.1,
        backoff_cap: float = 3.2,
        forbidden_grace: float = FORBIDDEN_GRACE,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`watch_timeout`: each watch asks the server to end it after a random time in
        [t, 2t) seconds, so the agents of a cluster do not all reconnect at once."""
        if not node_name:
            raise ValueError("node_name is required: it names this agent to the API server")
        unknown = set(resources) - RESOURCES.keys()
        if unknown:
            raise ValueError(f"unknown resources {sorted(unknown)}; known: {sorted(RESOURCES)}")
        self.config = config
        self.node_name = node_name
        self.sink = sink
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.forbidden_grace = forbidden_grace
        self.metrics = KubeMetrics(registry)
        self._clock = clock
        self._reflectors = {
            name: _Reflector(RESOURCES[name], backoff_initial, backoff_cap) for name in resources
        }
        self._synced = asyncio.Event()

    # -- what other parts read -------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    def cache(self, resource: str) -> Mapping[str, Obj]:
        """Current objects of a resource, keyed namespace/name (name if cluster-scoped)."""
        return self._reflectors[resource].cache.objects

    def resource_version(self, resource: str) -> str | None:
        """The resourceVersion the next watch of this resource starts from."""
        return self._reflectors[resource].rv

    def last_error(self, resource: str) -> Exception | None:
        return self._reflectors[resource].last_error

    def unreachable_for(self) -> float:
        """Seconds since some resource last could be read: 0 while every reflector's latest
        request (list, watch open, event) succeeded. Readiness compares this with a grace."""
        now = self._clock()
        return max((now - r.failing_since for r in self._reflectors.values()
                    if r.failing_since is not None), default=0.0)

    # -- the loops -------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled. Raises only what the sink raised: a store that missed an event
        would be silently wrong, so a sink error stops the source."""
        connector = aiohttp.TCPConnector(ssl=self.config.ssl_context or True)
        async with aiohttp.ClientSession(
            connector=connector, headers={"Accept": "application/json",
                                          "User-Agent": f"nodemesh-agent/{self.node_name}"}
        ) as session:
            tasks = [asyncio.create_task(self._reflect(session, r), name=f"kube-{name}")
                     for name, r in self._reflectors.items()]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _reflect(self, session: aiohttp.ClientSession, r: _Reflector) -> None:
        name = r.resource.name
        while True:
            after_list = False
            try:
                if r.rv is None:
                    await self._list(session, r)
                    after_list = True
                await self._watch(session, r)
                r.backoff.reset()
                self.metrics.watch_restarts.labels(name, "closed").inc()
                continue  # the server ended the watch (timeoutSeconds): re-watch at once
            except ResourceExpiredError as e:
                self.metrics.watch_restarts.labels(name, "expired").inc()
                log.info("%s: %s; listing again", name, e)
                r.rv, r.last_error = None, e
                if not (after_list and r.fresh_list):
                    continue
                # 410 straight after a fresh list: the server is unwell, do not spin.
                await self._pause(r, e)
            except AuthError as e:
                self.metrics.watch_restarts.labels(name, "error").inc()
                if self.config.credentials is not None:
                    self.config.credentials.invalidate()  # a rotated token is picked up next
                await self._pause(r, e, level=self._auth_level(r, e))
            except TooManyRequestsError as e:
                self.metrics.watch_restarts.labels(name, "error").inc()
                await self._pause(r, e, at_least=e.retry_after)
            except _RETRYABLE as e:
                reason = "dropped" if isinstance(e, _DROPPED) else "error"
                self.metrics.watch_restarts.labels(name, reason).inc()
                await self._pause(r, e)

    def _auth_level(self, r: _Reflector, e: AuthError) -> int:
        """A 403 is WARNING while it may be a restarted server still loading RBAC, ERROR once it
        has lasted `forbidden_grace` (the grant is missing); a 401 is always ERROR."""
        if e.code != 403:
            return logging.ERROR
        now = self._clock()
        if r.forbidden_since is None:
            r.forbidden_since = now
        return logging.ERROR if now - r.forbidden_since >= self.forbidden_grace else logging.WARNING

    def _ok(self, r: _Reflector) -> None:
        """A request for this resource succeeded: it is reachable and allowed."""
        r.failing_since = r.forbidden_since = None
        r.last_error = None

    async def _pause(self, r: _Reflector, error: Exception, level: int = logging.WARNING,
                     at_least: float = 0.0) -> None:
        r.last_error = error
        if r.failing_since is None:
            r.failing_since = self._clock()
        if not isinstance(error, AuthError) or error.code != 403:
            r.forbidden_since = None
        delay = max(r.backoff.next_delay(), min(at_least, MAX_RETRY_AFTER))
        what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        log.log(level, "%s: %s; retrying in %.2f s (from %s)", r.resource.name, what, delay,
                "a fresh list" if r.rv is None else f"resourceVersion {r.rv}")
        await asyncio.sleep(delay)

    async def _list(self, session: aiohttp.ClientSession, r: _Reflector) -> None:
        items: list[Obj] = []
        cont: str | None = None
        while True:
            params = self._params(r)
            params["limit"] = str(self.page_size)
            if cont:
                params["continue"] = cont
            timeout = aiohttp.ClientTimeout(total=self.request_timeout)
            async with session.get(self._url(r), params=params, headers=await self._auth(),
                                   timeout=timeout, **self._tls_name()) as resp:
                if resp.status != 200:
                    await self._raise_status(resp, r)
                doc = await resp.json(content_type=None)
            self._ok(r)
            page, meta = _list_parts(doc, r.resource.name)
            items.extend(self._typed(r, o) for o in page)
            del doc, page  # a projected resource keeps only the projections
            cont = meta.get("continue") or None
            if not cont:
                break
        # Every page of one list reads the same snapshot, whose version the pages all carry.
        rv = meta.get("resourceVersion")
        if not isinstance(rv, str) or not rv:
            raise WatchProtocolError(f"{r.resource.name} list has no metadata.resourceVersion")
        changes = r.cache.replace(items)
        if r.listed:
            self.metrics.relists.labels(r.resource.name).inc()
        r.rv, r.fresh_list, r.last_error = rv, True, None
        self._emit(r, changes)
        if not r.listed:
            r.listed = True
            if all(x.listed for x in self._reflectors.values()):
                self._synced.set()
                self.sink.on_synced()

    async def _watch(self, session: aiohttp.ClientSession, r: _Reflector) -> None:
        assert r.rv is not None
        seconds = int(self.watch_timeout * (1 + random.random()))
        params = self._params(r)
        params.update(watch="1", resourceVersion=r.rv, allowWatchBookmarks="true",
                      timeoutSeconds=str(seconds))
        # The server ends the watch after `seconds` and sends bookmarks meanwhile; silence well
        # past that means a dead peer the kernel has not noticed.
        timeout = aiohttp.ClientTimeout(total=None, connect=self.request_timeout,
                                        sock_read=seconds + self.request_timeout)
        async with session.get(self._url(r), params=params, headers=await self._auth(),
                               timeout=timeout, **self._tls_name()) as resp:
            if resp.status != 200:
                await self._raise_status(resp, r)
            self._ok(r)
            decoder = WatchDecoder()
            async for chunk in resp.content.iter_any():
                for event in decoder.feed(chunk):
                    self._on_watch_event(r, event)
            decoder.end()

    def _on_watch_event(self, r: _Reflector, event: WatchEvent) -> None:
        obj = event.object
        if event.type == "ERROR":
            code, reason, message = _status_parts(obj)
            cls = ResourceExpiredError if code == 410 else ApiStatusError
            raise cls(code, reason, f"watch error {code} {reason}: {message}")
        if event.type == "BOOKMARK":
            rv = obj.get("metadata", {}).get("resourceVersion")
            if not isinstance(rv, str) or not rv:
                raise WatchProtocolError("BOOKMARK without metadata.resourceVersion")
            r.rv = rv  # nothing of ours changed up to here: the next watch may start later
        else:
            obj = self._typed(r, obj)
            changes = r.cache.apply(event.type, obj)
            r.rv = meta_of(obj, r.resource.namespaced)[2]
            self._emit(r, changes)
        r.fresh_list = False
        r.last_error = None
        r.backoff.reset()

    def _emit(self, r: _Reflector, changes: list[Change]) -> None:
        name = r.resource.name
        for type_, _obj in changes:
            self.metrics.events.labels(name, type_).inc()
        if len(changes) > 1 and isinstance(self.sink, BatchSink):
            self.sink.on_events(name, changes)
            return
        for type_, obj in changes:
            self.sink.on_event(name, type_, obj)

    # -- HTTP details ----------------------------------------------------------------------

    def _url(self, r: _Reflector) -> str:
        return self.config.server + r.resource.path

    def _params(self, r: _Reflector) -> dict[str, str]:
        return {}

    async def _auth(self) -> dict[str, str]:
        return await auth_headers(self.config.credentials)

    def _tls_name(self) -> dict[str, Any]:
        name = self.config.server_hostname
        return {"server_hostname": name} if name else {}

    @staticmethod
    def _typed(r: _Reflector, obj: Obj) -> Obj:
        # List items come without kind/apiVersion; give consumers one shape either way.
        obj.setdefault("kind", r.resource.kind)
        obj.setdefault("apiVersion", r.resource.group_version)
        return r.resource.project(obj) if r.resource.project is not None else obj

    async def _raise_status(self, resp: aiohttp.ClientResponse, r: _Reflector) -> None:
        text = await resp.text(errors="replace")
        try:
            code, reason, message = _status_parts(json.loads(text))
        except ValueError:
            code, reason, message = resp.status, resp.reason or "", text[:200]
        code = resp.status
        where = f"{self.config.server} ({self.config.origin})"
        name = r.resource.name
        if code == 401:
            creds = self.config.credentials
            sent = creds.describe() if creds is not None else "no credentials"
            raise AuthError(code, reason, f"401 Unauthorized from {where} listing {name}: "
                            f"the server rejected {sent} (expired, revoked, or from another "
                            "cluster?)")
        if code == 403:
            group = r.resource.group_version.rpartition("/")[0] or '""'
            grant = f"list and watch on {name} (apiGroup {group})"
            if r.forbidden_since is None or (self._clock() - r.forbidden_since
                                             < self.forbidden_grace):
                raise AuthError(code, reason, f"403 Forbidden from {where}: {message}. The "
                                f"agent's ClusterRole grants {grant}; a restarted API server "
                                "denies until its RBAC cache has loaded, retrying")
            raise AuthError(code, reason, f"403 Forbidden from {where}: {message}. The agent "
                            f"needs {grant} (docs/kubernetes.md has the rules)")
        if code == 429:
            raise TooManyRequestsError(code, reason, f"429 Too Many Requests from {where} for "
                                       f"{name}: {message}", _retry_after(resp))
        if code == 410:
            raise ResourceExpiredError(code, reason, f"410 Gone: {message}")
        raise ApiStatusError(code, reason, f"{code} {reason} from {where} for {name}: {message}")


def _retry_after(resp: aiohttp.ClientResponse) -> float:
    """Retry-After in seconds (the API server sends delta-seconds); 1 s if absent or a date."""
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def _status_parts(obj: Any) -> tuple[int, str, str]:
    if not isinstance(obj, dict):
        raise ValueError("not a Status object")
    code = obj.get("code")
    return (code if isinstance(code, int) else 0, str(obj.get("reason", "")),
            str(obj.get("message", "")))


def _list_parts(doc: Any, name: str) -> tuple[list[Obj], dict[str, Any]]:
    if not isinstance(doc, dict):
        raise WatchProtocolError(f"{name} list is not a JSON object")
    items, meta = doc.get("items"), doc.get("metadata")
    if items is None:
        items = []  # an empty list serializes items as null
    if not isinstance(items, list) or not isinstance(meta, dict):
        raise WatchProtocolError(f"{name} list without items/metadata")
    for item in items:
        if not isinstance(item, dict):
            raise InvalidObjectError(f"{name} list item is not an object: {str(item)[:200]}")
    return items, meta
