"""The control side of the data plane: N worker processes (agent/dataplane/worker.py).

The supervisor keeps what every worker must know (init settings, certificates, trust bundle,
identity ids, resolver entries, the pod list) and replays it to a worker that (re)starts. It
offers the tunnel façade the node agent drives: add_pod/remove_pod/update_pod/recheck_peers/
drain, each applied by every live worker. A worker that dies is logged once, counted, and
restarted with backoff; its connections fail with it (their sockets close: the peers see a
reset or EOF). Counters are summed over workers; those of a dead worker are kept (counters
named `*_total` and the pool counters), its gauges go with it.

sk_lookup's nm_inbound_v1 holds one listener per pod; the kernel's SO_REUSEPORT selection then
spreads over every worker's listener of that group. The supervisor inserts one worker's 15006
listener through `set_inbound` and closes its own copy at once (a descriptor held here would be
a listener nobody accepts on, still picked by the kernel). When that worker dies its socket
leaves the map, and a live worker's listener is put there instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.backoff import Backoff, Retries
from agent.dataplane import channel, wire
from agent.identity.spiffe import Identity
from ztunnel.events import ConnectionEvent
from ztunnel.model import (
    DEFAULT_MAX_PENDING_HANDSHAKES,
    DEFAULT_MAX_PENDING_HANDSHAKES_PER_IP,
    DEFAULT_MAX_UPSTREAM_CONNECTS_PER_CONNECTION,
    DEFAULT_PREWARM_DESTINATIONS,
)
from ztunnel.pool import DEFAULT_PREWARM_TTL
from ztunnel.tunnel import PodSpec, TunnelWorkload

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0
# The watchdog asks every worker to answer this often; one silent for WATCHDOG_TIMEOUT is stuck
# (SIGSTOPped, or a loop that never yields: a bug) and is killed, then restarted like a dead one.
# Its connections are stalled anyway, and while it lives every new pod's enrollment waits for it.
WATCHDOG_INTERVAL = 5.0
WATCHDOG_TIMEOUT = 15.0
RESOLVE_CHUNK = 500  # resolver entries per message (each ~100 bytes)
# Tunnel.stats() names that are gauges; every other name is a counter, kept over restarts.
GAUGES = frozenset({"tunnel_handshakes_pending", "pool_connections", "pool_prewarm_destinations"})
RESTART_BACKOFF = Backoff(initial=0.1, factor=2.0, jitter=0.2, cap=10.0)
STABLE_AFTER = 30.0  # a worker that lived this long resets the restart backoff

SetInbound = Callable[[PodSpec, socket.socket], None]
EventSink = Callable[[ConnectionEvent], None]


class WorkerError(RuntimeError):
    """A worker refused or could not apply a request."""


# A request that failed because its worker died, is stuck, or refused it.
_GONE = (WorkerError, channel.ChannelError, TimeoutError)


def is_counter(name: str) -> bool:
    return name not in GAUGES


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    chan: channel.Channel
    started: float = field(default_factory=time.monotonic)
    rid: int = 0
    pending: dict[int, asyncio.Future[tuple[channel.Message, list[int]]]] = field(
        default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    # Has every enrolled pod's listeners: false for a restarted worker until they are restored.
    restored: bool = True

    @property
    def alive(self) -> bool:
        return not self.closed.is_set()


@dataclass(frozen=True)
class TunnelBudgets:
    """The tunnel's admission budgets and pre-warming (TunnelConfig fields of the same names)."""

    max_pending_handshakes: int = DEFAULT_MAX_PENDING_HANDSHAKES
    max_pending_handshakes_per_ip: int = DEFAULT_MAX_PENDING_HANDSHAKES_PER_IP
    max_upstream_connects_per_connection: int = DEFAULT_MAX_UPSTREAM_CONNECTS_PER_CONNECTION
    prewarm_destinations: int = DEFAULT_PREWARM_DESTINATIONS
    prewarm_ttl: float = DEFAULT_PREWARM_TTL
    # HTTP/2 frame budgets per connection: ztunnel.hbone.Budgets fields (defaults when absent).
    h2: Mapping[str, int] = field(default_factory=dict)

    def per_worker(self, workers: int) -> dict[str, Any]:
        """What one of `workers` workers gets: the handshake caps are per node, so each worker
        admits its share (rounded up); the other settings apply to each worker as they are."""
        out: dict[str, Any] = dataclasses.asdict(self)
        out["h2"] = dict(self.h2)
        for name in ("max_pending_handshakes", "max_pending_handshakes_per_ip"):
            out[name] = max(1, -(-int(out[name]) // workers))
        return out


@dataclass(frozen=True)
class InitSettings:
    trust_domain: str
    outside_mesh: str
    id_plaintext: int
    id_other: int
    trust: bool = False  # federation or aliases configured
    aliases: tuple[str, ...] = ()
    budgets: TunnelBudgets = field(default_factory=TunnelBudgets)


class Supervisor:
    def __init__(self, count: int, init: InitSettings, on_event: EventSink,
                 set_inbound: SetInbound, *, log_format: str = "json",
                 backoff: Backoff = RESTART_BACKOFF,
                 watchdog: tuple[float, float] = (WATCHDOG_INTERVAL, WATCHDOG_TIMEOUT)) -> None:
        if count < 1:
            raise ValueError(f"workers: want at least 1, got {count}")
        self.count = count
        self.init = init
        self.on_event = on_event
        self.set_inbound = set_inbound
        self.log_format = log_format
        self.retries = Retries(backoff)
        self.workers: list[_Worker | None] = [None] * count
        self.restarts = 0
        self.watchdog_interval, self.watchdog_timeout = watchdog
        self.watchdog_kills = 0
        self.handled: dict[int, float] = dict.fromkeys(range(count), 0.0)
        self.events_received = 0
        self.channel_errors = 0
        self._retired: dict[str, float] = {}
        self._handled_base: dict[int, float] = {}  # per worker slot: survives its restarts
        # What a (re)started worker is told, in this order.
        self._certs: dict[Identity, tuple[str, str]] = {}
        self._bundle: tuple[tuple[str, ...], dict[str, str]] = ((), {})
        self._ids: dict[Identity, int] = {}
        self._resolver: dict[str, list[Any]] = {}
        self._pods: dict[str, PodSpec] = {}
        self._inbound_owner: dict[str, int] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self.stopping = False

    # -- process lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        for i in range(self.count):
            self._spawn(i)
        task = asyncio.create_task(self._watchdog(), name="worker-watchdog")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watchdog(self) -> None:
        """Kill a worker that does not answer a ping within the timeout (not while stopping: a
        draining worker answers only when its drain is done)."""
        while not self.stopping:
            await asyncio.sleep(self.watchdog_interval)
            live = self._live()
            answers = await asyncio.gather(
                *(self._request(w, {"op": "ping"}, self.watchdog_timeout) for w in live),
                return_exceptions=True)
            for w, answer in zip(live, answers, strict=True):
                if not isinstance(answer, TimeoutError) or self.stopping or not w.alive:
                    continue
                self.watchdog_kills += 1
                log.error("data-plane worker %d (pid %d) did not answer for %.0f s: killing it",
                          w.index, w.proc.pid, self.watchdog_timeout)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()

    def _spawn(self, index: int) -> _Worker:
        ours, theirs = channel.pair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.dataplane.worker", "--fd", str(theirs.fileno()),
                 "--index", str(index), "--log-format", self.log_format],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker: _Worker

        def on_message(msg: channel.Message, fds: list[int]) -> None:
            self._received(worker, msg, fds)

        def on_error(exc: channel.ChannelError) -> None:
            self.channel_errors += 1
            log.error("worker %d: %s", index, exc)

        closed = asyncio.Event()
        chan = channel.Channel(ours, on_message, closed.set, on_error)
        worker = _Worker(index, proc, chan, closed=closed)
        self.workers[index] = worker
        self._replay(worker)
        task = asyncio.create_task(self._watch(worker), name=f"worker-{index}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        log.info("data-plane worker %d started (pid %d)", index, proc.pid)
        return worker

    def _replay(self, w: _Worker) -> None:
        """Everything a new worker needs before its first pod (messages are ordered)."""
        i = self.init
        w.chan.send({"op": "init", "trust_domain": i.trust_domain, "outside_mesh": i.outside_mesh,
                     "id_plaintext": i.id_plaintext, "id_other": i.id_other, "trust": i.trust,
                     "aliases": list(i.aliases),
                     "budgets": i.budgets.per_worker(self.count)})
        roots, federated = self._bundle
        w.chan.send({"op": "bundle", "roots": list(roots), "federated": federated})
        for ident, (chain, key) in self._certs.items():
            w.chan.send({"op": "cert", "identity": ident.uri, "chain": chain, "key": key})
        ids = {k.uri: v for k, v in self._ids.items()}
        for part in _chunks(ids, RESOLVE_CHUNK):
            w.chan.send({"op": "ids", "set": part})
        w.chan.send({"op": "resolve", "reset": True})
        for part in _chunks(self._resolver, RESOLVE_CHUNK):
            w.chan.send({"op": "resolve", "set": part})

    async def _watch(self, w: _Worker) -> None:
        """Wait for the worker's end; unless stopping, log it once, fail its requests, move the
        inbound listeners it served, and start a new one after a backoff."""
        await w.closed.wait()
        w.chan.close()
        code = await asyncio.to_thread(_reap, w.proc)
        for fut in w.pending.values():
            if not fut.done():
                fut.set_exception(WorkerError(f"worker {w.index} exited"))
        w.pending.clear()
        for k, v in w.stats.items():
            if is_counter(k):
                self._retired[k] = self._retired.get(k, 0.0) + v
        w.stats = {}
        self._handled_base[w.index] = self.handled[w.index]
        if self.stopping:
            return
        self.restarts += 1
        lived = time.monotonic() - w.started
        if lived >= STABLE_AFTER:
            self.retries.reset()
        delay = self.retries.next_delay()
        log.error("data-plane worker %d (pid %d) exited (%s) after %.0f s: its connections "
                  "failed; restarting it in %.1f s", w.index, w.proc.pid, _exit_text(code), lived,
                  delay)
        await self._move_inbound(w.index)
        await asyncio.sleep(delay)
        if self.stopping:
            return
        fresh = self._spawn(w.index)
        fresh.restored = False
        for spec in list(self._pods.values()):
            try:
                await self._add_on(fresh, spec)
            except _GONE as exc:
                log.error("worker %d: pod %s not restored: %s", w.index, spec.name or spec.uid,
                          exc)
        fresh.restored = True

    async def _move_inbound(self, dead: int) -> None:
        for uid, owner in list(self._inbound_owner.items()):
            if owner != dead or uid not in self._pods:
                continue
            del self._inbound_owner[uid]
            for w in self._live():
                try:
                    _msg, fds = await self._request(w, {"op": "listener", "uid": uid})
                except _GONE:
                    continue
                self._insert(w.index, self._pods[uid], fds)
                break

    def _live(self) -> list[_Worker]:
        return [w for w in self.workers if w is not None and w.alive]

    # -- messages ----------------------------------------------------------------------------
    def _received(self, w: _Worker, msg: channel.Message, fds: list[int]) -> None:
        op = msg["op"]
        if op == "reply":
            fut = w.pending.pop(msg.get("rid", -1), None)
            if fut is None or fut.done():
                _close(fds)
                return
            if msg.get("error"):
                _close(fds)
                fut.set_exception(WorkerError(f"worker {w.index}: {msg['error']}"))
            else:
                fut.set_result((msg, fds))
            return
        _close(fds)
        if op == "events":
            for raw in msg.get("events", ()):
                try:
                    ev = wire.event_from_wire(raw)
                except ValueError as exc:
                    self.channel_errors += 1
                    log.error("worker %d: %s", w.index, exc)
                    continue
                self.events_received += 1
                self.on_event(ev)
        elif op == "stats":
            raw = msg.get("stats", {})
            w.stats = {str(k): float(v) for k, v in raw.items() if isinstance(v, int | float)}
            self.handled[w.index] = self._handled_base.get(w.index, 0.0) + w.stats.get(
                "connections_handled_total", 0.0)
        else:
            self.channel_errors += 1
            log.error("worker %d sent an unknown message %r", w.index, op)

    async def _request(self, w: _Worker, msg: dict[str, Any],
                       timeout: float = REQUEST_TIMEOUT) -> tuple[channel.Message, list[int]]:
        w.rid += 1
        fut: asyncio.Future[tuple[channel.Message, list[int]]] = (
            asyncio.get_running_loop().create_future())
        w.pending[w.rid] = fut
        try:
            w.chan.send({**msg, "rid": w.rid})
        except channel.ChannelError:
            w.pending.pop(w.rid, None)
            raise
        return await asyncio.wait_for(fut, timeout)

    def _broadcast(self, msg: dict[str, Any]) -> None:
        for w in self._live():
            try:
                w.chan.send(msg)
            except channel.ChannelFull:
                # Stuck (stopped, or a loop that never yields): a new one gets the full state.
                log.error("worker %d (pid %d) stopped reading its channel: killing it",
                          w.index, w.proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
            except channel.ChannelError:
                pass  # exiting: its watcher restarts it with the full state

    async def _all(self, msg: dict[str, Any]) -> list[tuple[channel.Message, list[int]]]:
        """One request to every live worker; raises the first failure after all answered."""
        live = self._live()
        results = await asyncio.gather(*(self._request(w, msg) for w in live),
                                       return_exceptions=True)
        ok: list[tuple[channel.Message, list[int]]] = []
        error: BaseException | None = None
        for r in results:
            if isinstance(r, BaseException):
                error = error or r
            else:
                ok.append(r)
        if error is not None:
            for _msg, fds in ok:
                _close(fds)
            raise error
        return ok

    # -- state fed to workers ----------------------------------------------------------------
    def set_certificate(self, identity: Identity, chain: str, key: str) -> None:
        if self._certs.get(identity) == (chain, key):
            return
        self._certs[identity] = (chain, key)
        self._broadcast({"op": "cert", "identity": identity.uri, "chain": chain, "key": key})

    def drop_certificate(self, identity: Identity) -> None:
        if self._certs.pop(identity, None) is not None:
            self._broadcast({"op": "cert_drop", "identity": identity.uri})

    def set_trust(self, roots: tuple[str, ...], federated: Mapping[str, str]) -> bool:
        """The trust bundle and federated domains' PEMs; True if they changed."""
        new = (tuple(roots), dict(federated))
        if new == self._bundle:
            return False
        self._bundle = new
        self._broadcast({"op": "bundle", "roots": list(new[0]), "federated": new[1]})
        return True

    def set_identity_ids(self, ids: Mapping[Identity, int]) -> None:
        changed = {k.uri: v for k, v in ids.items() if self._ids.get(k) != v}
        if not changed:
            return
        self._ids.update(ids)
        for part in _chunks(changed, RESOLVE_CHUNK):
            self._broadcast({"op": "ids", "set": part})

    def set_resolver(self, table: Mapping[str, TunnelWorkload]) -> None:
        new = {ip: wire.workload_to_wire(wl) for ip, wl in table.items()}
        drop = [ip for ip in self._resolver if ip not in new]
        changed = {ip: v for ip, v in new.items() if self._resolver.get(ip) != v}
        self._resolver = new
        if drop:
            self._broadcast({"op": "resolve", "drop": drop})
        for part in _chunks(changed, RESOLVE_CHUNK):
            self._broadcast({"op": "resolve", "set": part})

    # -- the tunnel façade -------------------------------------------------------------------
    async def add_pod(self, spec: PodSpec) -> None:
        """Listeners for the pod in every live worker, one of them inserted through set_inbound.
        On any worker's failure the pod is removed from the others and the error raised."""
        if spec.uid in self._pods:
            raise ValueError(f"pod {spec.uid} is already enrolled")
        if self.stopping:
            raise RuntimeError("data plane is draining: not enrolling new pods")
        self._pods[spec.uid] = spec  # a worker restarting meanwhile adds it too
        msg = {"op": "pod_add", "pod": wire.pod_to_wire(spec)}
        live = self._live()
        results = await asyncio.gather(*(self._request(w, msg) for w in live),
                                       return_exceptions=True)
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is not None or not live:
            for r in results:
                if not isinstance(r, BaseException):
                    _close(r[1])
            self._pods.pop(spec.uid, None)
            with contextlib.suppress(*_GONE):
                await self._all({"op": "pod_remove", "uid": spec.uid})
            raise error if error is not None else WorkerError("no live data-plane worker")
        replies = [r for r in results if not isinstance(r, BaseException)]
        chosen = next((i for i, w in enumerate(live) if w.alive), 0)
        for i, (_msg, fds) in enumerate(replies):
            if i != chosen:
                _close(fds)
        self._insert(live[chosen].index, spec, replies[chosen][1])

    async def _add_on(self, w: _Worker, spec: PodSpec) -> None:
        """A restarted worker's listeners for a pod; its fd goes into the map if none is."""
        _msg, fds = await self._request(w, {"op": "pod_add", "pod": wire.pod_to_wire(spec)})
        if spec.uid in self._pods and spec.uid not in self._inbound_owner:
            self._insert(w.index, self._pods[spec.uid], fds)
        else:
            _close(fds)

    def _insert(self, index: int, spec: PodSpec, fds: list[int]) -> None:
        if len(fds) != 1:
            _close(fds)
            raise WorkerError(f"worker {index} sent {len(fds)} descriptors for a listener")
        sock = socket.socket(fileno=fds[0])
        try:
            self.set_inbound(spec, sock)
            self._inbound_owner[spec.uid] = index
        finally:
            sock.close()  # never keep a listener no one here accepts on

    async def remove_pod(self, uid: str) -> None:
        if self._pods.pop(uid, None) is None:
            return
        self._inbound_owner.pop(uid, None)
        with contextlib.suppress(*_GONE):
            await self._all({"op": "pod_remove", "uid": uid})

    def update_pod(self, spec: PodSpec) -> bool:
        old = self._pods.get(spec.uid)
        if old is None:
            raise KeyError(f"pod {spec.uid} is not enrolled")
        if (old.netns, old.ip, old.identity) != (spec.netns, spec.ip, spec.identity):
            raise ValueError(f"pod {spec.uid}: netns, IP or identity changed; enroll it again")
        if old == spec:
            return False
        self._pods[spec.uid] = spec
        self._broadcast({"op": "pod_update", "pod": wire.pod_to_wire(spec)})
        return True

    def pod(self, uid: str) -> PodSpec | None:
        return self._pods.get(uid)

    @property
    def pods(self) -> list[PodSpec]:
        return list(self._pods.values())

    async def recheck_peers(self) -> int:
        replies = await self._all({"op": "recheck"})
        return sum(int(m.get("refused", 0)) for m, _ in replies)

    async def drain(self, deadline: float) -> None:
        """Every worker drains (stops accepting, lets connections finish for up to `deadline`
        seconds) and exits; one that does not in time is killed."""
        self.stopping = True
        live = self._live()
        for w in live:
            with contextlib.suppress(channel.ChannelError):
                w.chan.send({"op": "drain", "deadline": deadline})
        waits = [asyncio.to_thread(_reap, w.proc, deadline + 5.0) for w in live]
        await asyncio.gather(*waits)
        await self.close()

    async def close(self) -> None:
        self.stopping = True
        for w in self.workers:
            if w is None:
                continue
            if w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
            await asyncio.to_thread(_reap, w.proc)
            w.chan.close()
        for t in list(self._watchers):
            t.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    # -- counters ----------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Counters summed over workers, dead ones' included; gauges of the live ones."""
        out = dict(self._retired)
        for w in self._live():
            for k, v in w.stats.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def pids(self) -> dict[int, int]:
        return {w.index: w.proc.pid for w in self._live()}

    def unserving(self) -> str | None:
        """Why no worker can carry traffic now (readiness), or None: every worker dead (a crash
        loop, or all waiting out their restart backoff) or still getting its pods back leaves
        the captured ports without a listener, so enrolled pods' connections are refused until
        one is back."""
        if self.stopping or any(w.restored for w in self._live()):
            return None
        return (f"no data-plane worker running with its pods ({self.count} configured, "
                f"{self.restarts} restarts so far): connections to and from enrolled pods are "
                "refused until one is back")


def _chunks(table: Mapping[str, Any], size: int) -> list[dict[str, Any]]:
    items = list(table.items())
    return [dict(items[i:i + size]) for i in range(0, len(items), size)]


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _reap(proc: subprocess.Popen[bytes], timeout: float | None = None) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return proc.wait()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
