"""Small load programs that run inside test-bed pods, and how to run them.

Each program is Python source started with `Place.python(...)` (so it runs in the pod's netns and
cgroup, where the mesh captures it) and prints one JSON line. Every client checks what comes back
against what it sent, so a number is only reported for traffic that arrived intact.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from agent.testbed.cluster import Place

# Echo server: every byte read is written back (asyncio Protocol: no thread per connection, so a
# new connection costs the server little). Serves the ping-pong, the connection-per-request and
# the integrity clients.
ECHO_SERVER = """
import asyncio, socket, sys
class Echo(asyncio.Protocol):
    def connection_made(self, t):
        t.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.t = t
    def data_received(self, d):
        self.t.write(d)
    def eof_received(self):
        return False
async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(Echo, "0.0.0.0", int(sys.argv[1]), backlog=4096)
    print("ready", flush=True)
    await srv.serve_forever()
asyncio.run(main())
"""

# Integrity: `size` bytes of seeded pseudo-random data sent while the echo is read back; the
# SHA-256 of what was sent and of what came back must match (run next to every bulk run, since
# iperf3's own counters stop at its end-of-test message while proxies still hold bytes).
INTEGRITY = """
import hashlib, json, random, socket, sys, threading
ip, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(size).randbytes(size)
s = socket.create_connection((ip, port), timeout=20)
sent = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
sent.start()
h, n = hashlib.sha256(), 0
while chunk := s.recv(1 << 20):
    h.update(chunk); n += len(chunk)
sent.join(); s.close()
ok = n == size and h.digest() == hashlib.sha256(data).digest()
print(json.dumps({"bytes_sent": size, "bytes_echoed": n, "sha256_match": ok, "verified": ok}))
"""

# 1-byte request/response over one connection: n timed round trips after a warm-up.
PINGPONG = """
import json, socket, sys, time
ip, port, n, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((ip, port), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times, bad, clock = [], 0, time.perf_counter_ns
for i in range(warm + n):
    b = bytes((i & 0xFF,))
    t = clock()
    s.sendall(b)
    r = s.recv(1)
    dt = clock() - t
    bad += r != b
    if i >= warm:
        times.append(dt)
s.close()
times.sort()
q = lambda p: times[min(len(times) - 1, int(p * len(times)))] / 1000
print(json.dumps({"round_trips": n, "bytes_echoed": n + warm - bad, "bytes_sent": n + warm,
                  "p50_us": q(0.50), "p90_us": q(0.90), "p99_us": q(0.99),
                  "verified": bad == 0}))
"""

# A new connection per request: connect, 1-byte request, 1-byte answer, close; for `seconds`.
CONNRATE = """
import json, socket, sys, time
ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok = bad = 0
end = time.monotonic() + seconds
start = time.monotonic()
while time.monotonic() < end:
    b = bytes(((ok + bad) & 0xFF,))
    try:
        with socket.create_connection((ip, port), timeout=10) as s:
            s.sendall(b)
            r = s.recv(1)
    except OSError:
        r = b""
    if r == b:
        ok += 1
    else:
        bad += 1
elapsed = time.monotonic() - start
print(json.dumps({"requests": ok, "failed": bad, "seconds": elapsed,
                  "conn_per_s": ok / elapsed, "verified": bad == 0 and ok > 0}))
"""

# Policy probe: a connect + 1-byte round trip every `gap` seconds; reports the CLOCK_MONOTONIC
# time (system-wide, so comparable with the suite's clock) of the first result equal to `want`.
# Only EPERM at connect counts as denied (what the kernel answers); a stall or reset while the
# agent is busy counts as neither, and is counted.
PROBE = """
import json, socket, sys, time
ip, port, want = sys.argv[1], int(sys.argv[2]), sys.argv[3]
limit, gap = float(sys.argv[4]), float(sys.argv[5])
def attempt():
    try:
        with socket.create_connection((ip, port), timeout=2) as s:
            s.sendall(b"x")
            return "allowed" if s.recv(1) == b"x" else "broken"
    except PermissionError:
        return "denied"
    except OSError:
        return "broken"
print("ready " + attempt(), flush=True)
sys.stdin.readline()
end, n, broken = time.monotonic() + limit, 0, 0
while time.monotonic() < end:
    n += 1
    got = attempt()
    broken += got == "broken"
    if got == want:
        print(json.dumps({"seen_at": time.monotonic(), "attempts": n, "broken": broken}),
              flush=True)
        break
    time.sleep(gap)
else:
    print(json.dumps({"seen_at": None, "attempts": n, "broken": broken}), flush=True)
"""

# Many pods at once from one process: listeners in every pod netns (FANOUT_SERVER) and one client
# connection from every pod to the next pod (FANOUT_CLIENT), each echoing 1 KiB messages.
FANOUT_SERVER = """
import socket, sys, threading
from agent.host import netns
names, port = sys.argv[1].split(","), int(sys.argv[2])
def handle(c):
    with c:
        while d := c.recv(65536):
            c.sendall(d)
def serve(ls):
    while True:
        c, _ = ls.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
for ns in names:
    ls = netns.socket_in(ns, socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port)); ls.listen(64)
    threading.Thread(target=serve, args=(ls,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

FANOUT_CLIENT = """
import json, socket, sys, threading, time
from agent.host import netns
pairs = [p.split("=") for p in sys.argv[1].split(",")]
port, seconds = int(sys.argv[2]), float(sys.argv[3])
msg = bytes(range(256)) * 4
socks = []
for ns, ip in pairs:
    s = netns.socket_in(ns, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect((ip, port))
    socks.append(s)
print("connected", flush=True)
sys.stdin.readline()
counts, bad = [0] * len(socks), [0] * len(socks)
end = time.monotonic() + seconds
def run(i, s):
    while time.monotonic() < end:
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(len(msg) - len(got))
            if not chunk:
                bad[i] += 1
                return
            got += chunk
        counts[i] += 1
        bad[i] += got != msg
threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(socks)]
for t in threads: t.start()
for t in threads: t.join()
for s in socks: s.close()
print(json.dumps({"connections": len(socks), "round_trips": sum(counts),
                  "idle_connections": counts.count(0),
                  "verified": sum(bad) == 0 and 0 not in counts}))
"""


def start_ready(place: Place, code: str, *args: str) -> Any:
    """Start a server program and wait for its first line ('ready ...')."""
    proc = place.python(code, *args, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    assert proc.popen is not None and proc.popen.stdout is not None
    line = proc.popen.stdout.readline().decode().strip()
    if not line.startswith(("ready", "connected")):
        proc.stop()
        raise RuntimeError(f"{code.strip().splitlines()[0]!r} in {place.netns} did not start")
    return proc


def run_json(place: Place, code: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run a client program to completion and parse its JSON line."""
    proc = place.python(code, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.popen is not None
    try:
        out, err = proc.popen.communicate(timeout=timeout)
    finally:
        proc.stop()
    if proc.popen.returncode != 0:
        raise RuntimeError(f"client in {place.netns} failed: {err.decode()[-1500:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result
