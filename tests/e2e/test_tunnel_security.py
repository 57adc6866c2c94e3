"""HBONE security on the test bed: impersonation attempts fail with the right cause, the
destination's policy verdict (EPERM on the upstream connect) becomes 401 and reaches no app, and
CONNECT requests are validated in ztunnel's order."""

from __future__ import annotations

import errno
import logging
import re
from typing import Any

import pytest
from prereq import require_root
from support.mesh import Mesh, mesh, read_peers, unread_output
from support.testca import identity

from agent.identity.spiffe import Identity
from agent.testbed import Cluster
from agent.testbed.cluster import Pod
from ztunnel import connect, podnet
from ztunnel.events import TransportFlag, TunnelDirection
from ztunnel.pool import PoolKey
from ztunnel.tunnel import PodSpec, TunnelWorkload

SMALL = 16 * 1024


@pytest.fixture
def small_cluster() -> Any:
    require_root()
    with Cluster(nodes=2, pods_per_node=2, description="pytest tunnel security") as c:
        yield c


def through_tunnel(m: Mesh, src: Pod, dst: Pod, port: int = 8080) -> dict[str, Any]:
    m.route(src, str(dst.ip), port)
    return m.run_clients(src, "127.0.0.1", 15001, SMALL, 1)


def failed(result: dict[str, Any]) -> bool:
    return result["ok"] == 0 and len(result["errors"]) == 1


def logged(caplog: pytest.LogCaptureFixture, pattern: str) -> bool:
    return any(re.search(pattern, r.getMessage()) for r in caplog.records)


