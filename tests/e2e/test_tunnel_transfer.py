"""Cross-node HBONE: bulk data both ways intact over pooled tunnels, nothing readable on the wire,
the app sees the real client IP and the identity mark, telemetry events for every connection."""

from __future__ import annotations

from prereq import require_root
from support.mesh import Capture, mesh, read_peers

from agent.testbed import Cluster
from ztunnel import podnet
from ztunnel.events import TransportFlag, TunnelDirection

SIZE = 512 * 1024  # per connection and direction: 100 connections = 50 MiB each way
CONNS = 100


def test_bulk_transfer_is_intact_pooled_encrypted_and_source_preserving() -> None:
    require_root()
    with Cluster(nodes=2, pods_per_node=1, description="pytest tunnel transfer") as c, mesh(c) as m:
        a, b = c.pod(0, 0), c.pod(1, 0)
        server = m.start_server(b, 8080, SIZE)

        # Control: without the tunnel the capture does see the payload marker.
        cap = Capture(c.nodes[0])
        plain = m.run_clients(a, str(b.ip), 8080, SIZE, 1)
        control = cap.finish()
        assert plain == {"ok": 1, "errors": []}
        assert read_peers(server, 1) == [(str(a.ip), 0)]
        assert control["marker_frames"] > 0, control

        # Through the tunnel: pod a's connections to 127.0.0.1:15001 "were" to b:8080.
        m.route(a, str(b.ip), 8080)
        cap = Capture(c.nodes[0])
        result = m.run_clients(a, "127.0.0.1", 15001, SIZE, CONNS)
        wire = cap.finish()
        assert result == {"ok": CONNS, "errors": []}

        assert wire["marker_frames"] == 0, wire
        assert wire["hbone_frames"] > 0 and wire["bytes"] > SIZE, wire

        pool = m.tunnels[0].pool
        assert pool.streams_opened == CONNS
        assert 1 <= pool.connections_opened < CONNS

        # The app saw pod a's own address, and its socket inherited the identity mark.
        a_id = m.identity_ids[m.identity(a)]
        peers = read_peers(server, CONNS)
        assert set(peers) == {(str(a.ip), podnet.mark_for_identity(a_id))}

        m.wait_until(lambda: len(m.closed_events(TunnelDirection.OUTBOUND)) == CONNS
                     and len(m.closed_events(TunnelDirection.INBOUND)) == CONNS, "close events")
        out_closed = m.closed_events(TunnelDirection.OUTBOUND)
        in_closed = m.closed_events(TunnelDirection.INBOUND)
        for e in out_closed:
            assert e.flags == TransportFlag.CONNECT | TransportFlag.HBONE
            assert e.bytes_sent == SIZE and e.bytes_received == SIZE + 32
            assert e.src_identity == m.identity(a) and e.dst_identity == m.identity(b)
        for e in in_closed:
            assert e.src_identity == m.identity(a) and e.src_ip == str(a.ip)
            assert e.bytes_sent == SIZE
