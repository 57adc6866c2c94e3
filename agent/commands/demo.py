"""`nodemesh demo`: a local two-node mesh in network namespaces, with the embedded CA and the
sample policy (examples/demo-mesh.yaml), showing what is allowed, what is denied, and that the
wire carries only ciphertext."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.host import netns, signals
from agent.runtime.certs import load_or_create_authority
from agent.testbed import Cluster, Node, Pod, PodProcess

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "demo-mesh.yaml"
MARKER = b"NODEMESH-DEMO-PLAINTEXT-MARKER"

# A tiny server: answers "<name> got <n> bytes from <peer>".
SERVER = """
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
s = socket.create_server(("0.0.0.0", port))
print("ready", flush=True)
def handle(c, peer):
    with c:
        data = c.recv(65536)
        c.sendall(f"{name} got {len(data)} bytes from {peer[0]}".encode())
while True:
    c, peer = s.accept()
    threading.Thread(target=handle, args=(c, peer), daemon=True).start()
"""

CLIENT = """
import errno, socket, sys
ip, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(); s.settimeout(8)
try:
    s.connect((ip, port)); s.sendall(payload); s.shutdown(socket.SHUT_WR)
    print("OK " + s.recv(4096).decode())
except OSError as e:
    print("ERR " + (errno.errorcode.get(e.errno or 0) or str(e)))
"""


@dataclass(frozen=True)
class Step:
    src: str
    dst: str
    port: int
    expect: str
    why: str
    vip: str = ""  # connect to this Service VIP instead of the destination pod's IP


STEPS = (
    Step("shop/frontend", "shop/backend", 8080, "allowed", "frontend may call backend:8080"),
    Step("shop/backend", "shop/db", 5432, "allowed", "backend may call db:5432 (cross-node)"),
    Step("tools/debug", "shop/db", 5432, "denied", "tools namespace is denied to db"),
    Step("shop/frontend", "shop/db", 5432, "denied", "no ALLOW rule for frontend->db"),
    Step("shop/db", "shop/backend", 9999, "denied", "backend accepts only frontend on 8080"),
    Step("shop/frontend", "shop/backend", 80, "allowed",
         "backend Service VIP:80 -> a ready endpoint, backend:8080 (same node: kernel bypass)",
         "10.96.0.20"),
    Step("tools/debug", "shop/db", 5432, "denied",
         "db Service VIP -> endpoint db:5432, whose policy denies tools", "10.96.0.30"),
)
PODS = {"shop/frontend": (0, 0), "shop/backend": (0, 1), "shop/db": (1, 0), "tools/debug": (1, 1)}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run a local two-node mesh and show what it enforces",
        epilog="example: sudo nodemesh demo --keep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--keep", action="store_true",
                   help="stay up until Ctrl-C or SIGTERM (metrics, flows); either tears down")
    p.add_argument("--config", type=Path, default=EXAMPLE, help="mesh YAML (default: the sample)")
    p.set_defaults(func=_demo)


def _wait_ready(pod_or_node: object, port: int, timeout: float = 60.0) -> bool:
    """Poll /healthz/ready on the agent (inside the node netns)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        signals.checkpoint()
        try:
            with netns.entered(pod_or_node.netns):  # type: ignore[attr-defined]
                s = socket.create_connection(("127.0.0.1", port), timeout=1)
            with s:
                s.sendall(b"GET /healthz/ready HTTP/1.0\r\n\r\n")
                if b" 200 " in s.recv(200):
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def _run_client(pod: Pod, ip: str, port: int, payload: str) -> str:
    cli = pod.python(CLIENT, ip, str(port), payload, stdout=subprocess.PIPE)
    assert cli.popen is not None
    out, _ = cli.popen.communicate(timeout=30)
    return str(out.decode().strip())


class Sniffer:
    """Raw AF_PACKET capture on a node's underlay interface: does the marker cross in clear?"""

    def __init__(self, ns: str) -> None:
        with netns.entered(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
            self.sock.bind(("eth0", 0))
        self.sock.settimeout(0.2)
        self.seen = 0
        self.frames = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                frame = self.sock.recv(65535)
                self.frames += 1
                if MARKER in frame:
                    self.seen += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _demo(args: argparse.Namespace) -> int:
    if not args.config.exists():
        print(f"nodemesh demo: {args.config} not found", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="nodemesh-demo-"))
    # SIGTERM (timeout, systemd, a container runtime) tears down exactly as Ctrl-C does.
    with signals.interrupt_on_stop() as guard:
        try:
            with Cluster(nodes=2, pods_per_node=2, description="nodemesh demo") as c:
                return _in_cluster(c, args, work, guard)
        except signals.Stopped as stop:
            print(f"\ndemo stopped by {signal.Signals(stop.signum).name}; torn down",
                  file=sys.stderr)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)


def agent_argv(c: Cluster, node: Node, config: Path, pin: Path, work: Path, *,
               extra: Sequence[str] = ()) -> list[str]:
    """The `nodemesh run` command line of one test-bed node's agent (CA root and flow log in
    `work`)."""
    return [sys.executable, "-m", "agent.cli", "run", "--config", str(config),
            "--node-name", f"node{node.index}", "--testbed-run", c.run_id,
            "--cgroup-root", str(node.cgroup_root), "--pin-dir", str(pin),
            "--ca-root-cert", str(work / "ca" / "root-cert.pem"),
            "--flow-log", str(work / f"flows-n{node.index}.log"), *extra]