def test_impersonation_is_rejected_with_the_cause_logged(
        small_cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    c = small_cluster
    with mesh(c) as m:
        dst = c.pod(1, 0)
        server = m.start_server(dst, 8080, SMALL)
        ca = m.ca

        # A client certificate from the same CA but another trust domain: the chain verifies,
        # the trust-domain check on the server refuses it.
        src = c.pod(0, 0)
        ca.install(m.identity(src), ca.leaf("spiffe://other.domain/ns/default/sa/n0p0"))
        assert failed(through_tunnel(m, src, dst))
        assert logged(caplog, r"client certificate identity "
                              r"spiffe://other\.domain/ns/default/sa/n0p0 is in trust domain "
                              r"'other\.domain', not ours")

        # Expired: the server's chain verification refuses it in the handshake.
        src = c.pod(0, 1)
        ca.install(m.identity(src), ca.leaf(m.identity(src).uri, expired=True))
        assert failed(through_tunnel(m, src, dst))
        assert logged(caplog, r"rejected HBONE connection from .*certificate has expired")
        # asyncio drops the server's TLS alert when it closes a failed handshake, so the client
        # sees the connection closed during setup and says what that probably means.
        assert logged(caplog, r"mTLS handshake with .* failed: .*probably rejected our client "
                              r"certificate")

        # Self-signed with a valid-looking identity.
        src = c.pod(1, 1)
        ca.install(m.identity(src), ca.leaf(m.identity(src).uri, self_signed=True))
        assert failed(through_tunnel(m, src, dst))
        assert logged(caplog, r"rejected HBONE connection from .*self.signed certificate")

        # The server presents its real certificate, but the client expected another identity at
        # that address: the client aborts.
        src = c.pod(0, 0)
        ca.install(m.identity(src), ca.leaf(m.identity(src).uri))
        m.workloads[str(dst.ip)] = TunnelWorkload(str(dst.ip), identity("impostor"), dst.name)
        assert failed(through_tunnel(m, src, dst))
        assert logged(caplog, r"server certificate identity "
                              r"spiffe://cluster\.local/ns/default/sa/n1p0 is not the expected "
                              r"destination identity "
                              r"spiffe://cluster\.local/ns/default/sa/impostor")

        failures = [e for e in m.closed_events(TunnelDirection.OUTBOUND)
                    if e.flags & TransportFlag.TLS_FAILURE]
        assert len(failures) == 4
        # The server recorded each certificate it refused, with the cause. (The client's own
        # abort in the fourth case may land during or after the server's handshake.)
        reasons = [e.reason for e in m.closed_events(TunnelDirection.INBOUND)
                   if e.flags & TransportFlag.TLS_FAILURE]
        for cause in ("trust domain 'other.domain'", "certificate has expired",
                      "self-signed certificate"):
            assert sum(cause in r for r in reasons) == 1, (cause, reasons)

        # No impersonation attempt reached the app; with sane certificates the same path works.
        m.workloads[str(dst.ip)] = TunnelWorkload(str(dst.ip), m.identity(dst), dst.name)
        assert through_tunnel(m, src, dst) == {"ok": 1, "errors": []}
        assert read_peers(server, 1) == [(str(src.ip), podnet.mark_for_identity(
            m.identity_ids[m.identity(src)]))]
        assert unread_output(server) == b""


def test_destination_policy_deny_is_401_and_reaches_no_app(
        small_cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    c = small_cluster
    denied, allowed, dst = c.pod(0, 0), c.pod(0, 1), c.pod(1, 0)
    seen: list[tuple[Identity | None, int]] = []

    def gate(pod: PodSpec, peer: Identity | None, target: tuple[str, int], mark: int) -> None:
        # Stands in for the kernel program on the upstream connect: it sees only the mark.
        seen.append((peer, mark))
        if podnet.identity_of_mark(mark) == deny_id:
            raise PermissionError(errno.EPERM, "Operation not permitted")

    with mesh(c, upstream_gate=gate) as m:
        deny_id = m.identity_ids[m.identity(denied)]
        server = m.start_server(dst, 8080, SMALL)

        assert failed(through_tunnel(m, denied, dst))
        assert logged(caplog, r"upstream connect to .*:8080 in pod n1p0 for "
                              r"spiffe://cluster\.local/ns/default/sa/n0p0 denied by policy")
        assert logged(caplog, r"answered 401: denied by the destination's policy")
        out = [e for e in m.closed_events(TunnelDirection.OUTBOUND) if e.flags & TransportFlag.DENY]
        assert len(out) == 1 and out[0].reason.startswith("401")
        m.wait_until(lambda: any(e.flags & TransportFlag.DENY
                                 for e in m.closed_events(TunnelDirection.INBOUND)),
                     "inbound deny event")

        assert through_tunnel(m, allowed, dst) == {"ok": 1, "errors": []}
        allowed_mark = podnet.mark_for_identity(m.identity_ids[m.identity(allowed)])
        assert seen == [(m.identity(denied), podnet.mark_for_identity(deny_id)),
                        (m.identity(allowed), allowed_mark)]
        # Exactly one connection ever reached the app: the allowed one.
        assert read_peers(server, 1) == [(str(allowed.ip), allowed_mark)]
        assert unread_output(server) == b""


def test_connect_requests_are_validated_in_order(small_cluster: Cluster) -> None:
    c = small_cluster
    src, dst, other = c.pod(0, 0), c.pod(1, 0), c.pod(1, 1)
    with mesh(c) as m:
        m.start_server(dst, 8080, SMALL)
        tunnel = m.tunnel_of(src)
        s_spec, d_spec = m.specs[src.name], m.specs[dst.name]
        key = PoolKey(s_spec.identity, d_spec.identity, d_spec.ip, s_spec.ip)

        def hdrs(authority: str, method: str = "CONNECT") -> list[tuple[str, str]]:
            h = [(":method", method), (":authority", authority)]
            if method != "CONNECT":
                h += [(":scheme", "https"), (":path", "/")]
            return h

        async def status(headers: list[tuple[str, str]]) -> int:
            session, sid = await tunnel.pool.open_stream(key, headers)
            code, _ = await session.response(sid)
            if code == connect.OK:
                session.stream_reset(sid)
            return code

        ip = str(dst.ip)
        cases = {
            "GET": (hdrs(f"{ip}:8080", "GET"), 400),
            "hostname": (hdrs("example.com:8080"), 400),
            "no port": (hdrs(ip), 400),
            "another pod's IP": (hdrs(f"{other.ip}:8080"), 400),
            "tunnel port 15008": (hdrs(f"{ip}:15008"), 400),
            "tunnel port 15001": (hdrs(f"{ip}:15001"), 400),
            "nothing listening": (hdrs(f"{ip}:9"), 503),
            "good": (hdrs(f"{ip}:8080"), 200),
        }
        got = {name: m.loop.run(status(h)) for name, (h, _) in cases.items()}
        assert got == {name: want for name, (_, want) in cases.items()}
        # Every request shared one TLS connection: per-stream errors never hurt the connection.
        assert tunnel.pool.connections_opened == 1
