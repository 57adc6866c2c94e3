"""The Kubernetes source's sans-IO parts: object cache, watch decoder, backoff, configuration."""

from __future__ import annotations

import base64
import datetime
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.apiserver import make_tls

from agent.backoff import Backoff, Retries
from agent.sources.kube.cache import InvalidObjectError, ObjectCache
from agent.sources.kube.config import (
    KubeConfigError,
    TokenFile,
    default_kubeconfig,
    explicit,
    from_kubeconfig,
    in_cluster,
)
from agent.sources.kube.stream import WatchDecoder, WatchProtocolError


def obj(name: str, uid: str, rv: str, ns: str | None = "ns", **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": uid, "resourceVersion": rv}
    if ns is not None:
        meta["namespace"] = ns
    return {"metadata": meta, **extra}


def kinds(changes: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str, str]]:
    return [(t, o["metadata"]["name"], o["metadata"]["uid"]) for t, o in changes]


# -- cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("slim", [False, True])
def test_cache_turns_watch_events_into_changes(slim: bool) -> None:
    c = ObjectCache(namespaced=True, slim=slim)
    assert kinds(c.apply("ADDED", obj("a", "u1", "1"))) == [("ADDED", "a", "u1")]
    assert c.apply("ADDED", obj("a", "u1", "1")) == []  # same version again: a duplicate
    assert c.apply("MODIFIED", obj("a", "u1", "1")) == []
    assert kinds(c.apply("MODIFIED", obj("a", "u1", "2"))) == [("MODIFIED", "a", "u1")]
    # Same name, new uid: the old object is gone and a new one exists.
    assert kinds(c.apply("MODIFIED", obj("a", "u2", "3"))) == [
        ("DELETED", "a", "u1"), ("ADDED", "a", "u2")]
    assert c.apply("DELETED", obj("a", "u1", "4")) == []  # not the object we hold
    assert c.apply("DELETED", obj("zz", "u9", "4")) == []
    assert kinds(c.apply("DELETED", obj("a", "u2", "5"))) == [("DELETED", "a", "u2")]
    assert dict(c.objects) == {}


@pytest.mark.parametrize("slim", [False, True])
def test_cache_keys_by_namespace_and_name(slim: bool) -> None:
    c = ObjectCache(namespaced=True, slim=slim)
    c.apply("ADDED", obj("a", "u1", "1", ns="x"))
    c.apply("ADDED", obj("a", "u2", "2", ns="y"))
    assert set(c.objects) == {"x/a", "y/a"}
    cluster = ObjectCache(namespaced=False, slim=slim)
    cluster.apply("ADDED", obj("x", "u3", "3", ns=None))
    assert set(cluster.objects) == {"x"}
    assert cluster.objects["x"]["metadata"] == {"name": "x", "uid": "u3", "resourceVersion": "3"}


@pytest.mark.parametrize("slim", [False, True])
def test_relist_diff_deletes_first_then_adds_and_modifies(slim: bool) -> None:
    c = ObjectCache(namespaced=True, slim=slim)
    for o in (obj("keep", "k", "1"), obj("mod", "m", "2"), obj("gone", "g", "3"),
              obj("swap", "s1", "4")):
        c.apply("ADDED", o)
    changes = c.replace([obj("keep", "k", "1"), obj("mod", "m", "7"), obj("swap", "s2", "8"),
                         obj("new", "n", "9")])
    assert kinds(changes) == [
        ("DELETED", "gone", "g"),
        ("DELETED", "swap", "s1"),
        ("MODIFIED", "mod", "m"),
        ("ADDED", "new", "n"),
        ("ADDED", "swap", "s2"),
    ]
    assert c.replace([obj("keep", "k", "1"), obj("mod", "m", "7"), obj("swap", "s2", "8"),
                      obj("new", "n", "9")]) == []


@pytest.mark.parametrize("bad", [
    {},
    {"metadata": {"name": "a", "resourceVersion": "1", "namespace": "n"}},
    {"metadata": {"name": "a", "uid": "u", "namespace": "n"}},
    {"metadata": {"name": "a", "uid": "u", "resourceVersion": "1"}},
    {"metadata": {"name": "", "uid": "u", "resourceVersion": "1", "namespace": "n"}},
])
def test_cache_rejects_objects_without_identity(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidObjectError):
        ObjectCache(namespaced=True).apply("ADDED", bad)


# -- watch decoder -------------------------------------------------------------------------


def test_decoder_reassembles_events_split_anywhere() -> None:
    lines = b"".join(
        json.dumps({"type": t, "object": obj(f"o{i}", "u", str(i))}).encode() + b"\n"
        for i, t in enumerate(["ADDED", "MODIFIED", "BOOKMARK", "DELETED"])
    )
    for size in (1, 7, 64, len(lines)):
        d = WatchDecoder()
        events = [e for i in range(0, len(lines), size) for e in d.feed(lines[i : i + size])]
        d.end()
        assert [e.type for e in events] == ["ADDED", "MODIFIED", "BOOKMARK", "DELETED"]
        assert events[3].object["metadata"]["name"] == "o3"


@pytest.mark.parametrize("line", [
    b"not json\n",
    b"[1]\n",
    b'{"type": "SYNC", "object": {}}\n',
    b'{"type": "ADDED"}\n',
])
def test_decoder_rejects_what_no_api_server_sends(line: bytes) -> None:
    with pytest.raises(WatchProtocolError):
        WatchDecoder().feed(line)


