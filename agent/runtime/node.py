"""NodeAgent: one node's agent and tunnel under one supervisor.

On every state change it recompiles policy (one atomic generation swap) and reconciles
enrollment: each local in-mesh workload gets a certificate, tunnel listeners in its netns and a
datapath enrollment; workloads that leave are removed. Kernel flow events and tunnel connection
events feed telemetry. Readiness (agent/runtime/readiness.py) turns true once a reconcile that
began after the first full sync has compiled policy and enrolled every local in-mesh pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from agent.abi import ID_PLAINTEXT
from agent.config import DEFAULT_CA_ROOT_CERT, H2_BUDGETS, Config, ConfigError
from agent.datapath.datapath import Datapath
from agent.datapath.identities import ID_OTHER, IdentityTable
from agent.datapath.layouts import Backend, FlowEvent, Frontend
from agent.datapath.options import BuildOptions
from agent.datapath.policymap import CompiledPolicy, PolicyCompiler
from agent.datapath.ratelimitmap import CompiledLimits, RateLimitCompiler
from agent.datapath.servicemap import CompiledServices, compile_service_set
from agent.datapath.verdicts import Counter, KernelEventKind, Reason
from agent.dataplane import wire
from agent.dataplane.supervisor import InitSettings, Supervisor, TunnelBudgets
from agent.enroll import Enroller, PodLocator, PodPlacement
from agent.host import cgroup
from agent.identity import pki
from agent.identity.federation import FederationFiles, TrustDomains
from agent.identity.manager import CertificateManager, Rotation
from agent.identity.spiffe import Identity
from agent.identity.trustbundle import TrustBundleFile
from agent.model.mesh import Workload
from agent.policy.peerauth import MtlsMode
from agent.runtime import flows
from agent.runtime.certs import InProcessCa, embedded_ca, load_or_create_authority
from agent.runtime.outliers import OutlierDetector, OutlierSettings
from agent.runtime.readiness import Readiness
from agent.state.snapshot import MeshState
from agent.state.store import StateStore
from agent.telemetry import flow as flowmod
from agent.telemetry.metrics import ScrapeLabelled, ScrapeValue
from agent.telemetry.pipeline import Telemetry, TelemetryConfig
from ztunnel import compiled_modules, podnet
from ztunnel.events import Cause, ConnectionEvent, Phase, TunnelDirection
from ztunnel.lograte import RepeatLimiter
from ztunnel.tunnel import Mode, PodSpec, TunnelWorkload

if TYPE_CHECKING:  # grpc (~20 MiB resident) is imported only when an external CA is configured
    from agent.identity.caclient import CaClient

log = logging.getLogger(__name__)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class _Enrolled:
    workload: Workload
    placement: PodPlacement
    cookie: int


@dataclass
class NodeAgent:
    config: Config
    store: StateStore
    locator: PodLocator
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    readiness: Readiness = field(default_factory=Readiness)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    log_format: str = "json"  # the data-plane workers log like the control process

    def __post_init__(self) -> None:
        cfg = self.config
        self.identities = IdentityTable()
        self.compiler = PolicyCompiler(self.identities)
        self.limit_compiler = RateLimitCompiler(self.identities)
        self.limits = CompiledLimits()
        root = cfg.cgroup_root or cgroup.mount_point()
        # BCC and LLVM run in a short-lived loader process, never resident in the agent.
        self.datapath = Datapath(root, BuildOptions(pin_dir=cfg.pin_dir), load_in_process=False)
        self.telemetry = Telemetry(
            TelemetryConfig(node=cfg.node_name, flow_log=cfg.flow_log, audit_log=cfg.audit_log,
                            compiled=bool(compiled_modules())),
            self.registry,
        )
        self.tunnel_records = flows.TunnelRecords(self._workload_by_ip, self._service_host,
                                                  self._endpoint_service)
        self._cache_metrics()
        # The tunnel's repeat-limited log (ztunnel.lograte): how much a flood kept out of it.
        ScrapeValue(self.registry, "nodemesh_log_lines_suppressed",
                    "Repeated identical warning lines counted instead of written", "counter",
                    read=lambda: RepeatLimiter.shared().suppressed_total)
        ttl = timedelta(seconds=cfg.cert_ttl_seconds)
        self.certs = self._certificate_manager(ttl)
        # Federation and aliases: a trust hook only when configured (else: our domain only).
        self.federation = FederationFiles(cfg.federated_bundles, cfg.trust_domain)
        self.trust = TrustDomains(cfg.trust_domain, lambda: self.certs.trust_bundle,
                                  frozenset(cfg.trust_domain_aliases), self.federation.bundles)
        configured = bool(cfg.federated_bundles or cfg.trust_domain_aliases)
        # The data plane runs in worker processes (agent/dataplane): this process keeps the
        # maps, certificates, policy, telemetry and health, on a loop no peer can starve.
        self.dataplane = Supervisor(
            max(1, cfg.workers),
            InitSettings(cfg.trust_domain, cfg.outside_mesh, ID_PLAINTEXT, ID_OTHER,
                         trust=configured, aliases=tuple(cfg.trust_domain_aliases),
                         budgets=TunnelBudgets(
                             max_pending_handshakes=cfg.max_pending_handshakes,
                             max_pending_handshakes_per_ip=cfg.max_pending_handshakes_per_ip,
                             max_upstream_connects_per_connection=(
                                 cfg.max_upstream_connects_per_connection),
                             prewarm_destinations=cfg.prewarm_destinations,
                             prewarm_ttl=cfg.prewarm_ttl,
                             h2={name.removeprefix("h2_"): getattr(cfg, name)
                                 for name in H2_BUDGETS})),
            on_event=self._tunnel_event, set_inbound=self._set_inbound,
            log_format=self.log_format)
        # Every tunnel budget trip and pool counter (Tunnel.stats), summed over the workers.
        dataplane = self.dataplane
        ScrapeLabelled(self.registry, "nodemesh_tunnel_stat",
                       "Tunnel counters and gauges by name, summed over the data-plane workers: "
                       "budget trips (docs/architecture.md, Budgets), pending handshakes, pool "
                       "and pre-warm counts", "gauge", ("name",),
                       read=lambda: {k: v for k, v in dataplane.stats().items()
                                     if k.startswith(("tunnel_", "pool_", "hbone_"))})
        self.enrolled: dict[str, _Enrolled] = {}
        self.enroller = Enroller(cfg.node_name, self.locator, self._enroll, self._unenroll)
        self.pending: set[str] = set()
        self.compiled = CompiledPolicy()
        self.policy_updates = 0
        self._dirty = asyncio.Event()
        self._stop = threading.Event()
        self._events_thread: threading.Thread | None = None
        # Service backend sets: compiled on reconcile (a worker thread), filtered by outlier
        # detection (the event loop); one lock orders their writes to the load balancer.
        self.outliers = OutlierDetector(OutlierSettings(
            cfg.outlier_failures, cfg.outlier_ejection_seconds, cfg.outlier_max_ejection_seconds))
        self._services = CompiledServices()
        self._services_lock = threading.Lock()
        self._endpoint_services: dict[tuple[str, int], str] = {}
        self._return_timer: asyncio.TimerHandle | None = None

    bundle_file: TrustBundleFile | None = field(default=None, init=False)
    ca_client: CaClient | None = field(default=None, init=False)

    def _certificate_manager(self, ttl: timedelta) -> CertificateManager:
        """An external Istio-compatible CA when configured, else the embedded CA in process."""
        cfg = self.config
        if cfg.ca_address:
            if cfg.ca_root_cert is None:
                raise ConfigError("ca_address needs ca_root_cert: the CA's trust anchor")
            # The root file is the mesh trust bundle: re-read on change (root rotation).
            self.bundle_file = TrustBundleFile(cfg.ca_root_cert)
            bundle = self.bundle_file.bundle
            # grpc (~20 MiB resident) only when an external CA is configured.
            from agent.identity.caclient import CaClient  # noqa: PLC0415

            # The token file is re-read per request (the kubelet rotates projected tokens).
            client = CaClient(cfg.ca_address, "".join(bundle), token_file=cfg.ca_token_path,
                              cluster_id=cfg.cluster_id, ttl=ttl)
            self.ca_client = client
            return CertificateManager(client, registry=self.registry, trust_bundle=bundle)
        ca_cert = cfg.ca_root_cert or DEFAULT_CA_ROOT_CERT
        authority = load_or_create_authority(
            ca_cert, ca_cert.with_name("root-key.pem"), cfg.trust_domain
        )
        ca = embedded_ca(authority, self.store, cfg.trust_domain, ttl)
        return CertificateManager(
            InProcessCa(ca, cfg.node_name, ttl),
            registry=self.registry,
            trust_bundle=[pki.cert_to_pem(authority.root)],
        )

    # -- what the data-plane workers are told ------------------------------------------------
    def _set_inbound(self, spec: PodSpec, sock: socket.socket) -> None:
        self.datapath.set_inbound_listener(ipaddress.IPv4Address(spec.ip), sock)

    def _push_certificate(self, identity: Identity) -> None:
        cert = self.certs.current(identity)
        if cert is None:
            self.dataplane.drop_certificate(identity)
        else:
            self.dataplane.set_certificate(identity, cert.chain_pem().decode(),
                                           cert.key_pem().decode())

    def _rotated(self, rotation: Rotation) -> None:
        self._push_certificate(rotation.identity)

    def _push_trust(self) -> bool:
        federated = {td: "".join(pki.cert_to_pem(c) for c in certs)
                     for td, certs in self.trust.federated.items()}
        return self.dataplane.set_trust(tuple(self.certs.trust_bundle), federated)

    def _bundle_changed(self, _bundle: tuple[str, ...]) -> None:
        self._push_trust()

    def _push_tables(self) -> None:
        """Identity ids and resolver entries as of now (after a compile allocated ids)."""
        self.dataplane.set_identity_ids(dict(self.identities.items()))
        table: dict[str, TunnelWorkload] = {}
        for w in self.state.workloads:
            for ip in w.ips:
                wl = self._resolve(str(ip))
                if wl is not None:
                    table[str(ip)] = wl
        self.dataplane.set_resolver(table)

    async def start_dataplane(self) -> None:
        """Start the workers with the trust bundle and the tables; certificates follow every
        rotation (the manager's subscription)."""
        self._push_trust()
        self.certs.subscribe(self._rotated)
        self.certs.subscribe_trust_bundle(self._bundle_changed)
        for ident in self.certs.identities():
            self._push_certificate(ident)
        self._push_tables()
        await self.dataplane.start()
        reg, dp = self.registry, self.dataplane
        ScrapeValue(reg, "nodemesh_workers", "Data-plane worker processes running", "gauge",
                    read=lambda: len(dp.pids()))
        ScrapeValue(reg, "nodemesh_worker_restarts", "Data-plane workers that died and were "
                    "restarted (their connections failed)", "counter", read=lambda: dp.restarts)
        ScrapeValue(reg, "nodemesh_worker_watchdog_kills", "Data-plane workers killed because "
                    "they stopped answering (then restarted)", "counter",
                    read=lambda: dp.watchdog_kills)
        ScrapeLabelled(reg, "nodemesh_worker_connections", "Connections each data-plane worker "
                       "handled (accepted or refused)", "counter", ("worker",),
                       read=lambda: {str(i): n for i, n in dp.handled.items()})
        ScrapeLabelled(reg, "nodemesh_worker_resident_bytes", "Resident memory of each "
                       "data-plane worker", "gauge", ("worker",),
                       read=lambda: {str(i): _resident(pid) for i, pid in dp.pids().items()})
        ScrapeValue(reg, "nodemesh_worker_events_dropped", "Connection events a worker dropped "
                    "because its queue to the control process was full", "counter",
                    read=lambda: dp.stats().get("events_dropped_total", 0.0))

    def _cache_metrics(self) -> None:
        """The control process's bounded telemetry caches: size, and what they dropped when
        full (many distinct peers or workloads: each event then built from scratch)."""
        records, fm = self.tunnel_records, self.telemetry.flow_metrics
        caches: dict[str, Callable[[], tuple[int, int]]] = {
            "flow_shapes": lambda: (len(records), records.evicted),
            "metric_children": lambda: (fm.children_cached(), fm.children_evicted),
            "event_identities": lambda: _lru(wire.identity_cache_info()),
            "record_addresses": lambda: _lru(flowmod.address_cache_info()),
            "event_addresses": lambda: _lru(_parse_ip.cache_info()),
        }
        ScrapeLabelled(self.registry, "nodemesh_telemetry_cache_entries", "Entries in the "
                       "control process's bounded telemetry caches", "gauge", ("cache",),
                       read=lambda: {k: f()[0] for k, f in caches.items()})
        ScrapeLabelled(self.registry, "nodemesh_telemetry_cache_evictions", "Entries the "
                       "bounded telemetry caches dropped because they were full", "counter",
                       ("cache",), read=lambda: {k: f()[1] for k, f in caches.items()})

    # -- lookups -----------------------------------------------------------------------------
    @property
    def state(self) -> MeshState:
        return self.store.current

    def _workload_by_ip(self, ip: str) -> Workload | None:
        try:
            return self.state.workload_by_ip(_parse_ip(ip))
        except ValueError:
            return None

    def _resolve(self, ip: str) -> TunnelWorkload | None:
        w = self._workload_by_ip(ip)
        if w is None or not self.state.in_mesh(w):
            return None
        return TunnelWorkload(ip=ip, identity=w.identity, name=w.ref)

    def _service_host(self, vip: str) -> str:
        svc = self.state.service_by_vip(ipaddress.ip_address(vip))
        return f"{svc.name}.{svc.namespace}.svc.cluster.local" if svc else ""

    def _endpoint_service(self, ip: str, port: int) -> str:
        return self._endpoint_services.get((ip, port), "")

    def _policy_name(self, pid: int) -> str:
        return self.compiled.policy_names.get(pid, str(pid))

    def _limit_name(self, lid: int) -> str:
        return self.limits.names.get(lid, str(lid))

    # -- telemetry producers -----------------------------------------------------------------
    def _tunnel_event(self, ev: ConnectionEvent) -> None:
        ejected = self._observe_outlier(ev)
        if flows.reported_by_kernel(ev):
            return  # the kernel's deny event records it, with the policy and reason
        self.telemetry.emit(self.tunnel_records.record(ev, ejected))

    def _observe_outlier(self, ev: ConnectionEvent) -> bool:
        """Feed an outbound Service connect's result to outlier detection: connected (open) or
        the upstream unreachable (refused, timed out, HBONE 503). True if it ejected."""
        if ev.direction is not TunnelDirection.OUTBOUND or not ev.svc_ip:
            return False
        if ev.phase is Phase.OPEN:
            ok = True
        elif ev.cause is Cause.UPSTREAM:
            ok = False
        else:
            return False
        fe = Frontend(ipaddress.IPv4Address(ev.svc_ip), ev.svc_port)
        be = Backend(ipaddress.IPv4Address(ev.dst_ip), ev.dst_port)
        with self._services_lock:
            ejection = self.outliers.observe(fe, be, ok)
        if ejection is None:
            return False
        log.warning("service %s (%s:%d): endpoint %s:%d ejected for %.0f s after %d failed "
                    "connects in a row (ejection %d)", self._service_host(ev.svc_ip) or "?",
                    fe.vip, fe.port, be.ip, be.port, ejection.seconds,
                    self.outliers.settings.consecutive_failures, ejection.ejections)
        self._apply_services()
        return True

    def _apply_services(self, services: CompiledServices | None = None) -> None:
        """Write the Service backend sets minus ejected endpoints (atomic per Service port),
        and wake up when the next ejected endpoint is due back."""
        with self._services_lock:
            if services is not None:
                self._services = services
                self.outliers.set_table(services.backends)
            current = self._services
            self.datapath.apply_services(self.outliers.filter(current.backends), current.caps)
            wait = self.outliers.next_return()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the reconcile worker thread: its caller schedules the timer
            return
        self._schedule_return(loop, wait)

    def _schedule_return(self, loop: asyncio.AbstractEventLoop, wait: float | None) -> None:
        if self._return_timer is not None:
            self._return_timer.cancel()
            self._return_timer = None
        if wait is not None:
            # A little late rather than early: the endpoint must be due when the timer fires.
            self._return_timer = loop.call_later(wait + 0.05, self._apply_services)

    def _kernel_event(self, ev: FlowEvent) -> None:
        # The tunnel reports every connection it carries (with identities, both reporters), so
        # the kernel's open/close events would count them twice; only connect-time denies,
        # which never reach the tunnel, go to telemetry.
        if ev.bypass and ev.kind in (KernelEventKind.OPEN, KernelEventKind.CLOSE):
            # Same-node bypass: no tunnel carried it, so the kernel's record is the only one.
            self.telemetry.emit(flows.from_kernel(ev, self._workload_by_ip, self._policy_name,
                                                  self._service_host))
        elif ev.kind == KernelEventKind.DENY:
            # A rate-limited deny names its ConnectionRateLimit where others name a policy.
            names = self._limit_name if ev.reason == Reason.RATE_LIMITED else self._policy_name
            self.telemetry.emit(flows.from_kernel(ev, self._workload_by_ip, names,
                                                  self._service_host))

    def _frontend_labels(self, fe: Frontend) -> tuple[str, str]:
        return self._service_host(str(fe.vip)) or str(fe.vip), str(fe.port)

    def _per_frontend(self, index: int) -> dict[tuple[str, ...], float]:
        """The kernel's per Service port counts: 0 open connections, 1 cap refusals."""
        return {self._frontend_labels(fe): float(counts[index])
                for fe, counts in self.datapath.service_connections().items()}

    def _ejection_counts(self) -> dict[tuple[str, ...], float]:
        with self._services_lock:
            totals = dict(self.outliers.ejections_total)
        return {(*self._frontend_labels(fe), f"{be.ip}:{be.port}"): float(n)
                for (fe, be), n in totals.items()}

    def _ejected_counts(self) -> dict[tuple[str, ...], float]:
        with self._services_lock:
            ejected = self.outliers.ejected()
        return {self._frontend_labels(fe): float(len(bes)) for fe, bes in ejected.items()}

    def request_reconcile(self) -> None:
        self._dirty.set()

    def _poll_events(self) -> None:
        while not self._stop.is_set():
            self.datapath.poll_events(200)

    # -- lifecycle ---------------------------------------------------------------------------
    def start_datapath(self) -> list[str]:
        actions = self.datapath.install()
        # Before any policy is compiled: ids come from the node's pinned table, the same an
        # agent running beside this one (surge upgrade) or before it uses.
        self.identities.share(self.datapath.pin_dir)
        self.datapath.set_exclusions(self.config.exclude_ports, self.config.exclude_cidrs)
        self.datapath.set_same_node_bypass(self.config.same_node_bypass)
        self.datapath.open_events(self._kernel_event, kinds=(KernelEventKind.DENY,), bypassed=True)
        self._events_thread = threading.Thread(
            target=self._poll_events, name="bpf-events", daemon=True
        )
        self._events_thread.start()
        am = self.telemetry.agent_metrics
        am.ringbuf_drops.set_reader(
            lambda: {"flows": self.datapath.counters()[Counter.RINGBUF_DROPS]}
        )
        am.datapath_drops.set_reader(self.datapath.drop_counts)
        am.enrolled_pods.set_reader(lambda: len(self.enrolled))
        am.same_node_bypass.set_reader(
            lambda: {c.name.lower(): v for c, v in self.datapath.bypass_counters().items()}
        )
        am.map_fill.set_reader(
            lambda: {m: used / cap for m, (used, cap) in self.datapath.map_fill().items()}
        )
        am.service_connections.set_reader(lambda: self._per_frontend(0))
        am.service_overflows.set_reader(lambda: self._per_frontend(1))
        am.endpoint_ejections.set_reader(self._ejection_counts)
        am.endpoints_ejected.set_reader(self._ejected_counts)
        dp = self.dataplane  # the workers' pools, summed
        am.hbone_connections.set_reader(lambda: dp.stats().get("pool_connections_opened", 0.0))
        am.hbone_streams.set_reader(lambda: dp.stats().get("pool_streams_opened", 0.0))
        am.hbone_dial_failures.set_reader(lambda: dp.stats().get("pool_dial_failures", 0.0))
        self.store.subscribe(lambda _old, _new: self._dirty.set())
        return actions

    async def run(self) -> None:
        """Reconcile whenever state changes, until cancelled."""
        self._dirty.set()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            # Read before the pass reads the state: a pass that began before the first lists
            # completed saw a partial state and proves nothing about readiness.
            began_synced = self.synced.is_set()
            try:
                await self.reconcile()
            except Exception:
                # A failed pass must not stop the agent: what is installed keeps enforcing.
                log.exception("reconcile failed; retrying in 1s")
                self.readiness.pass_done(began_synced, False, self._pending_refs())
                await asyncio.sleep(1)
                self._dirty.set()
                continue
            self.readiness.pass_done(began_synced, True, self._pending_refs())
            if self.pending:
                await asyncio.sleep(0.5)  # netns not found yet: retry soon
                self._dirty.set()

    async def watch_trust_bundle(self, interval: float = 1.0) -> None:
        """Apply rewrites of the trust bundle file (external CA) and of the federated bundles
        until cancelled."""
        while True:
            await asyncio.sleep(interval)
            federated = self.federation.poll()
            if federated is not None:
                self.trust.federated = federated
                self._push_trust()
                refused = await self.dataplane.recheck_peers()
                log.info("federated bundles changed: %d connection(s) no longer trusted", refused)
            if self.bundle_file is None or self.ca_client is None:
                continue
            bundle = self.bundle_file.poll()
            if bundle is None:
                continue
            # The client first: a renewal the manager starts must verify against the new roots.
            self.ca_client.set_ca_roots("".join(bundle))
            self.ca_client.set_trust_bundle(bundle)
            self.certs.set_trust_bundle(bundle)
            self._push_trust()  # also pushed by the manager's subscription: sent once
            refused = await self.dataplane.recheck_peers()  # a dropped root: its peers' connections
            log.info("trust bundle changed: %d connection(s) no longer trusted", refused)

    def _pending_refs(self) -> dict[str, tuple[str, str]]:
        state, reasons = self.state, self.enroller.pending
        out = {}
        for uid in self.pending:
            w = state.workload_by_uid(uid)
            out[uid] = (w.ref if w is not None else uid, reasons.get(uid, "pending"))
        return out

    async def reconcile(self) -> None:
        state = self.state
        start = time.monotonic()
        # Compiling thousands of rules takes seconds; off the event loop the tunnel keeps
        # relaying and the admin endpoint keeps answering meanwhile (reconciles never overlap).
        compiled = await asyncio.to_thread(self._compile_and_apply, state)
        self._push_tables()
        self._schedule_return(asyncio.get_running_loop(), self.outliers.next_return())
        self.compiled = compiled
        self.policy_updates += 1
        self.telemetry.agent_metrics.policy_update_seconds.observe(time.monotonic() - start)
        await self.enroller.reconcile(state)
        self.pending = set(self.enroller.pending)
        self._refresh_enrolled(state)

    def _refresh_enrolled(self, state: MeshState) -> None:
        """Carry PeerAuthentication and label changes to pods already enrolled, in place.

        The kernel's entries were just recompiled; the tunnel's plaintext mode and names are
        updated here, so a mode change needs no re-enroll and leaves open connections alone.
        """
        for uid, e in self.enrolled.items():
            w = state.workload_by_uid(uid)
            if w is None or w.identity != e.workload.identity or w.ips != e.workload.ips:
                continue  # leaving or being replaced: the enroller handles it
            e.workload = w
            spec = self.dataplane.pod(uid)
            if spec is not None:
                self.dataplane.update_pod(replace(spec, name=w.ref, mode=_tunnel_mode(state, w)))

    def _compile_and_apply(self, state: MeshState) -> CompiledPolicy:
        compiled = self.compiler.compile(state.policy_set, state.workloads)
        self.datapath.apply_policy(compiled.entries, compiled.cidrs, compiled.groups)
        # After policy, which allocated the identities the limits are keyed by.
        limits = self.limit_compiler.compile(state.rate_limits, state.workloads)
        self.datapath.apply_rate_limits(limits.entries)
        self.limits = limits
        # After policy: a newly added endpoint is policed before connects can reach it.
        services = compile_service_set(state)
        self._endpoint_services = _endpoint_services(services)
        self._apply_services(services)
        return compiled

    async def _enroll(self, w: Workload, placement: PodPlacement) -> None:
        ip = _v4(w)
        if ip is None:
            # The datapath is IPv4 only; connect6 already fails closed for enrolled pods.
            log.warning("%s has no IPv4 address: not captured (IPv4 only)", w.ref)
            return
        ident = self.identities.allocate(w.identity)
        self.dataplane.set_identity_ids({w.identity: ident})
        await self.certs.get(w.identity, timeout=30)
        self._push_certificate(w.identity)
        mode = _tunnel_mode(self.state, w)
        # Once here, not per worker (pyroute2 runs its own loop: a thread).
        await asyncio.to_thread(podnet.prepare_pod_netns, placement.netns)
        # Every worker opens its listeners; one 15006 listener goes into nm_inbound_v1.
        await self.dataplane.add_pod(
            PodSpec(
                uid=w.uid,
                netns=placement.netns,
                ip=str(ip),
                identity=w.identity,
                name=w.ref,
                mode=mode,
            )
        )
        cookie = self.datapath.enroll(placement.netns, ident, ip)
        self.enrolled[w.uid] = _Enrolled(w, placement, cookie)
        log.info("enrolled %s (%s, %s, id %d)", w.ref, ip, w.identity, ident)

    async def _unenroll(self, uid: str) -> None:
        e = self.enrolled.pop(uid, None)
        if e is None:
            return  # never entered the datapath (no IPv4 address)
        self.datapath.unenroll(e.cookie)
        ip = _v4(e.workload)
        if ip is not None:
            with contextlib.suppress(OSError):
                self.datapath.remove_inbound_listener(ip)
        await self.dataplane.remove_pod(uid)

    async def shutdown(self, drain: float) -> None:
        """Drain the workers and stop; the datapath stays pinned (fail closed while down)."""
        await self.dataplane.drain(drain)
        self._stop.set()
        if self._events_thread is not None:
            self._events_thread.join(timeout=2)
        await self.certs.close()


@functools.lru_cache(maxsize=4096)
def _parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # Each connection event looks up both ends, mostly the same few addresses: parse once.
    return ipaddress.ip_address(ip)


def _lru(info: functools._CacheInfo) -> tuple[int, int]:
    """(entries, evicted) of an lru_cache that is never cleared: each miss beyond the size
    evicted one entry."""
    return info.currsize, max(0, info.misses - info.currsize)


def _endpoint_services(services: CompiledServices) -> dict[tuple[str, int], str]:
    """Endpoint ip:port -> the host of the one Service it backs (left out if several)."""
    owners: dict[tuple[str, int], set[str]] = {}
    for fe, backends in services.backends.items():
        svc = services.owner[fe]
        for b in backends:
            owners.setdefault((str(b.ip), b.port), set()).add(
                f"{svc.name}.{svc.namespace}.svc.cluster.local")
    return {k: next(iter(v)) for k, v in owners.items() if len(v) == 1}


def _tunnel_mode(state: MeshState, w: Workload) -> Mode:
    """The tunnel refuses plaintext outright only when every port of w is STRICT; with
    port-level exceptions the kernel's entries (MTLS_REQUIRED) decide per port at the
    tunnel's upstream connect."""
    base, ports = state.policy_set.mtls.strict_ports(w)
    return Mode.STRICT if base is MtlsMode.STRICT and not ports else Mode.PERMISSIVE


def _resident(pid: int) -> float:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return float(pages * PAGE_SIZE)


def _v4(w: Workload) -> ipaddress.IPv4Address | None:
    return next((ip for ip in w.ips if isinstance(ip, ipaddress.IPv4Address)), None)
