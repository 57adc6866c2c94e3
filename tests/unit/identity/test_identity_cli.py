"""`nodemesh ca serve | node-cert | issue` end to end on loopback."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from agent.cli import main
from agent.identity import pki
from agent.identity.spiffe import Identity, from_certificate

FE = Identity("cluster.local", "shop", "frontend")


@pytest.fixture
def ca_process(tmp_path: Path):  # type: ignore[no-untyped-def]  # generator fixture
    (tmp_path / "tokens.yaml").write_text("secret-n1: n1\n")
    (tmp_path / "workloads.yaml").write_text(f"n1: [{FE.uri}]\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "ca", "serve", "--listen", "127.0.0.1:0",
         "--root-cert", str(tmp_path / "root.pem"), "--root-key", str(tmp_path / "root.key"),
         "--tokens", str(tmp_path / "tokens.yaml"),
         "--workloads", str(tmp_path / "workloads.yaml"), "--max-ttl", "2h"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def test_serve_generates_root_and_issue_prints_chain(
        ca_process: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert stat.S_IMODE(os.stat(tmp_path / "root.key").st_mode) == 0o600
    (tmp_path / "token").write_text("secret-n1\n")
    argv = ["ca", "issue", "--ca", ca_process, "--ca-root", str(tmp_path / "root.pem"),
            "--identity", FE.uri, "--token-file", str(tmp_path / "token"), "--ttl", "1h",
            "--key-out", str(tmp_path / "fe.key")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    chain = pki.certs_from_pem(out)
    root = pki.certs_from_pem((tmp_path / "root.pem").read_bytes())[0]
    assert from_certificate(chain[0]) == FE
    assert chain[-1] == root
    assert "PRIVATE KEY" not in out
    assert stat.S_IMODE(os.stat(tmp_path / "fe.key").st_mode) == 0o600
    key = pki.key_from_pem((tmp_path / "fe.key").read_bytes())
    assert key.public_key() == chain[0].public_key()

    # Over the configured --max-ttl: refused, with the CA's reason on stderr.
    assert main([*argv[:-2], "--ttl", "3h"]) == 1
    assert "requested TTL 10800s exceeds the CA's maximum of 7200s" in capsys.readouterr().err


def test_node_cert_command(tmp_path: Path) -> None:
    authority = pki.Authority.generate("cluster.local")
    (tmp_path / "ca.pem").write_text(pki.cert_to_pem(authority.root))
    (tmp_path / "ca.key").write_bytes(pki.key_to_pem(authority.key))
    assert main(["ca", "node-cert", "--root-cert", str(tmp_path / "ca.pem"),
                 "--root-key", str(tmp_path / "ca.key"), "--node", "n7",
                 "--cert-out", str(tmp_path / "n7.pem"),
                 "--key-out", str(tmp_path / "n7.key")]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "n7.pem").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier) == [
            "spiffe://cluster.local/nodemesh/node/n7"]
    cert.verify_directly_issued_by(authority.root)
    assert stat.S_IMODE(os.stat(tmp_path / "n7.key").st_mode) == 0o600
    with pytest.raises(SystemExit, match="is missing"):
        main(["ca", "node-cert", "--root-cert", str(tmp_path / "ca.pem"),
              "--root-key", str(tmp_path / "nope.key"), "--node", "n7",
              "--cert-out", str(tmp_path / "x.pem"), "--key-out", str(tmp_path / "x.key")])