def _start_agents(
    c: Cluster, args: argparse.Namespace, work: Path, pins: list[Path], extra: tuple[str, ...] = (),
    *, env: dict[str, str] | None = None,
) -> list[PodProcess]:
    """One `nodemesh run` per node, in the node's netns and cgroup, sharing the CA root."""
    ca_cert = work / "ca" / "root-cert.pem"
    load_or_create_authority(ca_cert, ca_cert.with_name("root-key.pem"), "cluster.local")
    agents = []
    for node, pin in zip(c.nodes, pins, strict=True):
        with (work / f"agent-n{node.index}.log").open("w") as log:
            agents.append(node.spawn(agent_argv(c, node, args.config, pin, work, extra=extra),
                                     stdout=log, stderr=subprocess.STDOUT, env=env))
    return agents


def _run_steps(c: Cluster) -> tuple[list[tuple[str, str, str, str]], int, int, int]:
    """Drive STEPS with a capture running on both nodes' underlay interfaces."""
    servers = [
        c.pod(0, 1).python(SERVER, "backend", "8080", stdout=subprocess.PIPE),
        c.pod(0, 1).python(SERVER, "backend", "9999", stdout=subprocess.PIPE),
        c.pod(1, 0).python(SERVER, "db", "5432", stdout=subprocess.PIPE),
    ]
    for s in servers:
        assert s.popen is not None and s.popen.stdout is not None
        s.popen.stdout.readline()
    rows, failures = [], 0
    sniffers = [Sniffer(n.netns) for n in c.nodes]
    for step in STEPS:
        signals.checkpoint()
        src, dst = c.pod(*PODS[step.src]), c.pod(*PODS[step.dst])
        out = _run_client(src, step.vip or str(dst.ip), step.port, MARKER.decode() * 4)
        got = "allowed" if out.startswith("OK") else "denied"
        failures += got != step.expect
        detail = out[3:] if got == "allowed" else out[4:]
        rows.append((f"{step.src} -> {step.vip or step.dst}:{step.port}", got, detail, step.why))
    for sn in sniffers:
        sn.stop()
    return rows, failures, sum(s.frames for s in sniffers), sum(s.seen for s in sniffers)


def _report(c: Cluster, rows: list[tuple[str, str, str, str]], frames: int, leaks: int) -> None:
    print()
    print(f"{'connection':<36}{'result':<9}{'detail'}")
    for conn, got, detail, why in rows:
        print(f"{conn:<36}{got:<9}{detail}")
        print(f"{'':<36}{'':<9}({why})")
    print()
    verdict = "ENCRYPTED (mTLS/HBONE)" if frames and not leaks else "PLAINTEXT SEEN"
    print(
        f"on the wire: {frames} frames captured on the node underlay, {leaks} contained the "
        f"plaintext marker -> {verdict}"
    )
    for n in c.nodes:
        dump = http_get(n.netns, 15000, "/config_dump")
        if dump:
            d = json.loads(dump)
            print(
                f"node{n.index}: {len(d['enrolled'])} pods enrolled, "
                f"{d['policy']['entries']} policy entries, counters {d['datapath']['counters']}"
            )


def _in_cluster(
    c: Cluster, args: argparse.Namespace, work: Path, guard: signals.StopGuard
) -> int:
    print(f"test bed {c.run_id}: 2 nodes, 4 pods in network namespaces", flush=True)
    # Recorded in the run's state file: the cluster's teardown (and `testbed cleanup` after a
    # crash) uninstalls them, detaching the agents' programs.
    pins = [c.pin_dir(n.index, "demo") for n in c.nodes]
    agents: list[PodProcess] = []
    try:
        agents = _start_agents(c, args, work, pins)
        for node in c.nodes:
            if not _wait_ready(node, 15021):
                print(f"agent on node{node.index} did not become ready; its log:", file=sys.stderr)
                print((work / f"agent-n{node.index}.log").read_text()[-3000:], file=sys.stderr)
                return 1
        print(f"agents ready on node0 and node1 (embedded CA, policy from {args.config.name})")
        rows, failures, frames, leaks = _run_steps(c)
        _report(c, rows, frames, leaks)
        failures += leaks > 0 or frames == 0
        if args.keep:
            print(
                f"\nkept running: metrics in netns {c.nodes[0].netns} at "
                "127.0.0.1:15020/metrics; Ctrl-C or SIGTERM tears everything down",
                flush=True,
            )
            guard.wait()
        print(
            "\ndemo " + ("passed" if failures == 0 else f"FAILED ({failures} unexpected results)")
        )
        return 0 if failures == 0 else 1
    finally:
        for a in agents:
            a.stop(grace=10)


def http_get(ns: str, port: int, path: str) -> str | None:
    """GET a localhost endpoint inside a netns (the agents' admin and metrics); None on error."""
    try:
        with netns.entered(ns):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        with s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[1].decode()
    except (OSError, IndexError):
        return None

