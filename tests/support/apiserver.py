"""An in-process Kubernetes API server for tests: real HTTP/1.1, real list/watch semantics.

No registry ships a kube-apiserver, so the tests run this one. It is faithful to the parts of the
protocol a list/watch client depends on, for the resources nodemesh reads:

- one global, monotonically increasing resourceVersion (a decimal string, as with etcd); every
  object carries metadata.resourceVersion/uid/creationTimestamp; a list carries the collection
  resourceVersion, and `limit`/`continue` pagination reads one snapshot (410 once compacted);
- `?watch=1&resourceVersion=RV` streams newline-delimited JSON events (chunked) strictly after RV;
  a bounded history, so an RV older than the window gets an ERROR event whose Status has code 410
  "too old resource version", as the real watch cache does; `allowWatchBookmarks`;
  `timeoutSeconds`; field selectors on watches turn objects leaving/entering the selection into
  DELETED/ADDED, as the real server does;
- POST/PUT/PATCH (merge patch)/DELETE with 404/409/422 Status errors, so tests change the world
  the way kubectl does (the `Kubectl` class below is that client);
- bearer-token auth (401 Status without a valid token); optional TLS;
- bound ServiceAccount tokens (`mint_token`, signed JWTs: tests/support/satokens.py) that
  authenticate to this server when minted for its audience, and TokenReview
  (authentication.k8s.io/v1) that reviews them as kube-apiserver does; creating a TokenReview
  needs the system:auth-delegator ClusterRole (`bind_cluster_role`), all else any authenticated
  caller may do (no other RBAC);
- discovery (/api, /apis, /version) so kubectl and other clients can talk to it.

Test controls (called from the test's own event loop): `drop_watches()` aborts every watch
connection, `hold_watches()` makes new watches wait (a window in which changes pile up),
`hold_lists()` does the same for lists (a slow first list), `compact()` forgets history (forcing
410), `send_bookmarks()` sends a BOOKMARK on every watch that asked for them, `stop_serving()` /
`start_serving()` take the server down and back up on the same address with its state kept (a
restart: connections reset, new ones refused), `throttle(n, retry_after)` answers the next n
requests 429 with Retry-After as API priority and fairness does, and `forbid(resource)` answers
403 for a resource as RBAC does for a missing grant (or one not loaded yet after a restart).
`watch_log` and `list_log` record what clients asked for; `request_times` when each request
arrived.

Simplifications, on purpose: strategic-merge patch is applied as a JSON merge patch; deleting a
namespace does not delete its contents; label selectors are rejected (400) rather than ignored.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import ipaddress
import json
import re
import socket
import ssl
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.host import netns as netns_mod
from support.satokens import TokenAuthority

Obj = dict[str, Any]
_USER = web.RequestKey("user", str)  # who the middleware authenticated


@dataclass(frozen=True)
class Kind:
    plural: str
    kind: str
    group: str  # "" for core
    version: str
    namespaced: bool
    # Field labels the real server accepts in fieldSelector for this resource.
    fields: tuple[str, ...] = ("metadata.name", "metadata.namespace")
    has_status: bool = True  # a /status subresource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


KINDS = {
    k.plural: k
    for k in (
        Kind("pods", "Pod", "", "v1", True,
             ("metadata.name", "metadata.namespace", "spec.nodeName", "status.phase")),
        Kind("namespaces", "Namespace", "", "v1", False, ("metadata.name", "status.phase")),
        Kind("services", "Service", "", "v1", True),
        Kind("serviceaccounts", "ServiceAccount", "", "v1", True),
        Kind("nodes", "Node", "", "v1", False),
        Kind("authorizationpolicies", "AuthorizationPolicy", "security.istio.io", "v1", True),
        Kind("peerauthentications", "PeerAuthentication", "security.istio.io", "v1", True),
        # No status subresource; the EndpointSlice controller writes them whole.
        Kind("endpointslices", "EndpointSlice", "discovery.k8s.io", "v1", True,
             has_status=False),
        Kind("connectionratelimits", "ConnectionRateLimit", "nodemesh.io", "v1alpha1", True),
    )
}

_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def status(code: int, reason: str, message: str, **details: Any) -> Obj:
    """A metav1.Status, the body of every API error (and of watch ERROR events)."""
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.body = status(code, reason, message, **details)
        self.code = code


def _field(obj: Obj, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur if isinstance(cur, str) else ""


def parse_field_selector(kind: Kind, text: str) -> Callable[[Obj], bool]:
    """`a=b,c!=d` (also `==`), restricted to the field labels the real server supports."""
    terms: list[tuple[str, bool, str]] = []
    for raw in filter(None, text.split(",")):
        m = re.fullmatch(r"([A-Za-z.]+)(==|=|!=)(.*)", raw)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector term {raw!r}")
        label, op, value = m.groups()
        if label not in kind.fields:
            raise ApiError(400, "BadRequest",
                           f'field label not supported: "{label}" for {kind.kind}')
        terms.append((label, op != "!=", value))

    def match(obj: Obj) -> bool:
        return all((_field(obj, label) == value) == eq for label, eq, value in terms)

    return match


def parse_label_selector(text: str) -> Callable[[Obj], bool]:
    """Equality-based label selectors (`a=b,c!=d`, also `==`, and a bare `key` for exists):
    what a client needs to read one Service's EndpointSlices by kubernetes.io/service-name."""
    terms: list[tuple[str, str | None, bool]] = []
    for raw in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"([A-Za-z0-9./_-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*))?", raw)
        if not m:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {raw!r}")
        key, op, value = m.groups()
        terms.append((key, value if op else None, op != "!="))

    def match(obj: Obj) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all((key in labels if value is None else (labels.get(key) == value) == eq)
                   for key, value, eq in terms)

    return match


