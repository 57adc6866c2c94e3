"""The plain-TCP side of a relay: an asyncio Protocol joined to an RelayEndpoint (a tunnel stream or
another TCP socket), with back-pressure both ways and half-close/reset propagation.

- reading: bytes go to `peer.send`; if the peer reports back-pressure we stop reading until the
  peer calls `drained`;
- writing: bytes from the peer are written; while our transport's buffer is above its high-water
  mark we owe the peer an acknowledgement, paid in `resume_writing` (for a tunnel stream this is
  what opens the HTTP/2 window again);
- EOF from the socket -> `peer.finish()` (END_STREAM); `finish()` from the peer -> SHUT_WR;
- a reset on either side becomes a reset on the other (RST_STREAM <-> TCP RST).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
import weakref
from collections.abc import Callable
from typing import Protocol

from mypy_extensions import mypyc_attr

log = logging.getLogger(__name__)

HIGH_WATER = 512 * 1024
# asyncio's socket transport copies what it cannot send at once into its own buffer up to 3.11;
# from 3.12 it queues a reference to the caller's object instead.
_TRANSPORT_KEEPS_VIEWS = sys.version_info >= (3, 12)


READ_BUFFER = 256 * 1024
_BUFFERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, memoryview] = (
    weakref.WeakKeyDictionary())


def _loop_buffer() -> memoryview:
    loop = asyncio.get_running_loop()
    buf = _BUFFERS.get(loop)
    if buf is None:
        buf = _BUFFERS[loop] = memoryview(bytearray(READ_BUFFER))
    return buf


class RelayEndpoint(Protocol):
    """What one side of a relay may ask of the other."""

    def send(self, data: bytes | memoryview) -> bool:
        """Forward bytes; False means "stop reading until I call drained". A memoryview is
        valid during the call only: copy what is kept."""
        ...

    def drained(self, n: int) -> None:
        """The other side flushed n more bytes of what it was sent (and can take more)."""
        ...

    def finish(self) -> None:
        """The sender half-closed: no more data in this direction."""
        ...

    def reset(self) -> None:
        """Abort the connection in both directions."""
        ...


@mypyc_attr(allow_interpreted_subclasses=True)  # test stand-ins subclass it
class PlainSide(asyncio.BufferedProtocol):
    """One TCP socket (an app's connection or our upstream to an app). Reads go into a buffer
    every plain side on the loop shares (asyncio fills it and calls `buffer_updated` in one
    callback): the peer gets a view it must copy if it keeps it, instead of a new 256 KiB
    bytes per read."""

    def __init__(self, on_close: Callable[[PlainSide], None] | None = None,
                 start_paused: bool = False) -> None:
        self.peer: RelayEndpoint | None = None
        self.transport: asyncio.Transport | None = None
        self.bytes_read = 0
        self.bytes_written = 0
        self.eof_in = False
        self.eof_out = False
        self.reset_seen = False  # a reset in either direction
        self.closed = False
        self.error: BaseException | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._on_close = on_close
        self._paused = start_paused
        self._write_blocked = False
        self._owed = 0
        self._held: list[bytes] = []  # read before attach: forwarded by attach, never dropped
        # Looked up once: asyncio.get_running_loop() costs a getpid(2) per call on 3.11, and
        # get_buffer/buffer_updated run on every read.
        self._rbuf = _loop_buffer()

    # -- wiring ------------------------------------------------------------------------------
    def attach(self, peer: RelayEndpoint) -> None:
        """Join the other side, hand it what arrived before, and start reading."""
        self.peer = peer
        held, self._held = self._held, []
        flowing = True
        for data in held:
            flowing = peer.send(data) and flowing
        if self.eof_in:
            peer.finish()
        if self.closed and self.reset_seen:
            peer.reset()
        elif flowing:
            self._resume()

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # TCP_NODELAY is the socket owner's to set: the tunnel sets it once where each socket is
        # made (accept loop, podnet.upstream), not again here.
        transport.set_write_buffer_limits(high=HIGH_WATER)
        if self._paused:
            transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rbuf

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._rbuf[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        self.bytes_read += len(data)
        if self.peer is None:
            # Not attached yet: a loop may start reading despite pause_reading() in
            # connection_made (uvloop does, measured). Hold it and stop reading until attach.
            self._held.append(bytes(data))
            self._pause()
            return
        if not self.peer.send(data):
            self._pause()

    def eof_received(self) -> bool:
        self.eof_in = True
        if self.peer is not None:
            self.peer.finish()
        return not self.eof_out  # keep the write side open until the peer half-closes too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        clean = self.eof_in and self.eof_out
        if not clean and not self.reset_seen:
            # Closed or reset under us before both directions finished: tell the other side.
            self.reset_seen = True
            if self.peer is not None:
                self.peer.reset()
        if not self.done.done():
            self.done.set_result(None)
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:
        self._write_blocked = True

    def resume_writing(self) -> None:
        self._write_blocked = False
        owed, self._owed = self._owed, 0
        if self.peer is not None:
            self.peer.drained(owed)

    # -- RelayEndpoint (called by the other side) -------------------------------------------------
    def send(self, data: bytes | memoryview) -> bool:
        if self.closed or self.eof_out or self.transport is None:
            return True  # nowhere to write; drop and keep the peer's window moving
        if _TRANSPORT_KEEPS_VIEWS and isinstance(data, memoryview):
            data = bytes(data)  # a view of the tunnel's reused receive buffer
        self.transport.write(data)
        self.bytes_written += len(data)
        if self._write_blocked:
            self._owed += len(data)
            return False
        return True

    def drained(self, n: int) -> None:
        self._resume()

    def finish(self) -> None:
        if self.closed or self.eof_out or self.transport is None:
            return
        self.eof_out = True
        if self.eof_in:
            self.transport.close()  # both directions done; close flushes what is buffered
        elif self.transport.can_write_eof():
            self.transport.write_eof()

    def reset(self) -> None:
        if self.closed or self.transport is None:
            return
        self.reset_seen = True
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # already gone: the peer sees what the kernel sent
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    # -- internals ---------------------------------------------------------------------------
    def _pause(self) -> None:
        # Not skipped when _paused is already set: start_paused's pause may not have taken
        # (see data_received), and pause_reading() on a paused transport is a no-op.
        if self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
