"""Test harness: a test-bed cluster with one ztunnel Tunnel per node, run on an event loop in a
background thread of the test process (the tunnels' sockets live in the pods' netns via setns).

Outbound capture is stood in for by a test-supplied original-destination function keyed the way
the kernel program keys it: by the accepted socket's netns cookie (which pod it came from).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from agent.identity.spiffe import Identity
from agent.testbed import Cluster
from agent.testbed.cluster import Pod, PodProcess
from support.testca import TestCA
from ztunnel.events import ConnectionEvent
from ztunnel.tunnel import Mode, PodSpec, Tunnel, TunnelConfig, TunnelWorkload

T = TypeVar("T")
APPS = str(Path(__file__).with_name("apps.py"))
SO_NETNS_COOKIE = 71


class LoopThread:
    """An asyncio loop in a daemon thread; `run` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tunnel-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrap() -> T:
            return fn()
        return self.run(wrap())

    def stop(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        try:
            self.run(shutdown(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def netns_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


@dataclass
class Mesh:
    cluster: Cluster
    ca: TestCA
    loop: LoopThread
    tunnels: list[Tunnel] = field(default_factory=list)
    specs: dict[str, PodSpec] = field(default_factory=dict)  # by pod name
    events: list[ConnectionEvent] = field(default_factory=list)
    routes: dict[int, tuple[str, int]] = field(default_factory=dict)  # netns cookie -> orig dst
    inbound_routes: dict[int, int] = field(default_factory=dict)  # netns cookie -> real port
    identity_ids: dict[Identity, int] = field(default_factory=dict)
    workloads: dict[str, TunnelWorkload] = field(default_factory=dict)  # by IP

    def identity(self, pod: Pod) -> Identity:
        return self.specs[pod.name].identity

    def route(self, src: Pod, dst_ip: str, port: int) -> None:
        """What SO_ORIGINAL_DST answers for connections from `src` to 127.0.0.1:15001."""
        self.routes[src.cookie()] = (dst_ip, port)

    def wait_until(self, cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Poll a condition evaluated on the tunnel loop (events arrive asynchronously)."""
        end = time.monotonic() + timeout
        while not self.loop.call(cond):
            assert time.monotonic() < end, f"gave up waiting for {what}"
            time.sleep(0.02)

    def closed_events(self, direction: Any) -> list[ConnectionEvent]:
        return [e for e in self.events if e.phase == "close" and e.direction is direction]

    def tunnel_of(self, pod: Pod) -> Tunnel:
        return self.tunnels[pod.node_index]

    def start_server(self, pod: Pod, port: int, size: int) -> PodProcess:
        proc = pod.spawn([sys.executable, APPS, "server", str(port), str(size)],
                         stdout=subprocess.PIPE)
        assert proc.popen is not None and proc.popen.stdout is not None
        line = proc.popen.stdout.readline().strip()
        assert line == b"ready", f"server in {pod.name} did not start: {line!r}"
        return proc

    def run_clients(self, pod: Pod, host: str, port: int, size: int, n: int, *,
                    timeout: float = 120) -> dict[str, Any]:
        proc = pod.spawn([sys.executable, APPS, "client", host, str(port), str(size), str(n)],
                         stdout=subprocess.PIPE)
        assert proc.popen is not None
        out, _ = proc.popen.communicate(timeout=timeout)
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result


def read_peers(server: PodProcess, n: int) -> list[tuple[str, int]]:
    """The next n (client address, inherited mark) lines the server app printed."""
    assert server.popen is not None and server.popen.stdout is not None
    out = []
    for _ in range(n):
        parts = server.popen.stdout.readline().decode().split()
        assert parts and parts[0] == "peer", f"unexpected server output {parts!r}"
        out.append((parts[1], int(parts[3])))
    return out


def unread_output(proc: PodProcess) -> bytes:
    """Stop the process and return what it printed that nobody read yet."""
    assert proc.popen is not None and proc.popen.stdout is not None
    proc.popen.terminate()
    out, _ = proc.popen.communicate(timeout=10)
    return out


class Capture:
    """A raw packet capture on a node's eth0 (a process in the node's netns)."""

    def __init__(self, place: Any, iface: str = "eth0") -> None:
        self.proc = place.spawn([sys.executable, APPS, "capture", iface],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.popen is not None and self.proc.popen.stdout is not None
        assert self.proc.popen.stdout.readline().strip() == b"ready"

    def finish(self) -> dict[str, int]:
        assert self.proc.popen is not None
        out, _ = self.proc.popen.communicate(input=b"stop\n", timeout=30)
        counts: dict[str, int] = json.loads(out.decode().strip().splitlines()[-1])
        return counts


def _original_dst_from(routes: dict[int, tuple[str, int]]) -> Callable[[socket.socket], Any]:
    def lookup(sock: socket.socket) -> tuple[ipaddress.IPv4Address, int]:
        cookie = netns_cookie(sock)
        if cookie not in routes:
            raise OSError(2, "no original destination recorded for this pod")
        ip, port = routes[cookie]
        return ipaddress.IPv4Address(ip), port
    return lookup


def _inbound_dst_from(routes: dict[int, int]) -> Callable[[socket.socket], Any]:
    def lookup(sock: socket.socket) -> tuple[ipaddress.IPv4Address, int]:
        ip, port = sock.getsockname()[:2]
        # sk_lookup would have delivered the connection with its real port as the local address.
        return ipaddress.IPv4Address(ip), routes.get(netns_cookie(sock), port)
    return lookup


# Called right before an upstream connect, where the kernel's policy program would run; raising
# PermissionError is handled exactly like EPERM from connect(). Stands in for the kernel in
# tests that run the tunnel without the datapath.
UpstreamGate = Callable[[PodSpec, Identity | None, tuple[str, int], int], None]


class GatedTunnel(Tunnel):
    """A Tunnel whose upstream connects pass `gate` first (the testing seam for policy)."""

    def __init__(self, config: TunnelConfig, gate: UpstreamGate) -> None:
        super().__init__(config)
        self.gate = gate

    def _upstream_check(self, spec: PodSpec, peer: Identity | None, target: tuple[str, int],
                        mark: int) -> None:
        self.gate(spec, peer, target, mark)


def _tunnel(cfg: TunnelConfig, gate: UpstreamGate | None) -> Tunnel:
    return Tunnel(cfg) if gate is None else GatedTunnel(cfg, gate)


@contextmanager
def mesh(cluster: Cluster, mode: Mode = Mode.STRICT, enroll: bool = True,
         upstream_gate: UpstreamGate | None = None, **config: Any) -> Iterator[Mesh]:
    """Tunnels for every node of `cluster`, pods enrolled with identity sa=<pod name>;
    `upstream_gate` stands in for the kernel's policy on upstream connects."""
    m = Mesh(cluster=cluster, ca=TestCA(), loop=LoopThread())
    try:
        for i, pod in enumerate(cluster.pods, start=1):
            ident = Identity("cluster.local", "default", pod.name)
            m.specs[pod.name] = PodSpec(uid=pod.name, netns=pod.netns, ip=str(pod.ip),
                                        identity=ident, name=pod.name, mode=mode)
            m.workloads[str(pod.ip)] = TunnelWorkload(str(pod.ip), ident, pod.name)
            m.identity_ids[ident] = i
        for _ in cluster.nodes:
            cfg = TunnelConfig(
                certificates=m.ca, resolver=m.workloads.get,
                identity_id=lambda ident: m.identity_ids.get(ident, 0) if ident else 0,
                original_dst=_original_dst_from(m.routes),
                inbound_original_dst=_inbound_dst_from(m.inbound_routes),
                on_event=m.events.append, **config)
            m.tunnels.append(m.loop.call(partial(_tunnel, cfg, upstream_gate)))
        if enroll:
            for pod in cluster.pods:
                m.loop.run(m.tunnels[pod.node_index].add_pod(m.specs[pod.name]))
        yield m
    finally:
        try:
            for t in m.tunnels:
                m.loop.run(t.close(), timeout=30)
        finally:
            m.loop.stop()
