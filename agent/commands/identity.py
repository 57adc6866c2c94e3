"""`nodemesh ca ...`: run the embedded CA, issue node credentials, fetch a workload certificate."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.caauth.podindex import ClusterPodSource, PodIndex
from agent.caauth.tokenreview import (
    DEFAULT_AUDIENCE,
    ApiTokenReviewer,
    JwksTokenVerifier,
    KubeTokenAuthenticator,
    TokenChecker,
)
from agent.host import signals
from agent.host.files import write_private
from agent.identity import pki
from agent.identity.ca import (
    MAX_TTL,
    CertificateAuthority,
    NodeAuthenticator,
    StaticWorkloadLocator,
)
from agent.identity.caaudit import CaAudit
from agent.identity.caerror import CaError
from agent.identity.federation import spiffe_bundle
from agent.identity.metrics import CaMetrics
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity, IdentityError
from agent.identity.trustbundle import TrustBundleError, read_pem_bundle
from agent.sources.kube import config as kubeconfig
from agent.telemetry.server import MetricsServer

log = logging.getLogger(__name__)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
STOP_GRACE = 1.0  # seconds `ca serve` lets requests in flight finish on SIGTERM/SIGINT


def duration(text: str) -> timedelta:
    """'90', '90s', '15m', '24h', '7d' -> timedelta (argparse type)."""
    m = re.fullmatch(r"([0-9]+)([smhd]?)", text.strip(), re.ASCII)  # ASCII digits only
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: want a positive duration like 90s, 15m, 24h")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2) or "s"])


def _identity(text: str) -> Identity:
    try:
        return Identity.parse(text)
    except IdentityError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = sub.add_parser("ca", help="embedded certificate authority (Istio CA API)")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)

    serve = ca_sub.add_parser(
        "serve", help="serve istio.v1.auth.IstioCertificateService over TLS",
        description="Serve the CA. The root is loaded from --root-cert/--root-key, or generated "
                    "and written there (key mode 0600) when both files are missing. SIGTERM or "
                    "SIGINT stops it: requests in flight get a second to finish, then exit 0.")
    serve.add_argument("--listen", default="127.0.0.1:15012",
                       help="host:port (default %(default)s, istiod's CA port)")
    _root_args(serve)
    serve.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    serve.add_argument("--tokens", type=Path,
                       help="YAML mapping bearer token -> node name (node agents' credentials)")
    serve.add_argument("--workloads", type=Path,
                       help="YAML mapping node name -> list of SPIFFE ids scheduled there "
                            "(without --kube)")
    serve.add_argument("--max-ttl", type=duration, default=MAX_TTL,
                       help="longest certificate lifetime granted (default 24h)")
    serve.add_argument("--require-node-cert", action="store_true",
                       help="require a node client certificate issued by this CA (ca node-cert)")
    serve.add_argument("--server-name", action="append", default=[],
                       help="extra DNS name/IP for the CA's TLS certificate (repeatable)")
    kube = serve.add_argument_group(
        "Kubernetes", "authenticate node agents by ServiceAccount token and authorize them "
        "against a cached watch of pods (the central CA of a cluster)")
    kube.add_argument("--kube", action="store_true",
                      help="enable: in-cluster config, or --kubeconfig")
    kube.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: in-cluster)")
    kube.add_argument("--token-audience", action="append", default=[],
                      help="audience agents' tokens must carry (repeatable; default istio-ca)")
    kube.add_argument("--agent-service-account", action="append", default=[],
                      metavar="NAMESPACE/NAME",
                      help="node agent ServiceAccount allowed to ask for workload "
                           "certificates (repeatable; default nodemesh-system/nodemesh)")
    kube.add_argument("--token-check", choices=("tokenreview", "jwks"), default="tokenreview",
                      help="check tokens with the TokenReview API (needs system:auth-delegator) "
                           "or against the issuer's JWKS (default %(default)s)")
    kube.add_argument("--token-issuer", help="issuer (iss) of ServiceAccount tokens, for jwks")
    kube.add_argument("--jwks-url", help="the issuer's key set, for jwks (default "
                                         "<API server>/openid/v1/jwks)")
    serve.add_argument("--cluster-id", help="refuse callers whose clusterid names another "
                                            "cluster (as istiod's CLUSTER_ID)")
    serve.add_argument("--metrics-listen", help="host:port for /metrics (default: none)")
    serve.add_argument("--audit-log", type=Path, help="JSON-lines audit log of refused CSRs")
    serve.set_defaults(func=_serve)

    init = ca_sub.add_parser("init", help="generate a new root CA (certificate and key files)",
                             description="Write a new self-signed root for the trust domain; "
                             "refuses to overwrite existing files.")
    _root_args(init)
    init.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    init.set_defaults(func=_init)

    bundle = ca_sub.add_parser(
        "bundle", help="print a root file as a SPIFFE bundle (for peers that federate with us)",
        description="The X.509 authorities of a PEM file (a root, or old+new during a "
                    "rotation) as a SPIFFE trust bundle document; give it to the other mesh "
                    "as <our-trust-domain>.json for its --federated-bundle.")
    bundle.add_argument("--root-cert", type=Path, required=True, help="PEM root certificate(s)")
    bundle.add_argument("--sequence", type=int, default=1, help="spiffe_sequence (default 1)")
    bundle.set_defaults(func=_bundle)

    node = ca_sub.add_parser("node-cert", help="issue a node agent's client certificate offline")
    _root_args(node)
    node.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    node.add_argument("--node", required=True)
    node.add_argument("--ttl", type=duration, default=timedelta(days=365))
    node.add_argument("--cert-out", type=Path, required=True)
    node.add_argument("--key-out", type=Path, required=True)
    node.set_defaults(func=_node_cert)

    issue = ca_sub.add_parser("issue", help="get a workload certificate from a CA; print its chain")
    issue.add_argument("--ca", required=True, help="CA address host:port")
    issue.add_argument("--ca-root", type=Path, required=True, help="PEM root of the CA's TLS")
    issue.add_argument("--identity", type=_identity, required=True,
                       help="spiffe://<td>/ns/<ns>/sa/<sa>")
    issue.add_argument("--token-file", type=Path, help="file holding the node's bearer token")
    issue.add_argument("--cluster-id", help="sent as clusterid metadata (as ztunnel does)")
    issue.add_argument("--node-cert", type=Path, help="node client certificate (PEM)")
    issue.add_argument("--node-key", type=Path, help="node client key (PEM)")
    issue.add_argument("--ttl", type=duration, default=timedelta(hours=1))
    issue.add_argument("--key-out", type=Path,
                       help="write the private key here (mode 0600); never printed")
    issue.set_defaults(func=_issue)


def _root_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root-cert", type=Path, required=True, help="CA certificate (PEM)")
    p.add_argument("--root-key", type=Path, required=True, help="CA private key (PEM)")


def load_or_create_root(cert: Path, key: Path, trust_domain: str,
                        must_exist: bool = False) -> pki.Authority:
    if cert.exists() and key.exists():
        return pki.Authority.from_pem(cert.read_bytes(), key.read_bytes())
    if cert.exists() or key.exists() or must_exist:
        raise SystemExit(f"need both {cert} and {key}; "
                         f"{cert if not cert.exists() else key} is missing")
    authority = pki.Authority.generate(trust_domain)
    write_private(key, pki.key_to_pem(authority.key))
    cert.write_text(pki.cert_to_pem(authority.root))
    log.info("generated a new root CA for %s: %s, %s", trust_domain, cert, key)
    return authority


def _serve(args: argparse.Namespace) -> int:
    authority = load_or_create_root(args.root_cert, args.root_key, args.trust_domain)
    tokens = NodeAuthenticator.load_tokens(args.tokens) if args.tokens else {}
    if not tokens and not args.require_node_cert and not args.kube:
        raise SystemExit("no way for node agents to authenticate: give --kube, --tokens FILE "
                         "and/or --require-node-cert")
    if args.kube == (args.workloads is not None):
        raise SystemExit("give exactly one of --kube (pods from the API server) and "
                         "--workloads FILE (a fixed placement)")
    registry = CollectorRegistry()
    metrics = CaMetrics(registry)
    kube = _kube_parts(args, registry, metrics) if args.kube else None
    locator = kube[0] if kube else StaticWorkloadLocator.from_yaml(args.workloads)
    ca = CertificateAuthority(authority, locator, args.trust_domain, max_ttl=args.max_ttl)
    audit = CaAudit(args.audit_log) if args.audit_log else None
    from agent.identity.caserver import CaServer  # noqa: PLC0415  # grpc: only when serving

    server = CaServer(ca, NodeAuthenticator(tokens, args.trust_domain),
                      require_node_cert=args.require_node_cert, server_names=args.server_name,
                      token_auth=kube[2] if kube else None, metrics=metrics, audit=audit,
                      cluster_id=args.cluster_id)

    async def run() -> None:
        stop = signals.stop_event()
        source_task = asyncio.create_task(kube[1].run()) if kube else None
        metrics_server = None
        if args.metrics_listen:
            mhost, _, mport = args.metrics_listen.rpartition(":")
            metrics_server = MetricsServer(registry, mhost.strip("[]"), int(mport))
            await metrics_server.start()
        port = await server.start(args.listen)
        host = args.listen.rpartition(":")[0]
        print(f"listening on {host}:{port}", flush=True)
        if metrics_server is not None:
            print(f"metrics on {metrics_server.host}:{metrics_server.port}", flush=True)
        stopping = asyncio.create_task(stop.wait())
        serving = asyncio.create_task(server.wait())
        try:
            await asyncio.wait((stopping, serving), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if stop.is_set():
                print(f"stopping: finishing requests in flight for up to {STOP_GRACE}s",
                      flush=True)
            # Stop before reaping `serving`: cancelling grpc's wait_for_termination first
            # would cancel the shutdown it shares.
            await server.stop(STOP_GRACE)
            await serving
            if source_task is not None:
                source_task.cancel()
                await asyncio.gather(source_task, return_exceptions=True)
            if kube is not None:
                await kube[2].checker.close()
            if metrics_server is not None:
                await metrics_server.stop()
            if audit is not None:
                audit.close()

    asyncio.run(run())
    return 0


def _kube_parts(args: argparse.Namespace, registry: CollectorRegistry, metrics: CaMetrics,
                ) -> tuple[PodIndex, ClusterPodSource, KubeTokenAuthenticator]:
    try:
        config = kubeconfig.load(args.kubeconfig)
    except kubeconfig.KubeConfigError as e:
        raise SystemExit(f"--kube: {e}") from None
    accounts = []
    for text in args.agent_service_account or ["nodemesh-system/nodemesh"]:
        ns, _, name = text.partition("/")
        if not ns or not name or "/" in name:
            raise SystemExit(f"--agent-service-account {text!r}: want NAMESPACE/NAME")
        accounts.append((ns, name))
    audiences = args.token_audience or [DEFAULT_AUDIENCE]
    checker: TokenChecker
    if args.token_check == "jwks":
        if not args.token_issuer:
            raise SystemExit("--token-check jwks needs --token-issuer (the cluster's "
                             "service-account-issuer)")
        checker = JwksTokenVerifier(config, args.token_issuer,
                                    args.jwks_url or config.server + "/openid/v1/jwks",
                                    audiences)
    else:
        checker = ApiTokenReviewer(config, audiences)
    pods = PodIndex(args.trust_domain, registry)
    source = ClusterPodSource(config, pods, registry=registry)
    auth = KubeTokenAuthenticator(checker, pods, accounts, args.trust_domain, metrics)
    return pods, source, auth


def _init(args: argparse.Namespace) -> int:
    existing = [p for p in (args.root_cert, args.root_key) if p.exists()]
    if existing:
        raise SystemExit(f"{existing[0]} exists; not overwriting a root")
    authority = load_or_create_root(args.root_cert, args.root_key, args.trust_domain)
    print(f"root for {args.trust_domain}: {args.root_cert} (share it), {args.root_key} "
          f"(mode 0600; only the CA may read it), expires {authority.root.not_valid_after_utc}")
    return 0


def _bundle(args: argparse.Namespace) -> int:
    try:
        roots = read_pem_bundle(args.root_cert)
    except TrustBundleError as e:
        raise SystemExit(str(e)) from None
    print(spiffe_bundle([pki.certs_from_pem(r)[0] for r in roots], args.sequence))
    return 0


def _node_cert(args: argparse.Namespace) -> int:
    authority = load_or_create_root(args.root_cert, args.root_key, args.trust_domain, True)
    ca = CertificateAuthority(authority, StaticWorkloadLocator({}), args.trust_domain)
    key = pki.generate_key()
    chain = ca.issue_node_certificate(args.node, key.public_key(), args.ttl)
    write_private(args.key_out, pki.key_to_pem(key))
    args.cert_out.write_text(chain[0])
    print(f"node certificate for {args.node}: {args.cert_out}, key {args.key_out}")
    return 0


def _issue(args: argparse.Namespace) -> int:
    if (args.node_cert is None) != (args.node_key is None):
        raise SystemExit("give both --node-cert and --node-key, or neither")
    from agent.identity.caclient import CaClient  # noqa: PLC0415  # grpc: only when asking

    client = CaClient(
        args.ca, args.ca_root.read_text(), token_file=args.token_file,
        cluster_id=args.cluster_id,
        node_cert_pem=args.node_cert.read_text() if args.node_cert else None,
        node_key_pem=args.node_key.read_bytes() if args.node_key else None)

    async def run() -> int:
        try:
            cert = await client.issue(args.identity, args.ttl)
        except CaError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            await client.close()
        if args.key_out:
            write_private(args.key_out, cert.key_pem())
        sys.stdout.write("".join(cert.chain))
        print(f"issued {cert}", file=sys.stderr)
        return 0

    return asyncio.run(run())
