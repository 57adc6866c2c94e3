"""TLS on a non-blocking socket, driven directly: ssl.SSLObject over memory BIOs, the socket
watched with loop.add_reader/add_writer, reads into preallocated buffers.

This replaces asyncio's SSL transport (SSLProtocol over a socket transport) for HBONE: that
stack costs two protocol layers and a flow-control state machine per read and allocates a
256 KiB buffer per connection before the handshake (issue #20). Here a connection holds a
HANDSHAKE_BUFFER until its handshake completes. After it, every connection on an event loop
reads into the same two buffers (READ_BUFFER ciphertext, PLAIN_BUFFER plaintext): callbacks run
one at a time and the plaintext reaches the protocol as one memoryview valid only during the
`data_received` call, so the buffers can be large (one recv fills many TLS records, one
plaintext delivery becomes one send on the plain side) and cost nothing per connection.

A socket-BIO SSLSocket was the other candidate: it saves the BIO copy but OpenSSL then reads
each record with two recv calls and writes each with its own send (measured slower for bulk, see
benchmarks/README.md, profile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import weakref
from collections import deque
from typing import Any, Protocol, cast

log = logging.getLogger(__name__)

HANDSHAKE_BUFFER = 4 * 1024
READ_BUFFER = 256 * 1024
PLAIN_BUFFER = 256 * 1024
HIGH_WATER = 1024 * 1024
# Payloads at least this large go to SSLObject.write on their own; smaller chunks (frame
# headers, control frames, small DATA) are joined so they share TLS records.
_JOIN_BELOW = 16 * 1024
# After a close the socket is shut for writing and what the peer still sends is discarded for
# at most this long (or until its FIN): closing a socket with unread input makes the kernel
# send RST and drop what it had not sent yet, the GOAWAY that tells an abusive peer why
# included (RFC 9113 6.8; nginx's lingering close).
LINGER = 2.0
# A closed connection whose peer does not read what is still queued (GOAWAY behind a backlog)
# is aborted after this long: closing never holds a connection open at the peer's pleasure.
CLOSE_DEADLINE = 5.0


class WireProtocol(Protocol):
    """What a wire calls on the protocol above it (the asyncio.Protocol subset HBONE uses)."""

    def connection_made(self, transport: Any) -> None: ...
    def data_received(self, data: bytes | memoryview) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


Tls = tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]


async def handshake(sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
                    timeout: float) -> Tls:
    """Complete a TLS handshake on a connected socket. Raises ssl.SSLError, ConnectionError
    (peer closed), TimeoutError; the caller closes the socket on failure."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    rbio, wbio = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(rbio, wbio, server_side=server_side)
    buf = bytearray(HANDSHAKE_BUFFER)

    async def run() -> None:
        while True:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            else:
                out = wbio.read()
                if out:
                    await loop.sock_sendall(sock, out)
                return
            out = wbio.read()
            if out:
                await loop.sock_sendall(sock, out)
            n = await loop.sock_recv_into(sock, buf)
            if not n:
                raise ConnectionResetError("peer closed the connection during the TLS handshake")
            rbio.write(memoryview(buf)[:n])

    try:
        await asyncio.wait_for(run(), timeout)
    except ssl.SSLError:
        # Tell the peer why (the alert OpenSSL queued), best effort.
        with contextlib.suppress(OSError):
            sock.send(wbio.read())
        raise
    return obj, rbio, wbio


