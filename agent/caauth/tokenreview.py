"""Authenticate node agents by their Kubernetes ServiceAccount token, as istiod authenticates
ztunnel.

Two ways to check a token (`TokenChecker`):
- `ApiTokenReviewer` asks the API server (authentication.k8s.io/v1 TokenReview, which needs the
  CA's own ServiceAccount bound to system:auth-delegator). The API server also checks that the
  bound pod still exists, and says which node it runs on (user.extra
  authentication.kubernetes.io/node-name, Kubernetes 1.30+).
- `JwksTokenVerifier` checks the signature against the cluster's OIDC issuer key set (PyJWT),
  without a call per request; the bound pod is then checked against the CA's pod cache.

`KubeTokenAuthenticator` turns a checked token into a Caller: only the configured agent
ServiceAccounts are accepted (istiod's CA_TRUSTED_NODE_ACCOUNTS), the token must be bound to a
pod, and the caller's node is the node-name claim where the API server provides it, else the
bound pod's spec.nodeName from the pod cache (whose uid must match the token's).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import jwt

from agent.caauth.podindex import PodCacheNotReadyError, PodIndex
from agent.identity.ca import Caller, CaRejection, Status
from agent.identity.metrics import CaMetrics
from agent.identity.spiffe import Identity, IdentityError
from agent.sources.kube.config import ClusterConfig, auth_headers

log = logging.getLogger(__name__)

DEFAULT_AUDIENCE = "istio-ca"  # what istiod expects and ztunnel's projected token carries
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
_SA_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class CheckedToken:
    """What a valid ServiceAccount token says about its holder."""

    namespace: str
    service_account: str
    pod_name: str | None
    pod_uid: str | None
    node_name: str | None

    @property
    def username(self) -> str:
        return f"{_SA_PREFIX}{self.namespace}:{self.service_account}"


def _unauthenticated(message: str, reason: str) -> CaRejection:
    return CaRejection(Status.UNAUTHENTICATED, message, reason)


def _unavailable(message: str) -> CaRejection:
    return CaRejection(Status.UNAVAILABLE, message, "token_check_unavailable")


class TokenChecker(Protocol):
    async def check(self, token: str) -> CheckedToken:
        """The token's holder, or CaRejection (UNAUTHENTICATED: a bad token; UNAVAILABLE: the
        CA cannot check tokens right now)."""
        ...

    async def close(self) -> None: ...


def _split_username(username: str) -> tuple[str, str]:
    ns, _, sa = username.removeprefix(_SA_PREFIX).partition(":")
    if not username.startswith(_SA_PREFIX) or not ns or not sa:
        raise _unauthenticated(f"token is for user {username!r}, not a ServiceAccount",
                               "not_service_account")
    return ns, sa


class ApiTokenReviewer:
    """TokenReview against the API server, with the CA's own credentials."""

    def __init__(self, config: ClusterConfig, audiences: Sequence[str] = (DEFAULT_AUDIENCE,),
                 timeout: float = 10.0) -> None:
        self.config = config
        self.audiences = list(audiences)
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self.config.ssl_context or True)
            self._session = aiohttp.ClientSession(connector=connector, headers={
                "Accept": "application/json", "User-Agent": "nodemesh-ca"})
        return self._session

    async def check(self, token: str) -> CheckedToken:
        creds = self.config.credentials
        headers = await auth_headers(creds)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": self.audiences}}
        extra: dict[str, Any] = {}
        if self.config.server_hostname:
            extra["server_hostname"] = self.config.server_hostname
        url = self.config.server + "/apis/authentication.k8s.io/v1/tokenreviews"
        try:
            async with self._http().post(url, json=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout),
                                         **extra) as resp:
                text = await resp.text(errors="replace")
                if resp.status == 401 and creds is not None:
                    creds.invalidate()  # our own token rotated: re-read it next time
                if resp.status not in (200, 201):
                    hint = (" (the CA's ServiceAccount needs the system:auth-delegator "
                            "ClusterRole)" if resp.status == 403 else "")
                    raise _unavailable(f"CA cannot review tokens: the API server answered "
                                       f"{resp.status} to TokenReview{hint}: {text[:200]}")
                doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _unavailable(f"CA cannot review tokens: API server {self.config.server} "
                               f"unreachable: {type(e).__name__}: {e}") from e
        return self._parse(doc)

    def _parse(self, doc: Any) -> CheckedToken:
        status = doc.get("status") if isinstance(doc, dict) else None
        if not isinstance(status, dict):
            raise _unavailable("TokenReview answer has no status")
        if not status.get("authenticated"):
            raise _unauthenticated(f"ServiceAccount token refused by TokenReview: "
                                   f"{status.get('error') or 'not authenticated'}",
                                   "invalid_token")
        # A client that sets spec.audiences must check the server honoured them.
        if not set(status.get("audiences") or []) & set(self.audiences):
            raise _unauthenticated(f"TokenReview did not confirm the audience "
                                   f"{self.audiences} (got {status.get('audiences')})",
                                   "invalid_token")
        user = status.get("user") or {}
        ns, sa = _split_username(str(user.get("username", "")))
        extra = user.get("extra") or {}

        def one(key: str) -> str | None:
            values = extra.get(key)
            return values[0] if isinstance(values, list) and values else None

        return CheckedToken(ns, sa, one(EXTRA_POD_NAME), one(EXTRA_POD_UID),
                            one(EXTRA_NODE_NAME))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class JwksTokenVerifier:
    """Verify tokens against the issuer's JSON Web Key Set (fetched from `jwks_url` with the CA's
    cluster credentials, re-fetched when a token names an unknown key, at most every 30 s)."""

    def __init__(self, config: ClusterConfig, issuer: str, jwks_url: str,
                 audiences: Sequence[str] = (DEFAULT_AUDIENCE,), refetch: float = 30.0) -> None:
        self.config = config
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.audiences = list(audiences)
        self.refetch = refetch
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = 0.0
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def _load(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.config.ssl_context or True))
        headers = await auth_headers(self.config.credentials)
        try:
            async with self._session.get(self.jwks_url, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status != 200:
                    raise _unavailable(f"CA cannot fetch the token signing keys from "
                                       f"{self.jwks_url}: HTTP {resp.status}")
                doc = await resp.json(content_type=None)
            keys = jwt.PyJWKSet.from_dict(doc)
        except (aiohttp.ClientError, TimeoutError, jwt.PyJWTError) as e:
            raise _unavailable(f"CA cannot fetch the token signing keys from {self.jwks_url}: "
                               f"{type(e).__name__}: {e}") from e
        self._keys = {k.key_id: k for k in keys.keys if k.key_id}
        self._fetched = time.monotonic()

    async def _key(self, kid: str) -> jwt.PyJWK:
        async with self._lock:
            if kid not in self._keys and time.monotonic() - self._fetched >= self.refetch:
                await self._load()
        key = self._keys.get(kid)
        if key is None:
            raise _unauthenticated(f"token is signed with key {kid!r}, which the issuer's key "
                                   "set does not hold (forged, or from another cluster)",
                                   "invalid_token")
        return key

    async def check(self, token: str) -> CheckedToken:
        try:
            kid = jwt.get_unverified_header(token).get("kid") or ""
        except jwt.PyJWTError as e:
            raise _unauthenticated(f"ServiceAccount token is not a JWT: {e}",
                                   "invalid_token") from None
        key = await self._key(str(kid))
        try:
            claims = jwt.decode(token, key, algorithms=["RS256", "ES256"],
                                audience=self.audiences, issuer=self.issuer, leeway=60,
                                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise _unauthenticated("ServiceAccount token has expired", "invalid_token") from None
        except jwt.InvalidAudienceError:
            raise _unauthenticated(f"ServiceAccount token is not for audience "
                                   f"{self.audiences}", "invalid_token") from None
        except jwt.InvalidSignatureError:
            raise _unauthenticated("ServiceAccount token signature does not verify (forged)",
                                   "invalid_token") from None
        except jwt.PyJWTError as e:
            raise _unauthenticated(f"ServiceAccount token refused: {e}",
                                   "invalid_token") from None
        ns, sa = _split_username(str(claims.get("sub", "")))
        k8s = claims.get("kubernetes.io") or {}
        pod = k8s.get("pod") or {}
        node = k8s.get("node") or {}
        return CheckedToken(ns, sa, pod.get("name"), pod.get("uid"), node.get("name"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class KubeTokenAuthenticator:
    """A ServiceAccount token -> the calling node agent (ca.TokenAuthenticator)."""

    def __init__(self, checker: TokenChecker, pods: PodIndex,
                 agent_accounts: Iterable[tuple[str, str]], trust_domain: str,
                 metrics: CaMetrics | None = None) -> None:
        self.checker = checker
        self.pods = pods
        self.agent_accounts = frozenset(agent_accounts)
        if not self.agent_accounts:
            raise ValueError("name at least one node agent ServiceAccount (namespace/name)")
        self.trust_domain = trust_domain
        self.metrics = metrics or CaMetrics()

    async def authenticate(self, token: str) -> Caller:
        try:
            checked = await self.checker.check(token)
        except CaRejection as r:
            self.metrics.token_reviews.labels(r.reason).inc()
            raise
        self.metrics.token_reviews.labels("authenticated").inc()
        who = checked.username
        if (checked.namespace, checked.service_account) not in self.agent_accounts:
            allowed = ", ".join(sorted(f"{n}/{s}" for n, s in self.agent_accounts))
            raise CaRejection(Status.PERMISSION_DENIED,
                            f"caller {who} is not a node agent ServiceAccount (this CA accepts "
                            f"{allowed})", "not_agent_account")
        if not checked.pod_name:
            raise _unauthenticated(f"token of {who} is not bound to a pod: mount a projected "
                                   "serviceAccountToken volume", "token_not_pod_bound")
        node = checked.node_name or self._node_of_pod(checked)
        try:
            identity = Identity(self.trust_domain, checked.namespace, checked.service_account)
        except IdentityError as e:
            raise _unauthenticated(f"caller {who}: {e}", "not_service_account") from e
        return Caller(node, f"{who} (pod {checked.namespace}/{checked.pod_name}, node {node})",
                      identity)

    def _node_of_pod(self, checked: CheckedToken) -> str:
        assert checked.pod_name is not None
        try:
            pod = self.pods.pod(checked.namespace, checked.pod_name)
        except PodCacheNotReadyError as e:
            raise CaRejection(Status.UNAVAILABLE, str(e), "pod_cache_not_ready") from e
        where = f"{checked.namespace}/{checked.pod_name}"
        if pod is None:
            raise _unauthenticated(f"caller pod {where} is not running on any node",
                                   "caller_pod_unknown")
        if checked.pod_uid and pod.uid != checked.pod_uid:
            raise _unauthenticated(f"caller pod {where} has uid {pod.uid}, the token was bound "
                                   f"to uid {checked.pod_uid} (pod re-created; retry)",
                                   "caller_pod_unknown")
        if pod.service_account != checked.service_account:
            raise _unauthenticated(f"caller pod {where} runs as ServiceAccount "
                                   f"{pod.service_account}, not {checked.service_account}",
                                   "caller_pod_unknown")
        return pod.node
