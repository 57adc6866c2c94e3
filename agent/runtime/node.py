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
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from prometheus_client import CollectorRegistry

from agent.config import DEFAULT_CA_ROOT_CERT, Config, ConfigError
from agent.datapath.datapath import Datapath
from agent.datapath.identities import IdentityTable
from agent.datapath.layouts import FlowEvent
from agent.datapath.options import BuildOptions
from agent.datapath.policymap import CompiledPolicy, PolicyCompiler
from agent.datapath.ratelimitmap import CompiledLimits, RateLimitCompiler
from agent.datapath.servicemap import compile_services
from agent.datapath.verdicts import Counter, EventKind, Reason
from agent.enroll import Enroller, PodLocator, PodPlacement
from agent.host import cgroup
from agent.identity import pki
from agent.identity.caclient import CaClient
from agent.identity.manager import CertificateManager
from agent.model.mesh import Workload
from agent.policy.peerauth import MtlsMode
from agent.runtime import flows
from agent.runtime.certs import (
    InProcessCa,
    TunnelCertificates,
    embedded_ca,
    load_or_create_authority,
)
from agent.runtime.readiness import Readiness
from agent.state.snapshot import MeshState
from agent.state.store import StateStore
from agent.telemetry.metrics import ScrapeCollector
from agent.telemetry.pipeline import Telemetry, TelemetryConfig
from ztunnel.events import ConnectionEvent
from ztunnel.lograte import RepeatLimiter
from ztunnel.tunnel import Mode, PodSpec, Tunnel, TunnelConfig
from ztunnel.tunnel import Workload as TunnelWorkload

log = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        cfg = self.config
        self.identities = IdentityTable()
        self.compiler = PolicyCompiler(self.identities)
        self.limit_compiler = RateLimitCompiler(self.identities)
        self.limits = CompiledLimits()
        root = cfg.cgroup_root or cgroup.mount_point()
        self.datapath = Datapath(root, BuildOptions(pin_dir=cfg.pin_dir))
        self.telemetry = Telemetry(
            TelemetryConfig(node=cfg.node_name, flow_log=cfg.flow_log, audit_log=cfg.audit_log),
            self.registry,
        )
        # The tunnel's repeat-limited log (ztunnel.lograte): how much a flood kept out of it.
        ScrapeCollector(self.registry, "nodemesh_log_lines_suppressed",
                        "Repeated identical warning lines counted instead of written", "counter",
                        read=lambda: RepeatLimiter.shared().suppressed_total)
        ttl = timedelta(seconds=cfg.cert_ttl_seconds)
        self.certs = self._certificate_manager(ttl)
        self.tunnel = Tunnel(
            TunnelConfig(
                certificates=TunnelCertificates(self.certs),
                resolver=self._resolve,
                trust_domain=cfg.trust_domain,
                identity_id=self.identities.id_of,
                on_event=self._tunnel_event,
            )
        )
        self.enrolled: dict[str, _Enrolled] = {}
        self.enroller = Enroller(cfg.node_name, self.locator, self._enroll, self._unenroll)
        self.pending: set[str] = set()
        self.compiled = CompiledPolicy()
        self.policy_updates = 0
        self._dirty = asyncio.Event()
        self._stop = threading.Event()
        self._events_thread: threading.Thread | None = None

    def _certificate_manager(self, ttl: timedelta) -> CertificateManager:
        """An external Istio-compatible CA when configured, else the embedded CA in process."""
        cfg = self.config
        if cfg.ca_address:
            if cfg.ca_root_cert is None:
                raise ConfigError("ca_address needs ca_root_cert: the CA's trust anchor")
            root = cfg.ca_root_cert.read_text(encoding="ascii")
            # The token file is re-read per request (the kubelet rotates projected tokens).
            client = CaClient(cfg.ca_address, root, token_file=cfg.ca_token_path,
                              cluster_id=cfg.cluster_id, ttl=ttl)
            return CertificateManager(client, registry=self.registry, trust_bundle=[root])
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

    # -- lookups -----------------------------------------------------------------------------
    @property
    def state(self) -> MeshState:
        return self.store.current

    def _workload_by_ip(self, ip: str) -> Workload | None:
        try:
            return self.state.workload_by_ip(ipaddress.ip_address(ip))
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

    def _policy_name(self, pid: int) -> str:
        return self.compiled.policy_names.get(pid, str(pid))

    def _limit_name(self, lid: int) -> str:
        return self.limits.names.get(lid, str(lid))

    # -- telemetry producers -----------------------------------------------------------------
    def _tunnel_event(self, ev: ConnectionEvent) -> None:
        if flows.reported_by_kernel(ev):
            return  # the kernel's deny event records it, with the policy and reason
        self.telemetry.emit(flows.from_tunnel(ev, self._workload_by_ip))

    def _kernel_event(self, ev: FlowEvent) -> None:
        # The tunnel reports every connection it carries (with identities, both reporters), so
        # the kernel's open/close events would count them twice; only connect-time denies,
        # which never reach the tunnel, go to telemetry.
        if ev.kind == EventKind.DENY:
            # A rate-limited deny names its ConnectionRateLimit where others name a policy.
            names = self._limit_name if ev.reason == Reason.RATE_LIMITED else self._policy_name
            self.telemetry.emit(flows.from_kernel(ev, self._workload_by_ip, names,
                                                  self._service_host))

    def request_reconcile(self) -> None:
        self._dirty.set()

    def _poll_events(self) -> None:
        while not self._stop.is_set():
            self.datapath.poll_events(200)

    # -- lifecycle ---------------------------------------------------------------------------
    def start_datapath(self) -> list[str]:
        actions = self.datapath.install()
        self.datapath.set_exclusions(self.config.exclude_ports, self.config.exclude_cidrs)
        self.datapath.open_events(self._kernel_event)
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
        am.map_fill.set_reader(
            lambda: {m: used / cap for m, (used, cap) in self.datapath.map_fill().items()}
        )
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
        self.compiled = compiled
        self.policy_updates += 1
        self.telemetry.agent_metrics.policy_update_seconds.observe(time.monotonic() - start)
        await self.enroller.reconcile(state)
        self.pending = set(self.enroller.pending)

    def _compile_and_apply(self, state: MeshState) -> CompiledPolicy:
        compiled = self.compiler.compile(state.policy_set, state.workloads)
        self.datapath.apply_policy(compiled.entries, compiled.cidrs)
        # After policy, which allocated the identities the limits are keyed by.
        limits = self.limit_compiler.compile(state.rate_limits, state.workloads)
        self.datapath.apply_rate_limits(limits.entries)
        self.limits = limits
        # After policy: a newly added endpoint is policed before connects can reach it.
        self.datapath.apply_services(compile_services(state))
        return compiled

    async def _enroll(self, w: Workload, placement: PodPlacement) -> None:
        ip = _v4(w)
        if ip is None:
            # The datapath is IPv4 only; connect6 already fails closed for enrolled pods.
            log.warning("%s has no IPv4 address: not captured (IPv4 only)", w.ref)
            return
        ident = self.identities.allocate(w.identity)
        await self.certs.get(w.identity, timeout=30)
        base, _ports = self.state.policy_set.mtls.strict_ports(w)
        mode = Mode.STRICT if base is MtlsMode.STRICT else Mode.PERMISSIVE
        await self.tunnel.add_pod(
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
        self.datapath.set_inbound_listener(ip, self.tunnel.inbound_listener(w.uid))
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
        await self.tunnel.remove_pod(uid)

    async def shutdown(self, drain: float) -> None:
        """Drain the tunnel and stop; the datapath stays pinned (fail closed while down)."""
        await self.tunnel.drain(drain)
        self._stop.set()
        if self._events_thread is not None:
            self._events_thread.join(timeout=2)
        await self.certs.close()


def _v4(w: Workload) -> ipaddress.IPv4Address | None:
    return next((ip for ip in w.ips if isinstance(ip, ipaddress.IPv4Address)), None)
