"""`nodemesh run`: the node agent and tunnel in one process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes

from agent import __version__
from agent import config as cfgmod
from agent.enroll import KubernetesLocator, PodLocator, TestbedLocator
from agent.host import cpus, signals
from agent.identity import pki
from agent.identity.federation import FederationError
from agent.identity.trustbundle import TrustBundleError
from agent.posture.live import live_report
from agent.runtime import admin
from agent.runtime.node import NodeAgent
from agent.runtime.readiness import Readiness
from agent.sources.file import FileSource, MeshConfigError
from agent.sources.k8sstate import KubernetesStateSink
from agent.sources.kube import config as kubeconfig
from agent.sources.kubernetes import KubernetesSource
from agent.state.snapshot import MeshState
from agent.state.store import StateStore
from agent.telemetry.metrics import ScrapeValue
from agent.telemetry.server import MetricsServer
from ztunnel import compiled_modules, data_path

log = logging.getLogger("nodemesh")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: structured logs for collectors."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run the node agent and tunnel",
        epilog="example: nodemesh run --config mesh.yaml --node-name node0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cfgmod.add_arguments(p)
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    p.set_defaults(func=_run)


def _locator(cfg: cfgmod.Config) -> PodLocator:
    if cfg.testbed_run:
        return TestbedLocator.for_run(cfg.testbed_run)
    return KubernetesLocator()


def _run(args: argparse.Namespace) -> int:
    if args.log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.getLogger().handlers[:] = [handler]
    try:
        cfg = cfgmod.from_environment(args)
    except cfgmod.ConfigError as exc:
        print(f"nodemesh run: {exc}", file=sys.stderr)
        return 2
    if cfg.workers == 0:
        cfg = dataclasses.replace(cfg, workers=cpus.usable())
    return asyncio.run(run_agent(cfg, log_format=args.log_format))


async def run_agent(cfg: cfgmod.Config, *, log_format: str = "json") -> int:
    stop = signals.stop_event()  # first: a SIGTERM during start-up still drains, then exits
    store = StateStore(MeshState.build(root_namespace=cfg.root_namespace))
    readiness = Readiness(source_grace=cfg.source_grace_seconds)
    try:
        agent = NodeAgent(cfg, store, _locator(cfg), readiness=readiness, log_format=log_format)
    except (cfgmod.ConfigError, TrustBundleError, FederationError) as exc:
        log.error("%s; not starting", exc)  # trust material unusable: fail closed, say why
        return 2
    if agent.bundle_file is not None:
        bundle_file = agent.bundle_file
        ScrapeValue(agent.registry, "nodemesh_trust_bundle_errors", "Trust bundle file "
                    "rewrites rejected (the last good bundle stayed in force)", "counter",
                    read=lambda: bundle_file.errors)
    health: dict[str, Callable[[], dict[str, Any]]] = {}
    if cfg.source == "file":
        assert cfg.config_path is not None  # checked by config.build
        file_source = FileSource(cfg.config_path, store, root_namespace=cfg.root_namespace)
        try:
            file_source.load_once()
        except MeshConfigError as exc:  # no last good state to keep: refuse to start
            log.error("%s; not starting", exc)
            return 2
        ScrapeValue(agent.registry, "nodemesh_config_errors", "Mesh configuration changes "
                    "rejected (the last good configuration stayed in force)", "counter",
                    read=lambda: file_source.errors)
        health["config"] = file_source.status
        agent.synced.set()  # a file source is fully synced once loaded
        readiness.synced = True
        source_task = file_source.run()
    else:
        sink = KubernetesStateSink(store, trust_domain=cfg.trust_domain)
        kube = KubernetesSource(kubeconfig.load(cfg.kubeconfig), cfg.node_name, sink,
                                registry=agent.registry)
        readiness.source_outage = kube.unreachable_for
        source_task = _kube_run(kube, sink, agent)
    actions = agent.start_datapath()
    log.info("datapath: %s", ", ".join(actions))
    await agent.start_dataplane()
    readiness.data_plane = agent.dataplane.unserving
    log.info("data plane: %d worker processes (pids %s)", cfg.workers,
             ", ".join(str(p) for p in agent.dataplane.pids().values()))
    runners = [
        await admin.serve(
            admin.admin_app(lambda: _dump(agent), agent.telemetry.hub, lambda: live_report(
                agent.state, agent.certs, agent.telemetry.hub, cfg.node_name)),
            *cfgmod.parse_addr(cfg.admin_addr),
        ),
        await admin.serve(
            admin.readiness_app(agent.readiness.check,
                                lambda: {k: f() for k, f in health.items()}),
            *cfgmod.parse_addr(cfg.readiness_addr),
        ),
    ]
    metrics = MetricsServer(agent.registry, *cfgmod.parse_addr(cfg.metrics_addr))
    await metrics.start()
    tasks = [
        asyncio.create_task(agent.run(), name="reconcile"),
        asyncio.create_task(source_task, name=f"{cfg.source}-source"),
        asyncio.create_task(agent.watch_trust_bundle(), name="trust-bundle"),
    ]
    log.info("nodemesh agent on node %s running", cfg.node_name)
    await stop.wait()
    log.info("shutting down: draining the tunnel for up to %.1fs", cfg.drain_seconds)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
    await agent.shutdown(cfg.drain_seconds)
    await metrics.stop()
    for r in runners:
        await r.cleanup()
    return 0


async def _kube_run(kube: KubernetesSource, sink: KubernetesStateSink, agent: NodeAgent) -> None:
    """Run the watch; readiness waits for the first full list of every resource."""

    async def mark_synced() -> None:
        await sink.wait_synced()
        agent.synced.set()
        agent.readiness.synced = True
        agent.request_reconcile()

    synced = asyncio.create_task(mark_synced())
    try:
        await kube.run()
    finally:
        synced.cancel()


def _certificates(agent: NodeAgent) -> dict[str, Any]:
    """Each identity's current certificate and the root it chains to, and the trust bundle
    (SHA-256 fingerprints): what an operator checks during a root rotation."""
    def fp(pem: str) -> str:
        return pki.certs_from_pem(pem)[0].fingerprint(hashes.SHA256()).hex()

    out: dict[str, Any] = {"trust_bundle": [fp(p) for p in agent.certs.trust_bundle]}
    for ident in sorted(agent.certs.identities()):
        cert = agent.certs.current(ident)
        out[ident.uri] = None if cert is None else {
            "serial": f"{cert.serial:x}", "not_after": cert.not_after.isoformat(),
            "root": fp(cert.root_pem)}
    return out


def _dump(agent: NodeAgent) -> dict[str, Any]:
    st = agent.state
    return {
        "config": agent.config.dump(),
        # what the tunnel runs: "compiled (mypyc)" with its modules, or "pure Python"
        "build": {"version": __version__, "data_path": data_path(),
                  "compiled": compiled_modules()},
        "enrolled": {
            uid: {"workload": e.workload.ref, "netns": e.placement.netns, "netns_cookie": e.cookie}
            for uid, e in agent.enrolled.items()
        },
        "pending": sorted(agent.pending),
        "last_enroll": agent.enroller.last_enroll,
        "last_unenroll": agent.enroller.last_unenroll,
        "identities": {str(i): n for i, n in agent.identities.items()},
        "workloads": [w.ref for w in st.workloads],
        "policy": {
            "entries": len(agent.compiled.entries),
            "cidrs": len(agent.compiled.cidrs),
            "policies": agent.compiled.policy_names,
            "updates": agent.policy_updates,
        },
        "datapath": {
            "pin_dir": str(agent.datapath.pin_dir),
            "counters": {c.name.lower(): v for c, v in agent.datapath.counters().items()},
            "services": agent.datapath.written_services(),
        },
        "certificates": _certificates(agent),
        "workers": {"pids": agent.dataplane.pids(), "restarts": agent.dataplane.restarts,
                    "connections": agent.dataplane.handled, "stats": agent.dataplane.stats()},
        "ready": agent.readiness.check()[0],
        "readiness": agent.readiness.check()[1],
        "enrollment_failing": agent.readiness.failing(),
    }
