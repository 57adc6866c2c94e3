"""The soak's traffic: load programs that run in test-bed pods and report every connection.

Each kind of traffic runs in its own process (the latency of short connections is not measured
behind another workload's GIL). A program runs until a CLOCK_MONOTONIC deadline (system-wide, so
comparable with the soak's own clock) and prints one JSON line per connection:
[kind, t0, t1, ok, why]. Every payload is checked: echoes byte for byte, transfers by SHA-256.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.testbed import PodProcess
from agent.testbed.cluster import Place

LOAD = r"""
import errno, hashlib, json, random, socket, sys, threading, time
mode, ip, port, until = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
opt = [float(a) for a in sys.argv[5:]]
lock = threading.Lock()
def emit(kind, t0, ok, why=""):
    line = json.dumps([kind, t0, time.monotonic(), ok, why])
    with lock:
        sys.stdout.write(line + "\n"); sys.stdout.flush()
def why(e):
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__
def short(kind, gap):
    n = 0
    while time.monotonic() < until:
        n += 1; b = bytes((n & 0xFF,)); t0 = time.monotonic()
        try:
            with socket.create_connection((ip, port), timeout=5) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(b); r = s.recv(1)
            emit(kind, t0, r == b, "" if r == b else ("wrong echo" if r else "closed"))
        except Exception as e:  # every failure is an event, never a crash
            emit(kind, t0, False, why(e))
        time.sleep(max(0.0, gap - (time.monotonic() - t0)))
def bulk(size, rate, gap):
    size = int(size); data = memoryview(random.Random(7).randbytes(size))
    want, step = hashlib.sha256(data).digest(), 256 << 10
    while time.monotonic() < until:
        t0, errs = time.monotonic(), []
        try:
            s = socket.create_connection((ip, port), timeout=30)
        except Exception as e:
            emit("bulk", t0, False, why(e)); time.sleep(gap); continue
        def send():
            try:
                for off in range(0, size, step):  # paced: a long transfer, not a burst
                    s.sendall(data[off:off + step])
                    ahead = t0 + (off + step) / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                s.shutdown(socket.SHUT_WR)
            except Exception as e:
                errs.append("send " + why(e))
        th = threading.Thread(target=send); th.start()
        h, n = hashlib.sha256(), 0
        try:
            while c := s.recv(1 << 20):
                h.update(c); n += len(c)
        except Exception as e:
            errs.append("recv " + why(e))
        finally:
            s.close(); th.join()
        ok = not errs and n == size and h.digest() == want
        emit("bulk", t0, ok, "" if ok else "; ".join(errs) or f"echoed {n} of {size} bytes"
             + ("" if n != size else ", hash differs"))
        time.sleep(gap)
def streams(count, size, period):
    count, size = int(count), int(size); payload = random.Random(9).randbytes(size)
    due = time.monotonic()
    while due < until:
        time.sleep(max(0.0, due - time.monotonic())); due += period
        barrier = threading.Barrier(count, timeout=30)
        def one():
            t0 = time.monotonic()
            try:
                with socket.create_connection((ip, port), timeout=30) as s:
                    barrier.wait()  # all `count` connections are open at once
                    s.sendall(payload); s.shutdown(socket.SHUT_WR)
                    got = bytearray()
                    while c := s.recv(65536):
                        got += c
                emit("streams", t0, got == payload, "" if got == payload
                     else f"echoed {len(got)} of {size} bytes")
            except Exception as e:
                barrier.abort()
                emit("streams", t0, False, why(e))
        ts = [threading.Thread(target=one) for _ in range(count)]
        for t in ts: t.start()
        for t in ts: t.join()
print("ready", flush=True)
{"short": lambda: short("short", *opt), "probe": lambda: short("probe", *opt),
 "bulk": lambda: bulk(*opt), "streams": lambda: streams(*opt)}[mode]()
"""

KINDS = ("short", "bulk", "streams", "probe")


@dataclass(frozen=True)
class Event:
    kind: str
    t0: float
    t1: float
    ok: bool
    why: str


class Load:
    """One load program in a pod; its events are collected by a reader thread."""

    def __init__(self, place: Place, log: Path, mode: str, *, target: tuple[str, int],
                 until: float, opts: Sequence[float]) -> None:
        self.mode = mode
        self.events: list[Event] = []
        with log.open("ab") as err:
            self.proc: PodProcess = place.python(
                LOAD, mode, target[0], str(target[1]), repr(until), *map(repr, opts),
                stdout=subprocess.PIPE, stderr=err,
            )
        assert self.proc.popen is not None and self.proc.popen.stdout is not None
        self._out = self.proc.popen.stdout
        if self._out.readline().strip() != b"ready":
            self.proc.stop()
            raise RuntimeError(f"{mode} load in {place.netns} did not start (see {log})")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # the pipe closed under us by stop()
            for line in self._out:
                raw: list[Any] = json.loads(line)
                self.events.append(Event(str(raw[0]), float(raw[1]), float(raw[2]),
                                         bool(raw[3]), str(raw[4])))

    def finish(self, timeout: float) -> None:
        """Wait for the program to reach its deadline and exit; then stop it regardless."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        if self.proc.poll() is None:
            self.proc.stop()
        self._reader.join(timeout=10)
        self.proc.stop()


__all__ = ["KINDS", "LOAD", "Event", "Load"]