class TlsWire:
    """An established TLS connection as an asyncio-style transport for one protocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, tls: Tls,
                 protocol: WireProtocol) -> None:
        obj, rbio, wbio = tls
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._obj = obj
        self._rbio = rbio
        self._wbio = wbio
        self._protocol = protocol
        self._rbuf, self._pbuf = _loop_buffers(loop)
        self._rview = memoryview(self._rbuf)
        self._pview = memoryview(self._pbuf)
        self._backlog: deque[bytes | memoryview] = deque()
        self._buffered = 0
        self._high = HIGH_WATER
        self._paused = False
        self._closing = False
        self._lost = False
        self._writer = False
        self._linger: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._extra = {"ssl_object": obj, "socket": sock, "sockname": _name(sock.getsockname),
                       "peername": _name(sock.getpeername)}

    def start(self) -> None:
        self._protocol.connection_made(self)
        if not self._lost:
            self._loop.add_reader(self._fd, self._on_readable)
            # The handshake's last read may have carried application data already.
            if self._rbio.pending:
                self._decrypt()

    # -- transport API -----------------------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is not None:
            self._high = high

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def write(self, data: bytes | memoryview) -> None:
        self.writelines([data])

    def writelines(self, chunks: list[bytes | memoryview]) -> None:
        if self._closing or self._lost:
            return
        obj = self._obj
        try:
            small: list[bytes | memoryview] = []
            for chunk in chunks:
                if len(chunk) < _JOIN_BELOW:
                    small.append(chunk)
                    continue
                if small:
                    obj.write(b"".join(small))
                    small = []
                obj.write(chunk)
            if small:
                obj.write(b"".join(small) if len(small) > 1 else small[0])
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        self._send(self._wbio.read())

    def close(self) -> None:
        if self._closing or self._lost:
            return
        self._closing = True  # from here on, input is read and discarded (see LINGER)
        with contextlib.suppress(ssl.SSLError, ValueError):
            self._obj.unwrap()  # queue close_notify; the peer's reply is not awaited
        self._send(self._wbio.read())
        if not self._backlog:
            self._shut()
        elif self._deadline is None:
            self._deadline = self._loop.call_later(CLOSE_DEADLINE, self._lose, None)

    def abort(self) -> None:
        self._lose(None)

    def can_write_eof(self) -> bool:
        return False

    # -- internals ---------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if not data or self._lost:
            return
        if not self._backlog:
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if n == len(data):
                return
            self._loop.add_writer(self._fd, self._on_writable)
            self._writer = True
            rest = memoryview(data)[n:]
            self._backlog.append(rest)
            self._buffered += len(rest)
        else:
            self._backlog.append(data)
            self._buffered += len(data)
        if not self._paused and self._buffered > self._high:
            self._paused = True
            self._protocol.pause_writing()

    def _on_writable(self) -> None:
        backlog = self._backlog
        while backlog:
            head = backlog[0]
            try:
                n = self._sock.send(head)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fatal(exc)
                return
            self._buffered -= n
            if n < len(head):
                backlog[0] = memoryview(head)[n:]
                return
            backlog.popleft()
        self._loop.remove_writer(self._fd)
        self._writer = False
        if self._closing:
            self._shut()
            return
        if self._paused:
            self._paused = False
            self._protocol.resume_writing()

    def _shut(self) -> None:
        """Everything is written: send FIN and linger (reading, discarding) until the peer's
        FIN or LINGER seconds, whichever comes first."""
        if self._lost or self._linger is not None:
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._lose(None)
            return
        self._linger = self._loop.call_later(LINGER, self._lose, None)

    def _on_readable(self) -> None:
        try:
            n = self._sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        if not n:
            self._eof()
            return
        if self._closing:
            return  # closed by us: discarded without decrypting
        self._rbio.write(self._rview[:n])
        self._decrypt()

    def _decrypt(self) -> None:
        obj, rbio, pview, cap = self._obj, self._rbio, self._pview, len(self._pbuf)
        filled = 0
        while True:
            try:
                # with a buffer, read() returns a count (typeshed says bytes)
                got: int = cast(Any, obj).read(cap - filled, pview[filled:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._deliver(filled)
                self._eof()
                return
            except ssl.SSLError as exc:
                self._fatal(exc)
                return
            if not got:
                break
            filled += got
            if not rbio.pending and not obj.pending():
                # Input used up and no plaintext left: one more read would only raise
                # SSLWantReadError (~1 us per turn, about what decrypting a small record costs).
                # OpenSSL without read-ahead takes from the BIO no more than the record it
                # decrypts, so no complete record can wait inside it.
                break
            if filled == cap:
                self._deliver(filled)
                if self._lost or self._closing:
                    return
                filled = 0
        self._deliver(filled)
        if self._wbio.pending:  # TLS 1.3 post-handshake messages (key update)
            self._send(self._wbio.read())

    def _deliver(self, n: int) -> None:
        if n and not self._lost and not self._closing:
            self._protocol.data_received(self._pview[:n])

    def _eof(self) -> None:
        if self._lost:
            return
        self._protocol.eof_received()
        self._lose(None)

    def _fatal(self, exc: BaseException) -> None:
        if isinstance(exc, Exception):
            self._lose(exc)
        else:  # pragma: no cover -- KeyboardInterrupt and the like
            raise exc

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._linger is not None:
            self._linger.cancel()
        if self._deadline is not None:
            self._deadline.cancel()
        self._loop.remove_reader(self._fd)
        if self._writer:
            self._loop.remove_writer(self._fd)
        self._backlog.clear()
        self._buffered = 0
        with contextlib.suppress(OSError):
            self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)


_BUFFERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[bytearray, bytearray]] = (
    weakref.WeakKeyDictionary())


def _loop_buffers(loop: asyncio.AbstractEventLoop) -> tuple[bytearray, bytearray]:
    """The read buffers all connections on `loop` share (see the module docstring)."""
    bufs = _BUFFERS.get(loop)
    if bufs is None:
        bufs = _BUFFERS[loop] = (bytearray(READ_BUFFER), bytearray(PLAIN_BUFFER))
    return bufs


def _name(get: Any) -> Any:
    try:
        return get()
    except OSError:
        return None
