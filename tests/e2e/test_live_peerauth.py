"""PeerAuthentication changes reach a running pod's tunnel and kernel entries (issue #14): the
demo's shop namespace goes STRICT -> PERMISSIVE -> STRICT under real `nodemesh run` agents, and
plaintext from outside the mesh (node1's underlay address) to frontend is refused, accepted,
refused again, with no agent restart, no re-enroll, and a connection accepted while PERMISSIVE
still open and answered after the switch back.

frontend is the target because no ALLOW policy selects it: only the mTLS mode decides.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from support.agents import live_mesh

from agent.commands.demo import CLIENT, EXAMPLE, _run_client
from agent.testbed import Cluster

WAIT = 60.0
STRICT = EXAMPLE.read_text()
PERMISSIVE = STRICT.replace("mode: STRICT", "mode: PERMISSIVE")
FRONTEND = (0, 0, "frontend", "8080")


def plaintext(c: Cluster) -> str:
    """One plaintext request from node1's host netns (outside the mesh) to frontend:8080."""
    cli = c.nodes[1].python(CLIENT, str(c.pod(0, 0).ip), "8080", "plain",
                            stdout=subprocess.PIPE)
    assert cli.popen is not None
    out, _ = cli.popen.communicate(timeout=30)
    return out.decode().strip()


def settle(c: Cluster, want_ok: bool, what: str) -> None:
    deadline = time.monotonic() + WAIT
    out = ""
    while time.monotonic() < deadline:
        out = plaintext(c)
        if out.startswith("OK frontend got") == want_ok:
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: last answer {out!r}")


def enroll_lines(log: str) -> int:
    return sum(1 for line in log.splitlines() if "enrolled shop/frontend" in line)


def test_strict_permissive_strict_on_a_running_pod(tmp_path: Path) -> None:
    assert PERMISSIVE != STRICT
    with live_mesh(tmp_path, "pytest live peerauth", servers=(FRONTEND,)) as live:
        c = live.cluster
        # Mesh traffic works throughout; plaintext from outside is refused under STRICT.
        assert _run_client(c.pod(0, 1), str(c.pod(0, 0).ip), 8080, "x").startswith(
            "OK frontend got")
        out = plaintext(c)
        assert not out.startswith("OK"), out
        enrolled = enroll_lines(live.log(0))
        assert enrolled >= 1
        pid = live.agents[0].pid

        live.mesh.write_text(PERMISSIVE)
        settle(c, True, "PERMISSIVE: plaintext accepted")
        # Accepted while PERMISSIVE and left open across the switch back.
        held = c.nodes[1].socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            held.settimeout(10)
            held.connect((str(c.pod(0, 0).ip), 8080))

            live.mesh.write_text(STRICT)
            settle(c, False, "STRICT again: plaintext refused")
            out = plaintext(c)
            assert not out.startswith("OK"), out

            held.sendall(b"still here")
            held.shutdown(socket.SHUT_WR)
            assert held.recv(4096).decode().startswith("frontend got 10 bytes"), (
                "the connection accepted under PERMISSIVE was cut by the mode change")
        finally:
            held.close()

        assert _run_client(c.pod(0, 1), str(c.pod(0, 0).ip), 8080, "x").startswith(
            "OK frontend got")
        log = live.log(0)
        assert live.agents[0].pid == pid and live.agents[0].popen is not None
        assert live.agents[0].popen.poll() is None, log[-2000:]
        assert enroll_lines(log) == enrolled, "the pod was enrolled again"
        assert "unenrolled shop/frontend" not in log
        assert "plaintext now accepted (PERMISSIVE)" in log
        assert "plaintext now refused (STRICT)" in log
