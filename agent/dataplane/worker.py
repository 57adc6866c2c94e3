"""A data-plane worker process: one event loop running a `ztunnel.tunnel.Tunnel`.

The control process (agent/dataplane/supervisor.py) owns the BPF maps, the certificate manager,
policy and telemetry; a worker holds only what its connections need, fed over the channel
(agent/dataplane/channel.py): certificates and keys of the local identities, the trust bundle,
identity ids, resolver entries and the pod list. Every worker opens its own SO_REUSEPORT
listeners in every enrolled pod's netns, so the kernel spreads connections over the workers; it
sends its connection events (batched) and counters back. It imports no metrics, Kubernetes, gRPC
or HTTP server library: a worker is small, and a flood it suffers cannot stall the control loop.

Run as `python -m agent.dataplane.worker --fd N --index I`; it exits when the channel closes
(control gone), ignores SIGTERM/SIGINT (control drains it) and dies with its parent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from agent.dataplane import channel, wire
from agent.identity import pki
from agent.identity.federation import TrustDomains
from agent.identity.spiffe import Identity
from ztunnel import hbone
from ztunnel.events import ConnectionEvent, Phase, TransportFlag
from ztunnel.pool import DEFAULT_MAX_STREAMS
from ztunnel.tunnel import Tunnel, TunnelConfig, TunnelWorkload

log = logging.getLogger(__name__)

EVENT_BATCH = 64  # events per message (each well under 1 KiB: far below channel.MAX_MESSAGE)
EVENT_QUEUE = 8192  # events waiting for the channel; beyond that they are dropped and counted
STATS_INTERVAL = 1.0
PR_SET_PDEATHSIG = 1


@dataclass
class Tables:
    """The control process's answers, as the tunnel asks for them (CertificateSource, resolver,
    identity ids). Lookups of something not sent yet fail the way the in-process ones would."""

    id_plaintext: int
    id_other: int
    certs: dict[Identity, tuple[bytes, bytes]] = field(default_factory=dict)
    roots: tuple[str, ...] = ()
    federated_pem: str = ""
    ids: dict[Identity, int] = field(default_factory=dict)
    workloads: dict[str, TunnelWorkload] = field(default_factory=dict)

    def current(self, identity: Identity) -> tuple[bytes, bytes]:
        got = self.certs.get(identity)
        if got is None:
            raise LookupError(f"no certificate for {identity} yet (the CA may be unreachable)")
        return got

    def trust_bundle_pem(self) -> bytes:
        return ("".join(self.roots) + self.federated_pem).encode()

    def resolve(self, ip: str) -> TunnelWorkload | None:
        return self.workloads.get(ip)

    def id_of(self, identity: Identity | None) -> int:
        if identity is None:
            return self.id_plaintext
        return self.ids.get(identity, self.id_other)


class Worker:
    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.tunnel: Tunnel | None = None
        self.tables: Tables | None = None
        self.trust: TrustDomains | None = None
        self.events: list[list[Any]] = []
        self.events_dropped = 0
        self.handled = 0
        self._flush: asyncio.TimerHandle | None = None
        self._inbox: asyncio.Queue[tuple[channel.Message, list[int]] | None] = asyncio.Queue()
        self.chan = channel.Channel(sock, self._received, lambda: self._inbox.put_nowait(None),
                                    lambda exc: log.error("worker %d: %s", index, exc))

    def _received(self, msg: channel.Message, fds: list[int]) -> None:
        for fd in fds:  # control never sends descriptors
            os.close(fd)
        self._inbox.put_nowait((msg, []))

    async def run(self) -> None:
        stats = asyncio.create_task(self._stats_loop())
        try:
            while True:
                item = await self._inbox.get()
                if item is None:
                    break  # control is gone: nothing may run unsupervised
                msg, _fds = item
                if await self._handle(msg):
                    break
        finally:
            stats.cancel()
            if self.tunnel is not None:
                await self.tunnel.close()
            await self._last_words()
            self.chan.close()

    async def _last_words(self, limit: float = 2.0) -> None:
        """The close events of the connections just ended and the final counters reach control
        (when it still reads) before the channel closes."""
        if self.chan.closed:
            return
        self._flush_events()
        self._send_stats()
        deadline = time.monotonic() + limit
        while self.chan.queued and not self.chan.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # -- messages ----------------------------------------------------------------------------
    async def _handle(self, msg: channel.Message) -> bool:
        """Apply one message; True when the worker is done (drained)."""
        op, rid = msg["op"], msg.get("rid")
        reply: dict[str, Any] = {"op": "reply", "rid": rid, "error": None}
        fds: list[int] = []
        try:
            if op == "init":
                self._init(msg)
                self._send_stats()  # every name is exported from the first scrape on
            elif not self._table(op, msg):
                fds = await self._tunnel_op(op, msg, reply)
        except Exception as exc:  # a bad message or a failed add: control hears why
            if rid is None:
                log.error("worker %d: %s failed: %s", self.index, op, exc)
            reply["error"] = f"{type(exc).__name__}: {exc}"
            fds = []
        if rid is not None:
            with contextlib.suppress(channel.ChannelError):
                self.chan.send(reply, fds)
        return bool(op == "drain")

    def _table(self, op: str, msg: channel.Message) -> bool:
        """Table updates (certificates, trust, ids, resolver); False: not a table op."""
        tables, _ = self._ready()
        if op == "cert":
            tables.certs[Identity.parse(msg["identity"])] = (msg["chain"].encode(),
                                                             msg["key"].encode())
        elif op == "cert_drop":
            tables.certs.pop(Identity.parse(msg["identity"]), None)
        elif op == "bundle":
            self._bundle(tables, msg)
        elif op == "ids":
            tables.ids.update({Identity.parse(k): int(v) for k, v in msg["set"].items()})
        elif op == "resolve":
            if msg.get("reset"):
                tables.workloads.clear()
            for ip in msg.get("drop", ()):
                tables.workloads.pop(ip, None)
            for ip, raw in msg.get("set", {}).items():
                tables.workloads[ip] = wire.workload_from_wire(ip, raw)
        else:
            return False
        return True

    async def _tunnel_op(self, op: str, msg: channel.Message, reply: dict[str, Any]) -> list[int]:
        """Pod and lifecycle requests; returns the descriptors to send with the reply."""
        _, tunnel = self._ready()
        if op == "pod_add":
            spec = wire.pod_from_wire(msg["pod"])
            if tunnel.pod(spec.uid) != spec:  # the same pod twice (a restart's replay): once
                await tunnel.add_pod(spec)
            return [tunnel.inbound_listener(spec.uid).fileno()]
        if op == "listener":
            return [tunnel.inbound_listener(str(msg["uid"])).fileno()]
        if op == "pod_remove":
            await tunnel.remove_pod(str(msg["uid"]))
        elif op == "pod_update":
            tunnel.update_pod(wire.pod_from_wire(msg["pod"]))
        elif op == "ping":
            pass  # the watchdog: answering is the point
        elif op == "recheck":
            reply["refused"] = tunnel.recheck_peers()
        elif op == "drain":
            await tunnel.drain(float(msg["deadline"]))
            self._flush_events()
            self._send_stats()
        else:
            raise ValueError(f"unknown op {op!r}")
        return []

    def _ready(self) -> tuple[Tables, Tunnel]:
        if self.tables is None or self.tunnel is None:
            raise RuntimeError("no init message yet")
        return self.tables, self.tunnel

    def _init(self, msg: channel.Message) -> None:
        if self.tunnel is not None:
            raise RuntimeError("init twice")
        tables = Tables(int(msg["id_plaintext"]), int(msg["id_other"]))
        trust_domain = str(msg["trust_domain"])
        if msg.get("trust"):  # federation or aliases configured: the same checks as control's
            self.trust = TrustDomains(trust_domain, lambda: tables.roots,
                                      frozenset(msg.get("aliases", ())))
        self.tables = tables
        self.tunnel = Tunnel(TunnelConfig(
            certificates=tables, resolver=tables.resolve, trust_domain=trust_domain,
            trust=self.trust, identity_id=tables.id_of, outside_mesh=msg["outside_mesh"],
            on_event=self._event, prepare_netns=False, **_tunnel_budgets(msg.get("budgets", {}))))

    def _bundle(self, tables: Tables, msg: channel.Message) -> None:
        tables.roots = tuple(msg["roots"])
        federated: dict[str, str] = msg.get("federated", {})
        tables.federated_pem = "".join(federated.values())
        if self.trust is not None:
            self.trust.federated = {td: tuple(pki.certs_from_pem(pem))
                                    for td, pem in federated.items()}

    # -- events and counters -----------------------------------------------------------------
    def _event(self, ev: ConnectionEvent) -> None:
        if ev.phase is Phase.OPEN or not ev.flags & TransportFlag.CONNECT:
            self.handled += 1  # a connection opened, or one refused (it never opens)
        if len(self.events) >= EVENT_QUEUE:
            self.events_dropped += 1
            return
        self.events.append(wire.event_to_wire(ev))
        if len(self.events) >= EVENT_BATCH:
            self._flush_events()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(0.01, self._flush_events)

    def _flush_events(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        while self.events:
            batch, self.events = self.events[:EVENT_BATCH], self.events[EVENT_BATCH:]
            try:
                self.chan.send({"op": "events", "events": batch})
            except channel.ChannelError:  # control stuck or gone: counted, never blocking
                self.events_dropped += len(batch) + len(self.events)
                self.events.clear()

    def stats(self) -> dict[str, float]:
        tunnel = self.tunnel
        out: dict[str, float] = {"events_dropped_total": self.events_dropped,
                                 "connections_handled_total": self.handled}
        if tunnel is None:
            return out
        out.update(tunnel.stats())
        return out

    def _send_stats(self) -> None:
        with contextlib.suppress(channel.ChannelError):
            self.chan.send({"op": "stats", "stats": self.stats()})

    async def _stats_loop(self) -> None:
        while True:
            self._send_stats()
            await asyncio.sleep(STATS_INTERVAL)


class _JsonLines(logging.Formatter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
               "level": record.levelname.lower(), "logger": record.name,
               "worker": self.index, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _die_with_parent() -> None:
    """SIGKILL when the control process dies, even before the channel's EOF is read."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl: nobody to serve
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nodemesh-worker")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    args = p.parse_args(argv)
    _die_with_parent()
    # Control decides when the data plane stops (drain); a signal to the process group must
    # not cut connections short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonLines(args.index) if args.log_format == "json" else
                         logging.Formatter(f"%(asctime)s worker {args.index} %(levelname)s "
                                           "%(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    sock = socket.socket(fileno=args.fd)

    async def serve() -> None:
        start = time.monotonic()
        await Worker(args.index, sock).run()
        log.info("worker %d (pid %d) stopped after %.0f s", args.index, os.getpid(),
                 time.monotonic() - start)

    asyncio.run(serve())
    return 0


def _tunnel_budgets(budgets: dict[str, Any]) -> dict[str, Any]:
    """TunnelConfig fields from the init message's budgets: the admission settings as they are,
    the HTTP/2 frame budgets into both sides' hbone.Settings."""
    out = dict(budgets)
    frames = hbone.Budgets(**out.pop("h2", {}))
    out["settings"] = hbone.Settings(budgets=frames)
    out["client_settings"] = hbone.Settings(max_concurrent_streams=DEFAULT_MAX_STREAMS,
                                            budgets=frames)
    return out


if __name__ == "__main__":
    sys.exit(main())