def endpoint_slice(namespace: str, name: str, service: str, endpoints: list[Obj],
                   ports: list[Obj]) -> Obj:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": namespace, "name": name,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "nodemesh-tests"}},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class Event:
    rv: int
    kind: Kind
    type: str
    obj: Obj
    old: Obj | None  # the object before a MODIFIED, for field-selector transitions


@dataclass
class Watch:
    kind: Kind
    namespace: str | None
    match: Callable[[Obj], bool]
    bookmarks: bool
    request: web.Request
    queue: asyncio.Queue[Event | str] = field(default_factory=asyncio.Queue)


@dataclass(frozen=True)
class WatchRequest:
    """What a client asked for when it opened a watch (for assertions)."""

    resource: str
    namespace: str | None
    resource_version: str | None
    field_selector: str
    bookmarks: bool
    timeout_seconds: int | None


@dataclass(frozen=True)
class ListRequest:
    resource: str
    continue_token: str | None
    field_selector: str


@dataclass
class _Snapshot:
    rv: int
    items: list[Obj]


class ApiServer:
    """Start with `async with ApiServer(token=...) as server:`; `server.url` is the base URL."""

    def __init__(
        self,
        token: str | None = "test-token",
        history: int = 1000,
        tls: ssl.SSLContext | None = None,
        bookmark_interval: float | None = None,
        *,
        host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        """`netns`: listen in that network namespace (an address the test bed's nodes reach)."""
        self.host = host
        self.netns = netns
        self.port = 0
        self.local_url = ""  # where the test's own Kubectl reaches it (in the test's netns)
        self._local_site: web.BaseSite | None = None
        self.token = token
        self.tls = tls
        self.bookmark_interval = bookmark_interval
        self.objects: dict[tuple[str, str, str], Obj] = {}  # (plural, namespace, name)
        self.rv = 1
        self._history: deque[Event] = deque(maxlen=history)
        self._oldest_watchable = 1  # a watch from RV >= this can be served from history
        self._watches: list[Watch] = []
        self._held: asyncio.Event = asyncio.Event()
        self._held.set()
        self._lists_held = asyncio.Event()
        self._lists_held.set()
        self.down = False
        self._site: web.BaseSite | None = None
        self._throttle: tuple[int, int] = (0, 0)  # (requests left to refuse, Retry-After)
        self.forbidden: set[str] = set()
        self.request_times: list[float] = []
        self._snapshots: dict[str, _Snapshot] = {}
        self.log: list[Event] = []  # every change ever, unlike the bounded history
        self.watch_log: list[WatchRequest] = []
        self.list_log: list[ListRequest] = []
        self.unauthorized = 0
        self.tokens = TokenAuthority()
        self.cluster_role_bindings: dict[str, set[str]] = {}  # ClusterRole -> usernames
        self.token_reviews: list[tuple[str, Obj]] = []  # (caller, status) per TokenReview
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> ApiServer:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/version", self._version)
        app.router.add_get("/api", self._api_versions)
        app.router.add_get("/apis", self._api_groups)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        app.router.add_get("/openid/v1/jwks", self._jwks)
        for kind in KINDS.values():
            p = kind.prefix
            app.router.add_get(p, self._resource_list)
            app.router.add_route("*", f"{p}/{kind.plural}", self._collection(kind, None))
            if kind.namespaced:
                base = f"{p}/namespaces/{{namespace}}/{kind.plural}"
                app.router.add_route("*", base, self._collection(kind, "path"))
                app.router.add_route("*", base + "/{name}", self._item(kind, status_only=False))
                if kind.has_status:
                    app.router.add_route("*", base + "/{name}/status", self._item(kind, True))
            else:
                base = f"{p}/{kind.plural}/{{name}}"
                app.router.add_route("*", base, self._item(kind, status_only=False))
                app.router.add_route("*", base + "/status", self._item(kind, True))
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await self.start_serving()
        self.url = f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"
        self.local_url = self.local_url or self.url
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.drop_watches()
        self._held.set()
        self._lists_held.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def start_serving(self) -> None:
        """Listen (again, on the same port after `stop_serving`)."""
        assert self._runner is not None
        if self.netns is not None:
            with netns_mod.entered(self.netns):
                sock = socket.create_server((self.host, self.port), reuse_port=False)
        else:
            sock = socket.create_server((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._site = web.SockSite(self._runner, sock, ssl_context=self.tls)
        await self._site.start()
        if self.netns is not None and self._local_site is None:
            local = socket.create_server(("127.0.0.1", 0))
            port = local.getsockname()[1]
            self._local_site = web.SockSite(self._runner, local, ssl_context=self.tls)
            await self._local_site.start()
            self.local_url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        self.down = False

    async def stop_serving(self) -> None:
        """Down: the listener closes (new connections are refused) and every connection in use
        is reset when it next sends a request; the objects and history stay for the restart."""
        self.down = True
        self.drop_watches()
        if self._site is not None:
            await self._site.stop()
            self._site = None

    # -- test controls ---------------------------------------------------------------------

    def drop_watches(self) -> int:
        """Abort every open watch connection, as a proxy or load balancer reset would."""
        watches, self._watches = self._watches, []
        for w in watches:
            if w.request.transport is not None:
                w.request.transport.abort()
            w.queue.put_nowait("drop")
        return len(watches)

    def hold_watches(self) -> None:
        """New watch requests wait (unanswered) until `release_watches()`."""
        self._held.clear()

    def release_watches(self) -> None:
        self._held.set()

    def hold_lists(self) -> None:
        """New list requests wait (unanswered) until `release_lists()`."""
        self._lists_held.clear()

    def release_lists(self) -> None:
        self._lists_held.set()

    def throttle(self, requests: int, retry_after: int) -> None:
        """Answer the next `requests` requests 429 Too Many Requests, Retry-After seconds."""
        self._throttle = (requests, retry_after)

    def forbid(self, *resources: str) -> None:
        """403 on list/watch of these resources until `allow` (RBAC without the grant)."""
        self.forbidden.update(resources)

    def allow(self, *resources: str) -> None:
        self.forbidden.difference_update(resources)

    def compact(self) -> None:
        """Forget all history: a watch from any RV before now gets 410 Gone."""
        self._history.clear()
        self._oldest_watchable = self.rv
        self._snapshots.clear()

    def send_bookmarks(self) -> None:
        for w in self._watches:
            if w.bookmarks:
                w.queue.put_nowait("bookmark")

    def changes(self, resource: str) -> list[tuple[str, str, str, str]]:
        """Every change to a resource so far: (type, namespace/name, uid, resourceVersion)."""
        out = []
        for ev in self.log:
            if ev.kind.plural == resource:
                meta = ev.obj["metadata"]
                key = f"{meta['namespace']}/{meta['name']}" if ev.kind.namespaced else meta["name"]
                out.append((ev.type, key, meta["uid"], meta["resourceVersion"]))
        return out

    def put(self, resource: str, obj: Obj, status: Obj | None = None) -> Obj:
        """Create an object directly (bulk seeding, e.g. 10,000 pods for a benchmark): the same
        validation and versioning as a POST, then `status` as the kubelet would write it."""
        kind = KINDS[resource]
        ns = obj.get("metadata", {}).get("namespace", "") if kind.namespaced else ""
        created = self._create(kind, ns, obj)
        if status is None:
            return created
        name = created["metadata"]["name"]
        return self._update(kind, ns, name, {"status": status}, status_only=True)

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    def get(self, resource: str, namespace: str, name: str) -> Obj | None:
        return self.objects.get((resource, namespace, name))

    def items(self, resource: str) -> dict[str, Obj]:
        """Current objects keyed namespace/name (name for cluster-scoped), as clients key them."""
        return {
            (f"{ns}/{name}" if ns else name): obj
            for (plural, ns, name), obj in self.objects.items()
            if plural == resource
        }

    # -- storage ---------------------------------------------------------------------------

    def _commit(self, kind: Kind, type_: str, obj: Obj, old: Obj | None) -> None:
        if len(self._history) == self._history.maxlen:
            self._oldest_watchable = self._history[0].rv
        ev = Event(self.rv, kind, type_, copy.deepcopy(obj), old)
        self._history.append(ev)
        self.log.append(ev)
        for w in self._watches:
            if w.kind is kind:
                w.queue.put_nowait(ev)

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _create(self, kind: Kind, namespace: str, body: Any) -> Obj:
        obj = self._validate(kind, namespace, body)
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        name = meta.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ApiError(422, "Invalid", f"{kind.kind} {name!r} is invalid: metadata.name: "
                           "a lowercase RFC 1123 subdomain is required")
        key = (kind.plural, namespace, name)
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{kind.plural} "{name}" already exists',
                           name=name, kind=kind.plural)
        if kind.namespaced and ("namespaces", "", namespace) not in self.objects:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           name=namespace, kind="namespaces")
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        meta.pop("deletionTimestamp", None)
        if kind.plural == "pods":
            obj["status"] = {"phase": "Pending"}
        meta["resourceVersion"] = self._next_rv()
        self.objects[key] = obj
        self._commit(kind, "ADDED", obj, None)
        return obj

    def _update(self, kind: Kind, namespace: str, name: str, body: Any, status_only: bool) -> Obj:
        key = (kind.plural, namespace, name)
        old = self._existing(kind, key)
        new = self._validate(kind, namespace, body)
        meta = new["metadata"]
        if meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
        want_rv = meta.get("resourceVersion")
        if want_rv and want_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {kind.plural} '
                           f'"{name}": the object has been modified; please apply your changes '
                           "to the latest version and try again", name=name, kind=kind.plural)
        if status_only:
            merged = copy.deepcopy(old)
            merged["status"] = new.get("status", {})
            new = merged
        else:
            if kind.plural == "pods":  # a pod's status changes only through /status
                new.pop("status", None)
                if "status" in old:
                    new["status"] = old["status"]
            node = _field(old, "spec.nodeName")
            if kind.plural == "pods" and node and _field(new, "spec.nodeName") != node:
                raise ApiError(422, "Invalid", f'Pod "{name}" is invalid: spec: Forbidden: pod '
                               "updates may not change fields other than ... (spec.nodeName)")
            for k in ("uid", "creationTimestamp"):
                new["metadata"][k] = old["metadata"][k]
            gen = old["metadata"].get("generation", 1)
            new["metadata"]["generation"] = gen + (old.get("spec") != new.get("spec"))
        if _strip_rv(new) == _strip_rv(old):
            return old  # a no-op write does not bump the resourceVersion, like the real server
        new["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[key] = new
        self._commit(kind, "MODIFIED", new, old)
        return new

    def _delete(self, kind: Kind, namespace: str, name: str) -> Obj:
        key = (kind.plural, namespace, name)
        obj = copy.deepcopy(self._existing(kind, key))
        del self.objects[key]
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._commit(kind, "DELETED", obj, None)
        return obj

    def _existing(self, kind: Kind, key: tuple[str, str, str]) -> Obj:
        try:
            return self.objects[key]
        except KeyError:
            raise ApiError(404, "NotFound", f'{kind.plural} "{key[2]}" not found',
                           name=key[2], kind=kind.plural) from None

    @staticmethod
    def _validate(kind: Kind, namespace: str, body: Any) -> Obj:
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise ApiError(400, "BadRequest", "body must be a JSON object with object metadata")
        for key, want in (("kind", kind.kind), ("apiVersion", kind.api_version)):
            if body.get(key, want) != want:
                raise ApiError(400, "BadRequest", f"{key} {body.get(key)!r} does not match the "
                               f"endpoint (want {want!r})")
        obj = copy.deepcopy(body)
        obj["kind"], obj["apiVersion"] = kind.kind, kind.api_version
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            if meta.get("namespace", namespace) != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does "
                               "not match the namespace sent on the request")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        return obj

    # -- HTTP ------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if self.down:  # stopped: a kept-alive connection is reset, as a dead server's would be
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("API server stopped")
        self.request_times.append(time.monotonic())
        user = self._authenticate(request)
        if user is None:
            self.unauthorized += 1
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        request[_USER] = user
        left, retry_after = self._throttle
        if left > 0:
            self._throttle = (left - 1, retry_after)
            return web.json_response(
                status(429, "TooManyRequests", "Too many requests, please try again later.",
                       retryAfterSeconds=retry_after),
                status=429, headers={"Retry-After": str(retry_after)})
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except ApiError as e:
            return web.json_response(e.body, status=e.code)
        except web.HTTPException as e:
            reason = "MethodNotAllowed" if e.status == 405 else "NotFound"
            return web.json_response(status(e.status, reason, e.reason), status=e.status)

    def _authenticate(self, request: web.Request) -> str | None:
        """The caller's username: the static token is the cluster admin; a bound service
        account token for this server's own audience is that service account."""
        header = request.headers.get("Authorization", "")
        if self.token is None or header == f"Bearer {self.token}":
            return "kubernetes-admin"
        if not header.startswith("Bearer "):
            return None
        review = self.tokens.review(self.get_any, header.removeprefix("Bearer "))
        if not review.get("authenticated"):
            return None
        name: str = review["user"]["username"]
        return name

    # -- service accounts, tokens, TokenReview -------------------------------------------

    def get_any(self, resource: str, namespace: str, name: str) -> Obj | None:
        return self.objects.get((resource, namespace, name))

    def mint_token(self, namespace: str, service_account: str,
                   audiences: tuple[str, ...] | None = None, *, pod: str | None = None,
                   expiration_seconds: int = 3600, now: float | None = None) -> str:
        """A TokenRequest: a token for the service account, bound to `pod` if given (the pod
        must exist and run as that service account), for `audiences` (default: this server)."""
        return self.tokens.mint(self.get_any, namespace, service_account, audiences, pod=pod,
                                expiration_seconds=expiration_seconds, now=now)

    def bind_cluster_role(self, role: str, user: str) -> None:
        """A ClusterRoleBinding of `role` to `user` (e.g. system:serviceaccount:ns:sa)."""
        self.cluster_role_bindings.setdefault(role, set()).add(user)

    async def _token_review(self, request: web.Request) -> web.Response:
        user = request[_USER]
        if user != "kubernetes-admin" and user not in self.cluster_role_bindings.get(
                "system:auth-delegator", set()):
            raise ApiError(403, "Forbidden", f'tokenreviews.authentication.k8s.io is forbidden: '
                           f'User "{user}" cannot create resource "tokenreviews" in API group '
                           '"authentication.k8s.io" at the cluster scope',
                           group="authentication.k8s.io", kind="tokenreviews")
        body = await _json_body(request)
        spec = body.get("spec") if isinstance(body, dict) else None
        if body.get("kind", "TokenReview") != "TokenReview" or not isinstance(spec, dict):
            raise ApiError(400, "BadRequest", "body must be a TokenReview with a spec")
        token, audiences = spec.get("token"), spec.get("audiences") or []
        if not isinstance(token, str) or not token:
            raise ApiError(422, "Invalid", "TokenReview.authentication.k8s.io is invalid: "
                           "spec.token: Required value: token must be specified")
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise ApiError(400, "BadRequest", "spec.audiences must be a list of strings")
        review = self.tokens.review(self.get_any, token, audiences)
        self.token_reviews.append((user, review))
        return web.json_response({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                                  "metadata": {"creationTimestamp": None},
                                  "spec": spec, "status": review}, status=201)

    async def _jwks(self, _: web.Request) -> web.Response:
        return web.json_response(self.tokens.jwks())

    async def _version(self, _: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0-nodemesh",
                                  "platform": "linux/amd64"})

    async def _api_versions(self, _: web.Request) -> web.Response:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"],
                                  "serverAddressByClientCIDRs": []})

    async def _api_groups(self, _: web.Request) -> web.Response:
        groups = sorted({(k.group, k.version) for k in KINDS.values() if k.group})
        gvs = [(g, {"groupVersion": f"{g}/{v}", "version": v}) for g, v in groups]
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [gv], "preferredVersion": gv} for g, gv in gvs]})

    async def _resource_list(self, request: web.Request) -> web.Response:
        prefix = request.path.rstrip("/")
        kinds = [k for k in KINDS.values() if k.prefix == prefix]
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        return web.json_response({
            "kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": kinds[0].api_version,
            "resources": [{"name": k.plural, "singularName": k.kind.lower(),
                           "namespaced": k.namespaced, "kind": k.kind, "verbs": verbs}
                          for k in kinds],
        })

    def _collection(self, kind: Kind, ns_from: str | None) -> Callable[..., Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            namespace = request.match_info["namespace"] if ns_from else None
            if request.method == "GET":
                q = request.query
                by_field = parse_field_selector(kind, q.get("fieldSelector", ""))
                by_label = parse_label_selector(q.get("labelSelector", ""))

                def match(obj: Obj) -> bool:
                    return by_field(obj) and by_label(obj)
                watch = q.get("watch") in ("1", "true")
                if kind.plural in self.forbidden:
                    verb = "watch" if watch else "list"
                    raise ApiError(403, "Forbidden", f'{kind.plural} is forbidden: User '
                                   '"system:serviceaccount:nodemesh-system:nodemesh-agent" '
                                   f'cannot {verb} resource "{kind.plural}" in API group '
                                   f'"{kind.group}" at the cluster scope',
                                   group=kind.group, kind=kind.plural)
                if watch:
                    return await self._watch(request, kind, namespace, match)
                await self._lists_held.wait()
                return self._list(request, kind, namespace, match)
            if request.method == "POST":
                if namespace is None and kind.namespaced:
                    raise ApiError(405, "MethodNotAllowed", "create needs a namespaced path")
                body = await _json_body(request)
                obj = self._create(kind, namespace or "", body)
                return web.json_response(obj, status=201)
            raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported here")

        return handler

    def _item(self, kind: Kind, status_only: bool) -> Callable[..., Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            namespace = request.match_info.get("namespace", "")
            name = request.match_info["name"]
            key = (kind.plural, namespace, name)
            if request.method == "GET":
                return web.json_response(self._existing(kind, key))
            if request.method == "PUT":
                body = await _json_body(request)
                return web.json_response(self._update(kind, namespace, name, body, status_only))
            if request.method == "PATCH":
                ctype = request.content_type
                if ctype not in ("application/merge-patch+json",
                                 "application/strategic-merge-patch+json"):
                    raise ApiError(415, "UnsupportedMediaType",
                                   f"the body of the request was in an unknown format: {ctype}")
                patch = await _json_body(request)
                # A copy: the stored object is never changed in place (lists hold references).
                merged = merge_patch(copy.deepcopy(self._existing(kind, key)), patch)
                merged.get("metadata", {}).pop("resourceVersion", None)
                if isinstance(patch, dict):
                    rv = patch.get("metadata", {}).get("resourceVersion")
                    if rv:  # a patch that names a resourceVersion is a precondition
                        merged["metadata"]["resourceVersion"] = rv
                return web.json_response(self._update(kind, namespace, name, merged, status_only))
            if request.method == "DELETE" and not status_only:
                return web.json_response(self._delete(kind, namespace, name))
            raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported here")

        return handler

    def _selected(self, kind: Kind, namespace: str | None, match: Callable[[Obj], bool],
                  obj: Obj) -> bool:
        if namespace is not None and obj["metadata"].get("namespace") != namespace:
            return False
        return match(obj)

    def _list(self, request: web.Request, kind: Kind, namespace: str | None,
              match: Callable[[Obj], bool]) -> web.Response:
        q = request.query
        token = q.get("continue")
        self.list_log.append(ListRequest(kind.plural, token, q.get("fieldSelector", "")))
        if token:
            snap = self._snapshots.get(token)
            if snap is None:
                raise ApiError(410, "Expired", "The provided continue parameter is too old to "
                               "display a consistent list result. You can start a new list "
                               "without the continue parameter.")
            del self._snapshots[token]
        else:
            # References suffice: a change replaces the stored object, never edits it in place.
            items = [o for (plural, _, _), o in sorted(self.objects.items())
                     if plural == kind.plural and self._selected(kind, namespace, match, o)]
            snap = _Snapshot(self.rv, items)
        limit = int(q.get("limit", "0") or 0)
        page, rest = (snap.items[:limit], snap.items[limit:]) if limit > 0 else (snap.items, [])
        meta: Obj = {"resourceVersion": str(snap.rv)}
        if rest:
            nxt = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            self._snapshots[nxt] = _Snapshot(snap.rv, rest)
            meta["continue"] = nxt
            meta["remainingItemCount"] = len(rest)
        page = [{k: v for k, v in item.items() if k not in ("kind", "apiVersion")}
                for item in page]
        return web.json_response({"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                                  "metadata": meta, "items": page})

    async def _watch(self, request: web.Request, kind: Kind, namespace: str | None,
                     match: Callable[[Obj], bool]) -> web.StreamResponse:
        q = request.query
        rv_text = q.get("resourceVersion")
        bookmarks = q.get("allowWatchBookmarks") in ("1", "true")
        timeout = int(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        self.watch_log.append(WatchRequest(kind.plural, namespace, rv_text,
                                           q.get("fieldSelector", ""), bookmarks, timeout))
        await self._held.wait()
        since: int | None = None
        if rv_text not in (None, "", "0"):
            try:
                since = int(rv_text)
            except ValueError:
                raise ApiError(400, "BadRequest",
                               f"invalid resourceVersion {rv_text!r}") from None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if since is not None and since < self._oldest_watchable:
            err = status(410, "Expired", f"too old resource version: {since} "
                         f"({self._oldest_watchable})")
            await _send(response, "ERROR", err)
            await response.write_eof()
            return response

        watch = Watch(kind, namespace, match, bookmarks, request)
        # History replay and registration happen without an await in between, so no event can
        # fall between them.
        if since is None:  # "any"/"most recent": synthetic ADDED for the current state first
            backlog = [Event(self.rv, kind, "ADDED", o, None)
                       for (plural, _, _), o in sorted(self.objects.items())
                       if plural == kind.plural]
        else:
            backlog = [e for e in self._history if e.kind is kind and e.rv > since]
        for ev in backlog:
            watch.queue.put_nowait(ev)
        self._watches.append(watch)
        try:
            if await self._stream(response, watch, timeout):
                await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the client went away
        finally:
            if watch in self._watches:
                self._watches.remove(watch)
        return response

    async def _stream(self, response: web.StreamResponse, watch: Watch,
                      timeout: int | None) -> bool:
        """Send events until the timeout (True: end cleanly) or a drop (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        kind = watch.kind
        while True:
            wait = self.bookmark_interval if watch.bookmarks else None
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    return True
                wait = left if wait is None else min(wait, left)
            try:
                item = await asyncio.wait_for(watch.queue.get(), wait)
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    return True
                item = "bookmark"
            if item == "drop":
                return False
            if item == "bookmark":
                bm = {"kind": kind.kind, "apiVersion": kind.api_version,
                      "metadata": {"resourceVersion": str(self.rv)}}
                await _send(response, "BOOKMARK", bm)
            elif isinstance(item, Event) and (out := self._translate(watch, item)):
                await _send(response, *out)

    def _translate(self, w: Watch, ev: Event) -> tuple[str, Obj] | None:
        """Apply the watch's selection the way the real server does: an object that stops
        matching is DELETED for this watch, one that starts matching is ADDED."""
        now = self._selected(w.kind, w.namespace, w.match, ev.obj)
        if ev.type != "MODIFIED" or ev.old is None:
            return (ev.type, ev.obj) if now else None
        before = self._selected(w.kind, w.namespace, w.match, ev.old)
        if now and before:
            return ("MODIFIED", ev.obj)
        if now:
            return ("ADDED", ev.obj)
        if before:
            return ("DELETED", ev.obj)
        return None


async def _send(response: web.StreamResponse, type_: str, obj: Obj) -> None:
    await response.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except ValueError as e:
        raise ApiError(400, "BadRequest", f"request body is not JSON: {e}") from None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _strip_rv(obj: Obj) -> Obj:
    out = copy.deepcopy(obj)
    out["metadata"].pop("resourceVersion", None)
    return out


class Kubectl:
    """The test's hands: changes objects over HTTP, the way kubectl would."""

    def __init__(self, server: ApiServer, ssl_context: ssl.SSLContext | None = None) -> None:
        self.server = server
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Kubectl:
        connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl else None
        self._session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _path(self, resource: str, namespace: str, name: str | None = None) -> str:
        kind = KINDS[resource]
        path = kind.prefix
        if kind.namespaced:
            path += f"/namespaces/{namespace}"
        path += f"/{resource}"
        return path + (f"/{name}" if name else "")

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str = "application/json") -> Obj:
        assert self._session is not None, "use `async with Kubectl(server)`"
        headers = {"Content-Type": content_type}
        if self.server.token is not None:
            headers["Authorization"] = f"Bearer {self.server.token}"
        data = json.dumps(body).encode() if body is not None else None
        async with self._session.request(method, self.server.local_url + path, data=data,
                                         headers=headers) as r:
            out: Obj = await r.json()
            if r.status >= 400:
                raise ApiError(r.status, out.get("reason", ""), out.get("message", ""))
            return out

    async def create(self, resource: str, obj: Obj) -> Obj:
        ns = obj.get("metadata", {}).get("namespace", "")
        return await self.request("POST", self._path(resource, ns), obj)

    async def replace(self, resource: str, obj: Obj) -> Obj:
        meta = obj["metadata"]
        path = self._path(resource, meta.get("namespace", ""), meta["name"])
        return await self.request("PUT", path, obj)

    async def patch(self, resource: str, namespace: str, name: str, patch: Obj,
                    subresource: str = "") -> Obj:
        path = self._path(resource, namespace, name) + (f"/{subresource}" if subresource else "")
        return await self.request("PATCH", path, patch, "application/merge-patch+json")

    async def delete(self, resource: str, namespace: str, name: str) -> Obj:
        return await self.request("DELETE", self._path(resource, namespace, name))

    # Shorthands for the objects the tests use.

    async def namespace(self, name: str) -> Obj:
        return await self.create("namespaces", {"metadata": {"name": name}})

    async def pod(self, namespace: str, name: str, node: str, ip: str | None = None,
                  service_account: str = "default") -> Obj:
        pod = await self.create("pods", {
            "metadata": {"namespace": namespace, "name": name, "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": service_account,
                     "containers": [{"name": "app", "image": "app:1"}]},
        })
        if ip is not None:  # what the kubelet would report once the sandbox is up
            pod = await self.patch("pods", namespace, name, {
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}, "status")
        return pod

    async def endpoint_slice(self, namespace: str, name: str, service: str,
                             endpoints: list[Obj], ports: list[Obj]) -> Obj:
        """What the EndpointSlice controller (or a Service's own manager) publishes."""
        return await self.create("endpointslices", endpoint_slice(namespace, name, service,
                                                                  endpoints, ports))

    async def service_account(self, namespace: str, name: str) -> Obj:
        return await self.create("serviceaccounts", {"metadata": {"namespace": namespace,
                                                                  "name": name}})

    async def node(self, name: str) -> Obj:
        return await self.create("nodes", {"metadata": {"name": name}})

    async def authorization_policy(self, namespace: str, name: str, spec: Obj) -> Obj:
        return await self.create("authorizationpolicies", {
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"namespace": namespace, "name": name}, "spec": spec})


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate for 127.0.0.1, written to a directory the caller owns."""

    ca_pem: bytes
    ca_file: Path
    server_context: ssl.SSLContext

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca_pem.decode())


def make_tls(directory: Path) -> TlsFiles:
    """A real ECDSA P-256 CA and a 127.0.0.1 server certificate signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-apiserver-ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(ca_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        chain, key_file = Path(tmp) / "server.crt", Path(tmp) / "server.key"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        server_ctx.load_cert_chain(chain, key_file)
    return TlsFiles(ca_pem, ca_file, server_ctx)
