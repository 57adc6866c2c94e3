"""The node tunnel, as one façade: pods, their listeners and accept loops, lifecycle (drain,
close) and the counters (`stats`). The connections themselves are served by role:

- 15001 outbound (ztunnel.outbound): the original destination comes from `original_dst(sock)`
  (SO_ORIGINAL_DST, answered by the kernel capture program); mesh destinations go over pooled
  HBONE, others pass through as plain TCP or are refused (`outside_mesh`);
- 15006 inbound plaintext (ztunnel.plaintext): the accepted socket's local address is the
  original destination; STRICT pods refuse it, PERMISSIVE pods forward it with no peer identity;
- 15008 HBONE (ztunnel.inbound): handshake admission, mTLS + HTTP/2 CONNECT server.
Upstream sockets to a pod's apps carry mark (identity id << 12) | 0x539 so the kernel's policy
program can decide on the authenticated identity; EPERM/EACCES from that connect becomes 401
(ztunnel.upstream). Every accepted connection has one ConnectionGuard (ztunnel.guard).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from agent.identity.spiffe import Identity
from ztunnel import hbone, podnet
from ztunnel.chain import Flight
from ztunnel.guard import ConnectionGuard
from ztunnel.inbound import Inbound
from ztunnel.lograte import RepeatLimiter
from ztunnel.model import (
    Counters,
    IdentityIds,
    Mode,
    OriginalDst,
    PodSpec,
    PodState,
    Resolver,
    ServiceDst,
    TunnelConfig,
    TunnelWorkload,
)
from ztunnel.outbound import Outbound
from ztunnel.plaintext import Plaintext
from ztunnel.tls import Contexts
from ztunnel.upstream import DialError, UpstreamError

__all__ = ["DialError", "IdentityIds", "Mode", "OriginalDst", "PodSpec", "Resolver",
           "ServiceDst", "Tunnel", "TunnelConfig", "TunnelWorkload", "UpstreamError"]

log = logging.getLogger(__name__)
# Refusals are logged once each but an attacker controls how many there are: bounded.
log.addFilter(RepeatLimiter.shared())

ACCEPT_BURST = 32  # connections accepted per readiness callback
ACCEPT_RETRY = 0.1  # seconds a listener rests after a failed accept (EMFILE, ENOBUFS)

# Starts serving an accepted connection; what must wait is returned as a coroutine for a Task.
Handler = Callable[[PodState, socket.socket, tuple[str, int], ConnectionGuard],
                   Coroutine[Any, Any, None] | None]


class Tunnel:
    def __init__(self, config: TunnelConfig) -> None:
        self.config = config
        self.contexts = Contexts(config.certificates)
        self.counters = Counters()
        self._pods: dict[str, PodState] = {}
        self._by_ip: dict[str, PodState] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._flights: set[Flight] = set()  # connections served by callbacks (ztunnel.chain)
        self.draining = False
        self.outbound = Outbound(config, self.contexts, self._by_ip.get, self._upstream_connect,
                                 track=self._track, spawn=self._spawn)
        self.pool = self.outbound.pool
        self.inbound = Inbound(config, self.contexts, self.counters, track=self._track,
                               draining=lambda: self.draining, check=self._upstream_check)
        self.plaintext = Plaintext(config, self.counters, self._upstream_connect)

    def stats(self) -> dict[str, float]:
        """Flat named counters and gauges: the pool's and every budget trip (summed over
        worker processes for metrics)."""
        self.counters.handshakes_pending = self.inbound.admission.pending
        out = self.counters.flat("tunnel_")
        out.update(self.pool.stats())
        out.update(hbone.budget_trips())  # frame-level budgets (process-wide: one tunnel each)
        return out

    def _upstream_check(self, spec: PodSpec, peer: Identity | None, target: tuple[str, int],
                        mark: int) -> None:
        """Before every upstream connect (ztunnel.upstream.UpstreamCheck): nothing here, the
        kernel's policy program decides in connect(); tests stand in for it by overriding."""

    async def _upstream_connect(self, spec: PodSpec, peer: Identity | None,
                                sock: socket.socket, target: tuple[str, int], mark: int) -> None:
        """connect() of a marked upstream socket: the kernel's policy program decides here
        (EPERM/EACCES raise PermissionError). `spec`, `peer` and `mark` say who is connecting."""
        self._upstream_check(spec, peer, target, mark)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.config.connect_timeout):  # no extra Task per connect
            await loop.sock_connect(sock, target)

    # -- pods --------------------------------------------------------------------------------
    async def add_pod(self, spec: PodSpec) -> None:
        """Open the pod's three listeners inside its netns; other pods are not touched."""
        if spec.uid in self._pods:
            raise ValueError(f"pod {spec.uid} is already enrolled")
        if self.draining:
            raise RuntimeError("tunnel is draining: not enrolling new pods")
        # pyroute2 runs its own event loop, so netlink work goes to a worker thread.
        if self.config.prepare_netns:
            await asyncio.to_thread(podnet.prepare_pod_netns, spec.netns)
        pod = PodState(spec)
        cfg = self.config
        try:
            handlers: tuple[tuple[str, int, Handler], ...] = (
                (cfg.outbound_bind, cfg.outbound_port, self.outbound.start),
                ("0.0.0.0", cfg.inbound_port, self.plaintext.handle),
                ("0.0.0.0", cfg.hbone_port, self.inbound.handle),
            )
            loop = asyncio.get_running_loop()
            for ip, port, handler in handlers:
                lsock = podnet.listener(spec.netns, ip, port)
                pod.listeners.append(lsock)
                pod.by_port[port] = lsock
                # A standing reader callback, not a sock_accept loop: no future, Task wake-up or
                # epoll add/remove per accepted connection.
                loop.add_reader(lsock, self._accept_ready, pod, lsock, handler)
        except BaseException:
            self._close_listeners(pod)
            podnet.forget_netns(spec.netns)
            raise
        self._pods[spec.uid] = pod
        self._by_ip[spec.ip] = pod
        log.info("pod %s (%s, %s) enrolled: listeners %d/%d/%d in netns %s", spec.name or spec.uid,
                 spec.ip, spec.identity, cfg.outbound_port, cfg.inbound_port, cfg.hbone_port,
                 spec.netns)

    async def remove_pod(self, uid: str) -> None:
        pod = self._pods.pop(uid, None)
        if pod is None:
            return
        self._by_ip.pop(pod.spec.ip, None)
        self._close_listeners(pod)
        podnet.forget_netns(pod.spec.netns)
        for s in list(pod.sessions):
            s.close()
        log.info("pod %s removed: listeners closed", pod.spec.name or uid)

    def recheck_peers(self) -> int:
        """The trust changed (a bundle removed): re-verify every open HBONE connection's peer
        and send GOAWAY on those no longer trusted (streams open on them finish; new ones need
        a new handshake). Returns how many were refused."""
        sessions = [s for pod in self._pods.values() for s in pod.sessions]
        refused = 0
        for s in [*sessions, *self.pool.connections()]:
            if s.peer is not None and s.recheck() is not None:
                s.goaway()
                refused += 1
        return refused

    def update_pod(self, spec: PodSpec) -> bool:
        """Apply a running pod's new mode or name to connections accepted from now on.

        Listeners, pooled sessions and established connections are left alone (each holds the
        spec it was accepted under). What the pod's enrollment rests on (netns, IP, identity)
        cannot change this way: that is a new pod. True when something changed.
        """
        pod = self._pods.get(spec.uid)
        if pod is None:
            raise KeyError(f"pod {spec.uid} is not enrolled")
        old = pod.spec
        if (old.netns, old.ip, old.identity) != (spec.netns, spec.ip, spec.identity):
            raise ValueError(f"pod {spec.uid}: netns, IP or identity changed; enroll it again")
        if old == spec:
            return False
        pod.spec = spec
        if old.mode is not spec.mode:
            log.info("pod %s: plaintext now %s", spec.name or spec.uid,
                     "refused (STRICT)" if spec.mode is Mode.STRICT else "accepted (PERMISSIVE)")
        return True

    def inbound_listener(self, uid: str) -> socket.socket:
        """The pod's 15006 listener: the kernel's sk_lookup program steers plaintext to it."""
        pod = self._pods.get(uid)
        sock = pod.by_port.get(self.config.inbound_port) if pod else None
        if sock is None:
            raise KeyError(f"pod {uid} is not enrolled (or is draining): no inbound listener")
        return sock

    def listening(self, uid: str) -> bool:
        """Whether the pod's listeners are open (False once removed or draining)."""
        pod = self._pods.get(uid)
        return bool(pod and pod.listeners)

    def pod(self, uid: str) -> PodSpec | None:
        pod = self._pods.get(uid)
        return pod.spec if pod is not None else None

    @property
    def pods(self) -> list[PodSpec]:
        return [p.spec for p in self._pods.values()]

    # -- lifecycle ---------------------------------------------------------------------------
    async def drain(self, deadline: float) -> None:
        """Stop accepting, let open connections finish for up to `deadline` seconds, then close."""
        self.draining = True
        for pod in self._pods.values():
            self._close_listeners(pod)
            for s in list(pod.sessions):
                s.goaway()  # peers stop opening streams here; open ones finish
        pending: set[asyncio.Future[None]] = {t for t in self._tasks if not t.done()}
        pending |= {f.done for f in self._flights}
        if pending:
            log.info("draining: waiting up to %.1fs for %d connections", deadline, len(pending))
            _, pending = await asyncio.wait(pending, timeout=deadline)
        if pending:
            log.warning("drain deadline passed: closing %d connections still open", len(pending))
        await self.close()

    async def close(self) -> None:
        RepeatLimiter.shared().flush()  # say what a flood suppressed before going away
        self.draining = True
        for pod in list(self._pods.values()):
            self._close_listeners(pod)
            podnet.forget_netns(pod.spec.netns)
            for s in list(pod.sessions):
                s.close()
        self._pods.clear()
        self._by_ip.clear()
        for f in list(self._flights):
            f.cancel()
        self.pool.close_all()
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- accept ------------------------------------------------------------------------------
    def _close_listeners(self, pod: PodState) -> None:
        loop = asyncio.get_running_loop()
        for s in pod.listeners:
            loop.remove_reader(s)  # before close: the fd number may be reused at once
            s.close()
        pod.listeners.clear()
        pod.by_port.clear()

    def _track(self, flight: Flight) -> None:
        self._flights.add(flight)
        flight.done.add_done_callback(lambda _: self._flights.discard(flight))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _accept_ready(self, pod: PodState, lsock: socket.socket, handler: Handler) -> None:
        """The listener is readable: accept what is queued (a bounded burst, so one flooded
        listener cannot starve the loop) and start a handler Task for each connection."""
        for _ in range(ACCEPT_BURST):
            try:
                conn, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if lsock.fileno() < 0:
                    return  # listener closed (pod removed or draining)
                log.warning("accept on %s in pod %s failed: %s", lsock.getsockname(),
                            pod.spec.name, exc)
                # Out of descriptors or the like: pause this listener instead of spinning.
                loop = asyncio.get_running_loop()
                loop.remove_reader(lsock)
                loop.call_later(ACCEPT_RETRY, self._resume_accept, pod, lsock, handler)
                return
            conn.setblocking(False)
            # Small writes (HTTP/2 frames, CONNECT replies) must not wait for delayed ACKs, and
            # asyncio skips TCP_NODELAY for accepted sockets (their proto is 0). Not repeated:
            # the mark (an accepted socket inherits the listener's TUNNEL_MARK;
            # tests/e2e/test_tunnel_abuse.py checks it).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            guard = ConnectionGuard(self.config, conn)
            try:
                # A handler serves what it can from here by callbacks; the rest is a Task.
                rest = handler(pod, conn, addr, guard)
            except Exception as exc:
                guard.failed(exc)
                continue
            if rest is not None:
                self._spawn(guard.run(rest))

    def _resume_accept(self, pod: PodState, lsock: socket.socket, handler: Handler) -> None:
        if lsock in pod.listeners and lsock.fileno() >= 0:  # not closed meanwhile
            asyncio.get_running_loop().add_reader(lsock, self._accept_ready, pod, lsock, handler)
