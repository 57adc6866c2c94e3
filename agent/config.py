"""Agent configuration: every setting, its default, its environment variable, and its flag.

Reading the environment and flags is separate from the pure builder (`build`), and the result is
what the admin endpoint /config_dump shows. The DaemonSet manifests are checked against SETTINGS
by a test, so a flag or variable they pass always exists here.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

DEFAULT_NODE_NAME = "node0"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_ROOT_NAMESPACE = "istio-system"
DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/nodemesh")
DEFAULT_ADMIN_ADDR = "127.0.0.1:15000"
DEFAULT_METRICS_ADDR = "0.0.0.0:15020"
DEFAULT_READINESS_ADDR = "0.0.0.0:15021"
DEFAULT_CA_ADDR = ""  # empty: run the embedded CA in process
# The embedded CA root; bpffs holds only BPF objects, so this lives on a real filesystem.
DEFAULT_CA_ROOT_CERT = Path("/var/lib/nodemesh/ca/root-cert.pem")
DEFAULT_CERT_TTL_SECONDS = 24 * 3600
DEFAULT_DRAIN_SECONDS = 5.0
DEFAULT_OUTSIDE_MESH: Final = "passthrough"
OUTSIDE_MESH_CHOICES = ("passthrough", "refuse")
DEFAULT_POLICY_SOURCE = "file"
DEFAULT_SOURCE_GRACE_SECONDS = 30.0
# Service endpoint outlier detection (agent/runtime/outliers.py); Envoy's defaults.
DEFAULT_OUTLIER_FAILURES = 5
DEFAULT_OUTLIER_EJECTION_SECONDS = 30.0
DEFAULT_OUTLIER_MAX_EJECTION_SECONDS = 300.0
# Tunnel budgets: the ztunnel defaults (ztunnel/model.py), repeated so config stays import-light.
DEFAULT_MAX_PENDING_HANDSHAKES = 1024
DEFAULT_MAX_PENDING_HANDSHAKES_PER_IP = 64
DEFAULT_MAX_UPSTREAM_CONNECTS_PER_CONNECTION = 200
DEFAULT_PREWARM_DESTINATIONS = 64
# HTTP/2 frame budgets per HBONE connection (ztunnel.hbone.Budgets; a unit test keeps the two
# sets of defaults equal).
H2_BUDGET_DEFAULTS: Final = {
    "h2_max_header_block": 64 * 1024,
    "h2_header_bytes_per_s": 8 << 20,
    "h2_streams_per_s": 5000,
    "h2_resets_per_s": 1000,
    "h2_control_frames_per_s": 1000,
    "h2_max_unread_control": 64 * 1024,
}
H2_BUDGETS: Final = tuple(H2_BUDGET_DEFAULTS)
DEFAULT_PREWARM_TTL = 60.0


@dataclass(frozen=True)
class Setting:
    name: str  # attribute of Config
    env: str
    flag: str
    help: str
    kind: type = str
    multiple: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("node_name", "NODE_NAME", "--node-name", "this node's name (pods on it are enrolled)"),
    Setting("source", "NODEMESH_SOURCE", "--source", "where state comes from: file or kubernetes"),
    Setting(
        "config_path", "NODEMESH_CONFIG", "--config", "mesh YAML file or directory (file source)"
    ),
    Setting(
        "kubeconfig",
        "KUBECONFIG",
        "--kubeconfig",
        "kubeconfig (kubernetes source, outside a cluster)",
    ),
    Setting(
        "cgroup_root",
        "NODEMESH_CGROUP_ROOT",
        "--cgroup-root",
        "cgroup v2 directory the programs attach to (default: the cgroup2 mount)",
    ),
    Setting("pin_dir", "NODEMESH_PIN_DIR", "--pin-dir", "bpffs directory for pinned maps/links"),
    Setting("trust_domain", "TRUST_DOMAIN", "--trust-domain", "SPIFFE trust domain"),
    Setting(
        "root_namespace",
        "ROOT_NAMESPACE",
        "--root-namespace",
        "namespace whose policies apply mesh-wide",
    ),
    Setting(
        "ca_address",
        "CA_ADDRESS",
        "--ca-address",
        "Istio-compatible CA (host:port); empty runs the embedded CA",
    ),
    Setting("ca_root_cert", "CA_ROOT_CERT", "--ca-root-cert", "trust anchor of the CA"),
    Setting(
        "ca_token_path",
        "CA_TOKEN_PATH",
        "--ca-token",
        "bearer token file for the CA (re-read per request: a projected ServiceAccount token)",
    ),
    Setting(
        "federated_bundles",
        "FEDERATED_BUNDLES",
        "--federated-bundle",
        "trust bundle of another trust domain: TRUST_DOMAIN=FILE, or a directory of "
        "<trust-domain>.json (SPIFFE bundle) / .pem files; re-read on change (repeatable; "
        "env: comma list)",
        str,
        True,
    ),
    Setting(
        "trust_domain_aliases",
        "TRUST_DOMAIN_ALIASES",
        "--trust-domain-alias",
        "another name of our trust domain, trusted through our roots (as Istio's "
        "trustDomainAliases; repeatable; env: comma list)",
        str,
        True,
    ),
    Setting("cluster_id", "CLUSTER_ID", "--cluster-id", "cluster name sent to the CA (clusterid)"),
    Setting(
        "cert_ttl_seconds", "SECRET_TTL", "--cert-ttl", "workload certificate TTL, seconds", int
    ),
    Setting("admin_addr", "ADMIN_ADDR", "--admin-addr", "admin endpoint (localhost only)"),
    Setting("metrics_addr", "METRICS_ADDR", "--metrics-addr", "Prometheus endpoint"),
    Setting("readiness_addr", "READINESS_ADDR", "--readiness-addr", "/healthz/ready endpoint"),
    Setting("flow_log", "NODEMESH_FLOW_LOG", "--flow-log", "JSON-lines flow log file"),
    Setting(
        "audit_log", "NODEMESH_AUDIT_LOG", "--audit-log", "audit log file (denies, auth failures)"
    ),
    Setting(
        "exclude_ports",
        "NODEMESH_EXCLUDE_PORTS",
        "--exclude-port",
        "destination port never captured (repeatable; env: comma list)",
        int,
        True,
    ),
    Setting(
        "exclude_cidrs",
        "NODEMESH_EXCLUDE_CIDRS",
        "--exclude-cidr",
        "destination CIDR never captured (repeatable; env: comma list)",
        str,
        True,
    ),
    Setting(
        "same_node_bypass",
        "NODEMESH_SAME_NODE_BYPASS",
        "--same-node-bypass",
        "on|off: allowed connections between two pods of this node go socket to socket in the "
        "kernel instead of through the tunnel (default on)",
    ),
    Setting(
        "testbed_run",
        "NODEMESH_TESTBED_RUN",
        "--testbed-run",
        "find pods in this test-bed run (demo, tests) instead of by pod UID",
    ),
    Setting(
        "outside_mesh",
        "NODEMESH_OUTSIDE_MESH",
        "--outside-mesh",
        "outbound connections to a destination outside the mesh: passthrough (plain TCP, "
        "Istio's default) or refuse (reset, flow record with response flag NR)",
    ),
    Setting(
        "drain_seconds",
        "NODEMESH_DRAIN_SECONDS",
        "--drain-seconds",
        "graceful drain on SIGTERM, seconds",
        float,
    ),
    Setting(
        "source_grace_seconds",
        "NODEMESH_SOURCE_GRACE",
        "--source-grace",
        "unready once the API server has been unreachable this long, seconds (enforcement "
        "continues from pinned state)",
        float,
    ),
    Setting(
        "workers",
        "NODEMESH_WORKERS",
        "--workers",
        "data-plane worker processes (default: the CPUs the agent may use: its affinity and "
        "cgroup cpu.max quota)",
        int,
    ),
    Setting(
        "outlier_failures",
        "NODEMESH_OUTLIER_FAILURES",
        "--outlier-failures",
        "consecutive failed upstream connects that eject a Service endpoint",
        int,
    ),
    Setting(
        "outlier_ejection_seconds",
        "NODEMESH_OUTLIER_EJECTION",
        "--outlier-ejection",
        "first ejection of a Service endpoint, seconds (doubles per repeated ejection)",
        float,
    ),
    Setting(
        "outlier_max_ejection_seconds",
        "NODEMESH_OUTLIER_MAX_EJECTION",
        "--outlier-max-ejection",
        "longest ejection of a Service endpoint, seconds",
        float,
    ),    # Tunnel budgets (docs/architecture.md, "Budgets"); defaults in ztunnel/model.py.
    Setting("max_pending_handshakes", "NODEMESH_MAX_PENDING_HANDSHAKES",
            "--max-pending-handshakes",
            "TLS handshakes pending at the HBONE port, all pods; more are reset at accept", int),
    Setting("max_pending_handshakes_per_ip", "NODEMESH_MAX_PENDING_HANDSHAKES_PER_IP",
            "--max-pending-handshakes-per-ip",
            "TLS handshakes pending at the HBONE port from one source IP", int),
    Setting("max_upstream_connects_per_connection", "NODEMESH_MAX_UPSTREAM_CONNECTS",
            "--max-upstream-connects-per-connection",
            "upstream connects to apps in flight for one HBONE connection; more get 503", int),
    Setting("h2_max_header_block", "NODEMESH_H2_MAX_HEADER_BLOCK", "--h2-max-header-block",
            "bytes of one HBONE header block (HEADERS+CONTINUATION); more: GOAWAY", int),
    Setting("h2_header_bytes_per_s", "NODEMESH_H2_HEADER_BYTES_PER_S", "--h2-header-bytes-per-s",
            "header-block bytes per HBONE connection per second; more: GOAWAY", int),
    Setting("h2_streams_per_s", "NODEMESH_H2_STREAMS_PER_S", "--h2-streams-per-s",
            "streams a peer opens per HBONE connection per second; more: GOAWAY", int),
    Setting("h2_resets_per_s", "NODEMESH_H2_RESETS_PER_S", "--h2-resets-per-s",
            "RST_STREAM frames from a peer per second (rapid reset); more: GOAWAY", int),
    Setting("h2_control_frames_per_s", "NODEMESH_H2_CONTROL_FRAMES_PER_S",
            "--h2-control-frames-per-s",
            "SETTINGS/PING/PRIORITY/empty WINDOW_UPDATE frames per second; more: GOAWAY", int),
    Setting("h2_max_unread_control", "NODEMESH_H2_MAX_UNREAD_CONTROL", "--h2-max-unread-control",
            "bytes of PING/SETTINGS ACKs queued for a peer that does not read; more: close", int),
    Setting("prewarm_destinations", "NODEMESH_PREWARM_DESTINATIONS", "--prewarm-destinations",
            "recently used HBONE destinations kept with one spare idle connection (0: off)", int),
    Setting("prewarm_ttl", "NODEMESH_PREWARM_TTL", "--prewarm-ttl",
            "how long after its last use a destination keeps its spare connection, seconds",
            float),
)


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the setting and its source."""


