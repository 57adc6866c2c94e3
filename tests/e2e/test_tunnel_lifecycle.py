"""Plaintext arriving at a pod (STRICT refuses, PERMISSIVE forwards), destinations outside the mesh
(passthrough or refuse), pods enrolled and removed independently, pooled connections expiring or
replaced after GOAWAY, and graceful drain."""

from __future__ import annotations

import dataclasses
import re
import socket
import struct
import threading
from typing import Any

import pytest
from prereq import require_root
from support.mesh import mesh, read_peers, unread_output
from support.testca import identity

from agent.testbed import Cluster
from ztunnel import podnet
from ztunnel.events import TransportFlag, TunnelDirection
from ztunnel.tunnel import Mode, TunnelWorkload

SMALL = 16 * 1024


@pytest.fixture
def small_cluster() -> Any:
    require_root()
    with Cluster(nodes=2, pods_per_node=2, description="pytest tunnel lifecycle") as c:
        yield c


def logged(caplog: pytest.LogCaptureFixture, pattern: str) -> bool:
    return any(re.search(pattern, r.getMessage()) for r in caplog.records)


def test_plaintext_strict_refuses_permissive_forwards(
        small_cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    c = small_cluster
    client, strict, permissive = c.pod(0, 0), c.pod(1, 0), c.pod(1, 1)
    with mesh(c) as m:
        strict_srv = m.start_server(strict, 8080, SMALL)
        perm_srv = m.start_server(permissive, 8080, SMALL)
        # Re-enroll one pod as PERMISSIVE; its neighbour keeps working meanwhile.
        t = m.tunnel_of(permissive)
        m.loop.run(t.remove_pod(permissive.name))
        spec = dataclasses.replace(m.specs[permissive.name], mode=Mode.PERMISSIVE)
        m.loop.run(t.add_pod(spec))
        # The socket the kernel's sk_lookup program is given for each pod.
        assert t.inbound_listener(permissive.name).getsockname() == ("0.0.0.0", 15006)
        # sk_lookup would deliver these to 15006 with the real port as the local address.
        for pod in (strict, permissive):
            m.inbound_routes[pod.cookie()] = 8080

        res = m.run_clients(client, str(strict.ip), 15006, SMALL, 1)
        assert res["ok"] == 0
        assert logged(caplog, r"plaintext connection from .* to pod n1p0 port 8080 refused: the "
                              r"pod is STRICT")

        assert m.run_clients(client, str(permissive.ip), 15006, SMALL, 1) == {"ok": 1, "errors": []}
        # Source IP preserved; mark carries identity id 0: no authenticated identity.
        assert read_peers(perm_srv, 1) == [(str(client.ip), podnet.mark_for_identity(0))]

        # The STRICT pod still takes HBONE.
        m.route(client, str(strict.ip), 8080)
        assert m.run_clients(client, "127.0.0.1", 15001, SMALL, 1) == {"ok": 1, "errors": []}
        assert read_peers(strict_srv, 1)[0][0] == str(client.ip)
        assert unread_output(strict_srv) == b""
        flags = [e.flags for e in m.closed_events(TunnelDirection.INBOUND_PLAINTEXT)]
        assert flags == [TransportFlag.DENY, TransportFlag.CONNECT]


def test_destinations_outside_the_mesh_pass_through_or_are_refused(
        small_cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    c = small_cluster
    src, outside = c.pod(0, 0), c.pod(1, 1)
    with mesh(c) as m:
        del m.workloads[str(outside.ip)]  # the resolver no longer knows it: not in the mesh
        srv = m.start_server(outside, 8080, SMALL)
        m.route(src, str(outside.ip), 8080)
        assert m.run_clients(src, "127.0.0.1", 15001, SMALL, 1) == {"ok": 1, "errors": []}
        assert read_peers(srv, 1) == [(str(src.ip), 0)]  # plain TCP from the pod itself
        assert [e.flags for e in m.closed_events(TunnelDirection.OUTBOUND)] == [
            TransportFlag.CONNECT | TransportFlag.PASSTHROUGH]
        assert m.tunnel_of(src).pool.connections_opened == 0

        # In the mesh by the resolver's account, but no tunnel listens at that pod.
        m.workloads[str(outside.ip)] = TunnelWorkload(str(outside.ip), identity("ghost"), "ghost")
        m.loop.run(m.tunnel_of(outside).remove_pod(outside.name))
        assert m.run_clients(src, "127.0.0.1", 15001, SMALL, 1)["ok"] == 0
        assert logged(caplog, rf"connection to {re.escape(str(outside.ip))}:15008 refused: no "
                              r"tunnel listens there")
        assert m.closed_events(TunnelDirection.OUTBOUND)[-1].flags == TransportFlag.UPSTREAM_FAILURE
        del m.workloads[str(outside.ip)]

        m.tunnel_of(src).config.outside_mesh = "refuse"
        assert m.run_clients(src, "127.0.0.1", 15001, SMALL, 1)["ok"] == 0
        assert logged(caplog, r"not in the mesh and passthrough is off")
        assert m.closed_events(TunnelDirection.OUTBOUND)[-1].flags == TransportFlag.NO_ROUTE
        assert unread_output(srv) == b""


def test_pool_expires_idle_and_replaces_goaway_connections(small_cluster: Cluster) -> None:
    c = small_cluster
    src, dst = c.pod(0, 0), c.pod(1, 0)
    with mesh(c, idle_timeout=0.2) as m:
        m.start_server(dst, 8080, SMALL)
        m.route(src, str(dst.ip), 8080)
        pool = m.tunnel_of(src).pool
        assert m.run_clients(src, "127.0.0.1", 15001, SMALL, 3) == {"ok": 3, "errors": []}
        assert pool.connections_opened == 1
        m.wait_until(lambda: not pool.connections(), "idle connection to be closed")

        # A connection the server said GOAWAY on is dropped, and the next stream dials anew.
        m.tunnel_of(src).pool.idle_timeout = 300
        assert m.run_clients(src, "127.0.0.1", 15001, SMALL, 1) == {"ok": 1, "errors": []}
        assert pool.connections_opened == 2
        dst_tunnel = m.tunnel_of(dst)
        m.loop.run(dst_tunnel.remove_pod(dst.name))  # closes its HBONE connections: GOAWAY
        m.wait_until(lambda: not pool.connections(), "GOAWAY connection to leave the pool")
        m.loop.run(dst_tunnel.add_pod(m.specs[dst.name]))
        assert m.run_clients(src, "127.0.0.1", 15001, SMALL, 1) == {"ok": 1, "errors": []}
        assert pool.connections_opened == 3


def test_drain_finishes_open_connections_then_stops(small_cluster: Cluster) -> None:
    c = small_cluster
    src, dst = c.pod(0, 0), c.pod(1, 0)
    with mesh(c) as m:
        m.start_server(dst, 8080, SMALL)
        m.route(src, str(dst.ip), 8080)
        # An app connection held half-done: data sent, no EOF yet.
        with src.socket() as app:
            app.connect(("127.0.0.1", 15001))
            app.sendall(b"x" * SMALL)
            m.wait_until(lambda: any(e.phase == "open" for e in m.events), "tunnel to open")
            drained = threading.Event()

            def drain() -> None:
                m.loop.run(m.tunnel_of(src).drain(60))
                drained.set()

            t = threading.Thread(target=drain)
            t.start()
            try:
                m.wait_until(lambda: not m.tunnel_of(src).listening(src.name),
                             "listeners to close")
                with src.socket() as late, pytest.raises(ConnectionRefusedError):
                    late.connect(("127.0.0.1", 15001))
                assert not drained.is_set()  # still waiting for the open connection
                app.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := app.recv(65536):
                    got += chunk
                assert len(got) == SMALL + 32
            finally:
                t.join(60)
        assert drained.is_set()
        assert [e.flags for e in m.closed_events(TunnelDirection.OUTBOUND)] == [
            TransportFlag.CONNECT | TransportFlag.HBONE]



def test_drain_deadline_cuts_a_connection_on_a_pooled_hbone_connection_once(
        small_cluster: Cluster) -> None:
    """The second connection rides the first one's HBONE connection, served by callbacks (no
    Task): drain still waits for it, and at the deadline it is reset and reported once."""
    c = small_cluster
    src, dst = c.pod(0, 0), c.pod(1, 0)
    with mesh(c) as m:
        m.start_server(dst, 8080, SMALL)
        m.route(src, str(dst.ip), 8080)
        with src.socket() as first:  # dials the pooled connection
            first.connect(("127.0.0.1", 15001))
            first.sendall(b"x" * SMALL)
            first.shutdown(socket.SHUT_WR)
            while first.recv(65536):
                pass
        m.wait_until(lambda: len(m.closed_events(TunnelDirection.OUTBOUND)) == 1, "first close")
        with src.socket() as held:
            held.connect(("127.0.0.1", 15001))
            held.sendall(b"x" * SMALL)
            m.wait_until(lambda: sum(e.phase == "open" and e.direction is TunnelDirection.OUTBOUND
                                     for e in m.events) == 2, "second connection to open")
            m.loop.run(m.tunnel_of(src).drain(0.5))
            held.settimeout(30)
            with pytest.raises(ConnectionResetError):  # cut, not left hanging
                while held.recv(65536):
                    pass
        closes = m.closed_events(TunnelDirection.OUTBOUND)
        assert [e.flags for e in closes] == [
            TransportFlag.CONNECT | TransportFlag.HBONE,
            TransportFlag.CONNECT | TransportFlag.HBONE | TransportFlag.RESET]
        assert "drain deadline" in closes[1].reason
        assert m.tunnel_of(src).pool.stats()["pool_connections_opened"] == 1


def rst_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_resets_propagate_both_ways_and_half_close_keeps_the_other_direction(
        small_cluster: Cluster) -> None:
    c = small_cluster
    src, dst = c.pod(0, 0), c.pod(1, 0)
    with mesh(c) as m, dst.socket() as listener:
        listener.bind((str(dst.ip), 9000))
        listener.listen(8)
        listener.settimeout(30)
        m.route(src, str(dst.ip), 9000)

        def pair() -> tuple[socket.socket, socket.socket]:
            client = src.socket()
            client.settimeout(30)
            client.connect(("127.0.0.1", 15001))
            client.sendall(b"hello")
            server, _ = listener.accept()
            server.settimeout(30)
            assert server.recv(5) == b"hello"
            return client, server

        # App-side reset -> RST_STREAM -> reset at the client.
        client, server = pair()
        rst_close(server)
        with client, pytest.raises(ConnectionResetError):
            client.recv(10)

        # Client reset -> RST_STREAM -> reset at the app.
        client, server = pair()
        rst_close(client)
        with server, pytest.raises(ConnectionResetError):
            server.recv(10)

        # Half-close: the client's EOF reaches the app, which can still answer, then close.
        client, server = pair()
        with client, server:
            client.shutdown(socket.SHUT_WR)
            assert server.recv(10) == b""
            server.sendall(b"answer after your EOF")
            server.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := client.recv(100):
                got += chunk
            assert got == b"answer after your EOF"
        m.wait_until(lambda: len(m.closed_events(TunnelDirection.OUTBOUND)) == 3, "close events")
        flags = [e.flags & TransportFlag.RESET for e in m.closed_events(TunnelDirection.OUTBOUND)]
        assert flags == [TransportFlag.RESET, TransportFlag.RESET, TransportFlag.NONE]


def test_draining_destination_sends_goaway_and_finishes_open_streams(
        small_cluster: Cluster) -> None:
    c = small_cluster
    src, dst = c.pod(0, 0), c.pod(1, 0)
    with mesh(c) as m:
        m.start_server(dst, 8080, SMALL)
        m.route(src, str(dst.ip), 8080)
        pool = m.tunnel_of(src).pool
        with src.socket() as app:
            app.connect(("127.0.0.1", 15001))
            app.sendall(b"x" * SMALL)
            m.wait_until(lambda: any(e.phase == "open" and e.direction is TunnelDirection.INBOUND
                                     for e in m.events), "tunnel to open")
            done = threading.Event()

            def drain() -> None:
                m.loop.run(m.tunnel_of(dst).drain(60))
                done.set()

            t = threading.Thread(target=drain)
            t.start()
            try:
                # The source saw GOAWAY: the connection leaves the pool, its stream goes on.
                m.wait_until(lambda: not pool.connections(), "GOAWAY to reach the source")
                app.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := app.recv(65536):
                    got += chunk
                assert len(got) == SMALL + 32
            finally:
                t.join(60)
        assert done.is_set()
        assert [e.flags for e in m.closed_events(TunnelDirection.OUTBOUND)] == [
            TransportFlag.CONNECT | TransportFlag.HBONE]