def test_decoder_notices_a_stream_cut_mid_event_and_oversized_events() -> None:
    d = WatchDecoder()
    assert d.feed(b'{"type": "ADDED", "obj') == []
    with pytest.raises(WatchProtocolError, match="inside an event"):
        d.end()
    with pytest.raises(WatchProtocolError, match="larger than"):
        WatchDecoder(max_event=100).feed(b"x" * 101)


# -- backoff -------------------------------------------------------------------------------


def test_backoff_doubles_to_the_cap_with_jitter_and_resets() -> None:
    low = Retries(Backoff(0.1, cap=30.0, equal_jitter=True), rand=lambda: 0.0)
    high = Retries(Backoff(0.1, cap=30.0, equal_jitter=True), rand=lambda: 0.999999)
    nominal = [min(30.0, 0.1 * 2**n) for n in range(12)]
    assert [round(low.next_delay(), 6) for _ in nominal] == [round(d / 2, 6) for d in nominal]
    assert [round(high.next_delay(), 4) for _ in nominal] == [round(d, 4) for d in nominal]
    low.reset()
    assert low.next_delay() == pytest.approx(0.05)
    with pytest.raises(ValueError):
        Backoff(0.0, cap=1.0)


# -- configuration -------------------------------------------------------------------------


def test_token_file_is_reread_after_its_period_and_after_invalidate(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    now = [0.0]
    t = TokenFile(path, refresh=60.0, clock=lambda: now[0])
    assert t.token() == "one"
    path.write_text("two\n")
    now[0] = 59.0
    assert t.token() == "one"
    now[0] = 60.0
    assert t.token() == "two"
    path.write_text("three\n")
    t.invalidate()
    assert t.token() == "three"
    path.unlink()
    now[0] = 500.0
    assert t.token() == "three"  # a transient read failure keeps the last token
    with pytest.raises(KubeConfigError, match="cannot read"):
        TokenFile(tmp_path / "missing").token()


def test_in_cluster_reads_the_service_account_mount(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    (tmp_path / "token").write_text("tok\n")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    cfg = in_cluster(env, tmp_path)
    assert cfg.server == "https://[fd00::1]:443"
    assert cfg.credentials is not None and cfg.credentials.token() == "tok"
    assert isinstance(cfg.ssl_context, ssl.SSLContext)
    assert cfg.namespace is None
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster({}, tmp_path)
    (tmp_path / "ca.crt").unlink()
    with pytest.raises(KubeConfigError, match=r"ca\.crt is missing"):
        in_cluster(env, tmp_path)
    assert tls.ca_file.name == "ca.crt"


def _kubeconfig(tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any]) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "v1", "kind": "Config", "current-context": "main",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "main", "context": {"cluster": "c", "user": "u"}},
                     {"name": "other", "context": {"cluster": "nope", "user": "u"}}],
    }))
    return path


def test_kubeconfig_relative_paths_token_file_and_client_certificate(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    (tmp_path / "token").write_text("from-file\n")
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "system:node:node-a")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
    (tmp_path / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    good = _kubeconfig(tmp_path, {
        "client-certificate": "client.crt",
        "client-key-data": base64.b64encode(key_pem).decode(),
    }, {"server": "https://127.0.0.1:6443",
        "certificate-authority-data": base64.b64encode(tls.ca_pem).decode()})
    assert from_kubeconfig(good).credentials is None  # the certificate is the credential
    mismatched = _kubeconfig(tmp_path, {
        "tokenFile": "token",
        "client-certificate-data": base64.b64encode(tls.ca_pem).decode(),
        "client-key-data": base64.b64encode(key_pem).decode(),
    }, {"server": "https://127.0.0.1:6443", "certificate-authority": "ca.crt"})
    with pytest.raises(KubeConfigError, match="client certificate/key"):
        from_kubeconfig(mismatched)  # the key does not belong to the certificate

    path = _kubeconfig(tmp_path, {"tokenFile": "token"},
                       {"server": "https://127.0.0.1:6443/", "certificate-authority": "ca.crt",
                        "tls-server-name": "kubernetes"})
    cfg = from_kubeconfig(path)
    assert cfg.server == "https://127.0.0.1:6443"
    assert cfg.server_hostname == "kubernetes"
    assert cfg.credentials is not None and cfg.credentials.token() == "from-file"
    assert "context main" in cfg.origin
    with pytest.raises(KubeConfigError, match="no clusters entry named 'nope'"):
        from_kubeconfig(path, context="other")


@pytest.mark.parametrize(("user", "cluster", "error"), [
    ({"exec": {"command": "aws"}}, {"server": "https://h"}, "exec plugin"),
    ({}, {"server": "h:6443"}, "not an http"),
    ({}, {"server": "https://h", "certificate-authority-data": "%%%"}, "not base64"),
    ({"client-certificate": "c.crt"}, {"server": "https://h"}, "without a client key"),
])
def test_kubeconfig_errors_say_what_is_wrong(
    tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any], error: str
) -> None:
    with pytest.raises(KubeConfigError, match=error):
        from_kubeconfig(_kubeconfig(tmp_path, user, cluster))


def test_kubeconfig_location_and_unreadable_files(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_text("{}")
    env = {"KUBECONFIG": f"{tmp_path / 'absent'}:{real}", "HOME": str(tmp_path)}
    assert default_kubeconfig(env) == real
    assert default_kubeconfig({"HOME": str(tmp_path)}) == tmp_path / ".kube" / "config"
    with pytest.raises(KubeConfigError, match="cannot read kubeconfig"):
        from_kubeconfig(tmp_path / "absent")
    with pytest.raises(KubeConfigError, match="no current-context"):
        from_kubeconfig(real)
    with pytest.raises(KubeConfigError, match="token or a token file"):
        explicit("https://h", token="a", token_file=real)
