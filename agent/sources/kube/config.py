"""Where the API server is and how to authenticate to it: in-cluster service account, a
kubeconfig file, or explicit values.

Projected service-account tokens rotate (the kubelet rewrites the file well before expiry), so a
`TokenFile` re-reads the file periodically and at once after a 401. A kubeconfig user with an
`exec` plugin (the cloud providers' logins: aws eks get-token, gke-gcloud-auth-plugin,
kubelogin) gets `ExecCredentials`: the plugin is run by kubernetes_asyncio's ExecProvider (the
client-go exec protocol, KUBERNETES_EXEC_INFO included), its token kept until the
expirationTimestamp it gives (or, without one, until a 401) and the plugin run again then.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import ipaddress
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from agent.identity import tlsmem

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REFRESH = 60.0  # client-go re-reads the token file at this period too
EXEC_EARLY = 10.0  # run the exec plugin again this long before its token expires


class KubeConfigError(Exception):
    """No usable cluster configuration: the message says what is missing and where."""


class Credentials(Protocol):
    async def renew(self) -> None:
        """Before each request: get a token if there is none or it is about to expire."""

    def token(self) -> str | None: ...

    def invalidate(self) -> None:
        """The server rejected the token: read it afresh next time."""

    def describe(self) -> str: ...


class StaticToken:
    def __init__(self, value: str) -> None:
        self._value = value

    async def renew(self) -> None:
        pass

    def token(self) -> str | None:
        return self._value

    def invalidate(self) -> None:
        pass  # nothing to re-read

    def describe(self) -> str:
        return "a fixed bearer token"


class TokenFile:
    """A bearer token read from a file, re-read every `refresh` seconds and after a 401."""

    def __init__(
        self,
        path: Path,
        refresh: float = TOKEN_REFRESH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.refresh = refresh
        self._clock = clock
        self._value: str | None = None
        self._read_at = 0.0

    async def renew(self) -> None:
        pass  # token() re-reads when due: a file read does not need the event loop

    def token(self) -> str | None:
        now = self._clock()
        if self._value is None or now - self._read_at >= self.refresh:
            try:
                value = self.path.read_text().strip()
            except OSError as e:
                if self._value is None:
                    raise KubeConfigError(
                        f"cannot read the bearer token file {self.path}: {e}") from e
                value = self._value  # keep the last token over a transient read failure
            if not value:
                raise KubeConfigError(f"the bearer token file {self.path} is empty")
            self._value, self._read_at = value, now
        return self._value

    def invalidate(self) -> None:
        self._value = None

    def describe(self) -> str:
        return f"the bearer token in {self.path}"


class ExecCredentials:
    """A bearer token from a kubeconfig `exec` plugin, run by kubernetes_asyncio's ExecProvider.

    Plugins that return a client certificate instead of a token are refused with a clear error
    (the TLS context is fixed when the source starts)."""

    def __init__(self, spec: Any, base: Path, where: str,
                 clock: Callable[[], float] = time.time) -> None:
        if not isinstance(spec, dict):
            raise KubeConfigError(f"{where}: exec plugin: want a mapping, got {spec!r}")
        spec = dict(spec)
        command = str(spec.get("command", ""))
        if os.sep in command and not os.path.isabs(command):
            spec["command"] = str(base / command)  # as client-go: relative to the kubeconfig
        self.command = command
        self.where = where
        self._clock = clock
        # Imported here: kubernetes_asyncio costs ~60 MiB resident, and only exec plugins use it.
        from kubernetes_asyncio.config.config_exception import ConfigException  # noqa: PLC0415
        from kubernetes_asyncio.config.exec_provider import ExecProvider  # noqa: PLC0415
        from kubernetes_asyncio.config.kube_config import ConfigNode  # noqa: PLC0415

        try:
            self._provider = ExecProvider(ConfigNode("exec", spec))
        except (ConfigException, KeyError, TypeError) as e:
            raise KubeConfigError(f"{where}: exec plugin {command!r}: {e}") from e
        self._token: str | None = None
        self._expiry: float | None = None
        self._running = asyncio.Lock()  # the reflectors ask together: run the plugin once

    def _valid(self) -> bool:
        return self._token is not None and (self._expiry is None
                                            or self._clock() < self._expiry - EXEC_EARLY)

    async def renew(self) -> None:
        if self._valid():
            return
        async with self._running:
            if not self._valid():
                await self._run()

    async def _run(self) -> None:
        from kubernetes_asyncio.config.config_exception import ConfigException  # noqa: PLC0415

        try:
            status = await self._provider.run()
        except (ConfigException, OSError) as e:
            raise KubeConfigError(f"{self.where}: exec plugin {self.command!r} failed: {e}") from e
        token = status.get("token") if isinstance(status, dict) else None
        if not isinstance(token, str) or not token:
            raise KubeConfigError(f"{self.where}: exec plugin {self.command!r} printed no "
                                  "status.token (plugins that return a client certificate are not "
                                  "supported)")
        self._expiry = _rfc3339(status.get("expirationTimestamp"), self.where)
        self._token = token

    def token(self) -> str | None:
        return self._token

    def invalidate(self) -> None:
        self._token = None  # rejected: run the plugin again, whatever its expiry said

    def describe(self) -> str:
        return f"the token from exec plugin {self.command!r}"


async def auth_headers(creds: Credentials | None) -> dict[str, str]:
    """The Authorization header for one request: renews first (an exec plugin runs here when
    its token is due)."""
    if creds is None:
        return {}
    await creds.renew()
    token = creds.token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _rfc3339(value: Any, where: str) -> float | None:
    if value is None:
        return None
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError as e:
        raise KubeConfigError(f"{where}: exec plugin expirationTimestamp {value!r}: {e}") from e


@dataclass(frozen=True)
class ClusterConfig:
    server: str  # base URL, e.g. https://10.96.0.1:443
    ssl_context: ssl.SSLContext | None  # None only for plain http:// (tests)
    credentials: Credentials | None
    namespace: str | None = None
    server_hostname: str | None = None  # TLS name to verify when it differs from the URL host
    origin: str = "explicit"  # where this came from, for error messages


def explicit(
    server: str,
    token: str | None = None,
    token_file: Path | None = None,
    ca_file: Path | None = None,
    ca_data: str | None = None,
) -> ClusterConfig:
    creds: Credentials | None = None
    if token is not None and token_file is not None:
        raise KubeConfigError("give a token or a token file, not both")
    if token is not None:
        creds = StaticToken(token)
    elif token_file is not None:
        creds = TokenFile(token_file)
    return ClusterConfig(server.rstrip("/"), _tls(server, ca_file, ca_data), creds)


def in_cluster(
    env: Mapping[str, str] = os.environ,
    directory: Path = SERVICE_ACCOUNT_DIR,
    token_refresh: float = TOKEN_REFRESH,
) -> ClusterConfig:
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeConfigError("not running in a pod: KUBERNETES_SERVICE_HOST/PORT are not set "
                              "(outside a cluster, give a kubeconfig)")
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a DNS name
    token, ca = directory / "token", directory / "ca.crt"
    for path in (token, ca):
        if not path.is_file():
            raise KubeConfigError(f"{path} is missing: is the service account token mounted "
                                  "(automountServiceAccountToken)?")
    ns_file = directory / "namespace"
    namespace = ns_file.read_text().strip() if ns_file.is_file() else None
    server = f"https://{host}:{port}"
    creds = TokenFile(token, token_refresh)
    creds.token()  # fail now, with the path in the message, if it is unreadable
    return ClusterConfig(server, _tls(server, ca, None), creds, namespace, origin="in-cluster")


def default_kubeconfig(env: Mapping[str, str] = os.environ) -> Path:
    """$KUBECONFIG (its first existing entry; entries are not merged) or ~/.kube/config."""
    for entry in filter(None, env.get("KUBECONFIG", "").split(os.pathsep)):
        if Path(entry).is_file():
            return Path(entry)
    return Path(env.get("HOME", str(Path.home()))) / ".kube" / "config"


def from_kubeconfig(path: Path | None = None, context: str | None = None) -> ClusterConfig:
    """The cluster and user of `context` (default: current-context) in a kubeconfig file.

    Supported: server, certificate-authority(-data), insecure-skip-tls-verify, tls-server-name;
    token, tokenFile, client-certificate(-data) + client-key(-data), exec plugins. The removed
    auth-provider plugins (gcp, azure, oidc) are refused: a KubeConfigError says so.
    """
    path = path or default_kubeconfig()
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise KubeConfigError(f"cannot read kubeconfig {path}: {e}") from e
    except yaml.YAMLError as e:
        raise KubeConfigError(f"kubeconfig {path} is not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise KubeConfigError(f"kubeconfig {path} is not a mapping")
    name = context or doc.get("current-context")
    if not name:
        raise KubeConfigError(f"kubeconfig {path} has no current-context; name a context")
    ctx = _named(doc, "contexts", "context", name, path)
    cluster = _named(doc, "clusters", "cluster", ctx.get("cluster"), path)
    user = _named(doc, "users", "user", ctx.get("user"), path) if ctx.get("user") else {}
    base = path.parent
    where = f"kubeconfig {path} (context {name})"

    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise KubeConfigError(f"{where}: cluster server {server!r} is not an http(s) URL")
    if "auth-provider" in user:
        raise KubeConfigError(f"{where}: user authenticates with an auth-provider plugin, which "
                              "Kubernetes removed in 1.26; use its exec plugin replacement, a "
                              "token or a client certificate")
    ca_file = _path(cluster.get("certificate-authority"), base)
    ca_data = _b64(cluster.get("certificate-authority-data"), where, "certificate-authority-data")
    ctx_ssl = _tls(server, ca_file, ca_data, insecure=bool(cluster.get("insecure-skip-tls-verify")))
    if ctx_ssl is not None:
        _client_cert(ctx_ssl, user, base, where)

    creds: Credentials | None = None
    if "exec" in user:
        creds = ExecCredentials(user["exec"], base, where)
    elif isinstance(user.get("token"), str):
        creds = StaticToken(user["token"])
    elif user.get("tokenFile"):
        creds = TokenFile(_path(user["tokenFile"], base) or Path())
    return ClusterConfig(
        server.rstrip("/"), ctx_ssl, creds, ctx.get("namespace"),
        server_hostname=cluster.get("tls-server-name"), origin=where,
    )


def load(kubeconfig: Path | None = None, context: str | None = None) -> ClusterConfig:
    """A kubeconfig when one is named; else in-cluster when running in a pod; else the default
    kubeconfig."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster()
    return from_kubeconfig(kubeconfig, context)


