"""`nodemesh ca serve` stops on SIGTERM as on Ctrl-C: it stops listening, then exits 0."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.identity.spiffe import Identity

FE = Identity("cluster.local", "shop", "frontend")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ca_serve_stops_cleanly_on_signal(
        sig: signal.Signals, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tokens.yaml").write_text("secret-n1: n1\n")
    (tmp_path / "workloads.yaml").write_text(f"n1: [{FE.uri}]\n")
    (tmp_path / "token").write_text("secret-n1\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "ca", "serve", "--listen", "127.0.0.1:0",
         "--root-cert", str(tmp_path / "root.pem"), "--root-key", str(tmp_path / "root.key"),
         "--tokens", str(tmp_path / "tokens.yaml"),
         "--workloads", str(tmp_path / "workloads.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        addr = line.split()[-1]
        # It serves before the signal ...
        assert main(["ca", "issue", "--ca", addr, "--ca-root", str(tmp_path / "root.pem"),
                     "--identity", FE.uri, "--token-file", str(tmp_path / "token")]) == 0
        capsys.readouterr()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        # ... and exits by itself, with status 0 and no traceback, after saying it stops.
        assert proc.returncode == 0, err
        assert "stopping" in out
        assert "Traceback" not in err
        host, _, port = addr.rpartition(":")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