@dataclass(frozen=True)
class Config:
    node_name: str = DEFAULT_NODE_NAME
    source: str = DEFAULT_POLICY_SOURCE
    config_path: Path | None = None
    kubeconfig: Path | None = None
    cgroup_root: Path | None = None
    pin_dir: Path = DEFAULT_PIN_ROOT / "default"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    ca_address: str = DEFAULT_CA_ADDR
    ca_root_cert: Path | None = None
    ca_token_path: Path | None = None
    federated_bundles: tuple[str, ...] = ()
    trust_domain_aliases: tuple[str, ...] = ()
    cluster_id: str = "Kubernetes"  # istiod's and ztunnel's default CLUSTER_ID
    cert_ttl_seconds: int = DEFAULT_CERT_TTL_SECONDS
    admin_addr: str = DEFAULT_ADMIN_ADDR
    metrics_addr: str = DEFAULT_METRICS_ADDR
    readiness_addr: str = DEFAULT_READINESS_ADDR
    flow_log: Path | None = None
    audit_log: Path | None = None
    exclude_ports: tuple[int, ...] = ()
    exclude_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    same_node_bypass: bool = True
    testbed_run: str = ""
    outside_mesh: Literal["passthrough", "refuse"] = DEFAULT_OUTSIDE_MESH
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    source_grace_seconds: float = DEFAULT_SOURCE_GRACE_SECONDS
    workers: int = 0  # 0: the CPUs the agent may use (agent.host.cpus, at start)
    outlier_failures: int = DEFAULT_OUTLIER_FAILURES
    outlier_ejection_seconds: float = DEFAULT_OUTLIER_EJECTION_SECONDS
    outlier_max_ejection_seconds: float = DEFAULT_OUTLIER_MAX_EJECTION_SECONDS
    max_pending_handshakes: int = DEFAULT_MAX_PENDING_HANDSHAKES
    max_pending_handshakes_per_ip: int = DEFAULT_MAX_PENDING_HANDSHAKES_PER_IP
    max_upstream_connects_per_connection: int = DEFAULT_MAX_UPSTREAM_CONNECTS_PER_CONNECTION
    prewarm_destinations: int = DEFAULT_PREWARM_DESTINATIONS
    prewarm_ttl: float = DEFAULT_PREWARM_TTL
    h2_max_header_block: int = H2_BUDGET_DEFAULTS["h2_max_header_block"]
    h2_header_bytes_per_s: int = H2_BUDGET_DEFAULTS["h2_header_bytes_per_s"]
    h2_streams_per_s: int = H2_BUDGET_DEFAULTS["h2_streams_per_s"]
    h2_resets_per_s: int = H2_BUDGET_DEFAULTS["h2_resets_per_s"]
    h2_control_frames_per_s: int = H2_BUDGET_DEFAULTS["h2_control_frames_per_s"]
    h2_max_unread_control: int = H2_BUDGET_DEFAULTS["h2_max_unread_control"]
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)

    def dump(self) -> dict[str, Any]:
        """JSON-friendly view for /config_dump (where each value came from included)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "origins":
                continue
            v = getattr(self, f.name)
            out[f.name] = (
                [str(x) for x in v]
                if isinstance(v, tuple)
                else (str(v) if isinstance(v, Path) else v)
            )
        out["origins"] = dict(self.origins)
        return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for s in SETTINGS:
        kw: dict[str, Any] = {"dest": s.name, "help": f"{s.help} [env {s.env}]", "default": None}
        if s.multiple:
            kw["action"] = "append"
        parser.add_argument(s.flag, **kw)


def _on_off(raw: str) -> bool:
    word = raw.strip().lower()
    if word not in ("on", "off"):
        raise ValueError("want on or off")
    return word == "on"


def _convert(s: Setting, raw: object, origin: str) -> object:
    try:
        if s.multiple:
            items = raw if isinstance(raw, list) else [x for x in str(raw).split(",") if x.strip()]
            if s.name == "exclude_cidrs":
                return tuple(ipaddress.IPv4Network(str(x).strip()) for x in items)
            return tuple(s.kind(str(x).strip()) for x in items)
        if s.name == "same_node_bypass":
            return _on_off(str(raw))
        default = Config.__dataclass_fields__[s.name].default
        if isinstance(default, Path) or s.name.endswith(
            ("_path", "_root", "_dir", "_log", "_cert", "kubeconfig")
        ):
            return Path(str(raw))
        return s.kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{s.name} from {origin}: invalid value {raw!r}: {exc}") from exc


def build(env: Mapping[str, str], flags: Mapping[str, object] | None = None) -> Config:
    """Pure: defaults, then environment, then flags (highest)."""
    values: dict[str, object] = {}
    origins: dict[str, str] = {}
    for s in SETTINGS:
        if s.env in env and env[s.env] != "":
            values[s.name] = _convert(s, env[s.env], f"env {s.env}")
            origins[s.name] = f"env {s.env}"
        flag_value = (flags or {}).get(s.name)
        if flag_value is not None:
            values[s.name] = _convert(s, flag_value, f"flag {s.flag}")
            origins[s.name] = f"flag {s.flag}"
    cfg = Config(**values, origins=origins)  # type: ignore[arg-type]  # values typed by _convert
    _check(cfg, "workers" in values)
    return cfg


def _check(cfg: Config, workers_set: bool) -> None:
    """Cross-field and range checks a single setting's conversion cannot make."""
    origins = cfg.origins
    if cfg.source not in ("file", "kubernetes"):
        raise ConfigError(f"source: {cfg.source!r} is not one of file, kubernetes")
    if cfg.outside_mesh not in OUTSIDE_MESH_CHOICES:
        raise ConfigError(f"outside_mesh: {cfg.outside_mesh!r} is not one of "
                          f"{', '.join(OUTSIDE_MESH_CHOICES)}")
    if cfg.source == "file" and cfg.config_path is None:
        raise ConfigError("source file needs --config (or NODEMESH_CONFIG): the mesh YAML")
    if workers_set and cfg.workers < 1:
        raise ConfigError(f"workers {cfg.workers} from {origins['workers']}: want at least 1")
    if cfg.outlier_failures < 1:
        raise ConfigError(f"outlier_failures {cfg.outlier_failures}: want at least 1")
    if not 0 < cfg.outlier_ejection_seconds <= cfg.outlier_max_ejection_seconds:
        raise ConfigError(f"outlier ejection {cfg.outlier_ejection_seconds} s / max "
                          f"{cfg.outlier_max_ejection_seconds} s: want 0 < ejection <= max")
    for name in ("max_pending_handshakes", "max_pending_handshakes_per_ip",
                 "max_upstream_connects_per_connection", *H2_BUDGETS):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} {getattr(cfg, name)}: want at least 1")
    if cfg.prewarm_destinations < 0 or cfg.prewarm_ttl <= 0:
        raise ConfigError(f"prewarm_destinations {cfg.prewarm_destinations} / prewarm_ttl "
                          f"{cfg.prewarm_ttl}: want destinations >= 0 and a TTL > 0")
    if not cfg.admin_addr.startswith(("127.", "localhost", "[::1]")):
        raise ConfigError(f"admin_addr {cfg.admin_addr}: the admin endpoint is localhost only")


def from_environment(
    args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None
) -> Config:
    flags = {s.name: getattr(args, s.name, None) for s in SETTINGS} if args else {}
    return build(os.environ if env is None else env, flags)


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    # ASCII digits only: int() also takes other scripts' digits, signs, spaces and underscores.
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ConfigError(f"address {addr!r}: want host:port, the port 0-65535 in ASCII digits")
    return host.strip("[]") or "0.0.0.0", int(port)


def flags_of(settings: Sequence[Setting] = SETTINGS) -> set[str]:
    return {s.flag for s in settings}


def envs_of(settings: Sequence[Setting] = SETTINGS) -> set[str]:
    return {s.env for s in settings}