def _named(doc: dict[str, Any], section: str, field: str, name: Any, path: Path) -> dict[str, Any]:
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(field)
            if not isinstance(value, dict):
                raise KubeConfigError(f"kubeconfig {path}: {section} entry {name!r} has no {field}")
            return value
    raise KubeConfigError(f"kubeconfig {path}: no {section} entry named {name!r}")


def _path(value: Any, base: Path) -> Path | None:
    if not value:
        return None
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p  # relative paths are relative to the kubeconfig


def _b64(value: Any, where: str, field: str) -> str | None:
    if not value:
        return None
    try:
        return base64.b64decode(str(value), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise KubeConfigError(f"{where}: {field} is not base64 PEM: {e}") from e


def _tls(
    server: str, ca_file: Path | None, ca_data: str | None, insecure: bool = False
) -> ssl.SSLContext | None:
    if server.startswith("http://"):
        return None  # only the tests' API server speaks plain HTTP
    try:
        ctx = ssl.create_default_context(
            cafile=str(ca_file) if ca_file else None, cadata=ca_data or None
        )
    except (OSError, ssl.SSLError) as e:
        raise KubeConfigError(
            f"cannot load the API server CA ({ca_file or 'inline data'}): {e}") from e
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _client_cert(ctx: ssl.SSLContext, user: dict[str, Any], base: Path, where: str) -> None:
    cert_file, key_file = _path(user.get("client-certificate"), base), _path(
        user.get("client-key"), base
    )
    cert_data = _b64(user.get("client-certificate-data"), where, "client-certificate-data")
    key_data = _b64(user.get("client-key-data"), where, "client-key-data")
    if not (cert_file or cert_data):
        return
    if not (key_file or key_data):
        raise KubeConfigError(f"{where}: a client certificate without a client key")
    try:
        # Inline data never touches a filesystem (tlsmem loads it through memory files).
        chain = cert_data.encode() if cert_data else Path(str(cert_file)).read_bytes()
        key = key_data.encode() if key_data else Path(str(key_file)).read_bytes()
        tlsmem.load_cert_chain(ctx, chain, key)
    except (OSError, ssl.SSLError) as e:
        raise KubeConfigError(f"{where}: cannot load the client certificate/key: {e}") from e
