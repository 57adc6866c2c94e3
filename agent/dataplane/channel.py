"""The local channel between the control process and a data-plane worker.

One AF_UNIX SOCK_SEQPACKET socketpair per worker: the kernel keeps message boundaries (one JSON
object per packet) and delivers SCM_RIGHTS descriptors with the packet they came with, so no
framing state can go out of step. Messages are bounded (MAX_MESSAGE bytes, MAX_FDS descriptors);
a bigger one is refused at the sender and, should one arrive, dropped at the receiver with its
descriptors closed. Sending never blocks the event loop: what the socket cannot take yet waits in
a queue bounded by `max_queued` bytes (a peer that stops reading past that is stuck: ChannelFull).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

MAX_MESSAGE = 128 * 1024
MAX_FDS = 4
DEFAULT_MAX_QUEUED = 16 * 1024 * 1024

Message = dict[str, Any]


class ChannelError(Exception):
    """A message could not be sent or was malformed."""


class MessageTooLarge(ChannelError):  # noqa: N818  # reads as what happened, like TimeoutError
    pass


class ChannelFull(ChannelError):  # noqa: N818
    """The peer has not read `max_queued` bytes of messages: it is stuck."""


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair; each end can buffer at least a couple of maximal messages."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            # The kernel caps this at net.core.[wr]mem_max (then doubles it); a packet larger
            # than the send buffer is refused outright, so MAX_MESSAGE stays well below it.
            s.setsockopt(socket.SOL_SOCKET, opt, 4 * MAX_MESSAGE)
    return a, b


def encode(msg: Mapping[str, Any]) -> bytes:
    if not isinstance(msg.get("op"), str):
        raise ChannelError(f"a message needs a string 'op': {str(msg)[:100]}")
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise MessageTooLarge(f"{msg['op']} message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> Message:
    try:
        msg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChannelError(f"malformed message ({len(data)} bytes): {exc}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ChannelError(f"message without a string 'op': {data[:100]!r}")
    return msg


def send_now(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """One packet; BlockingIOError when the socket cannot take it now."""
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[Message, list[int]] | None:
    """One packet: (message, descriptors), None at end of stream. ChannelError for a packet
    over the bounds or malformed (its descriptors closed); BlockingIOError when none is there."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE + 1, MAX_FDS)
    if not data and not fds:
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE:
        _close_all(fds)
        raise MessageTooLarge(f"received a message over {MAX_MESSAGE} bytes or {MAX_FDS} "
                              "descriptors: dropped")
    try:
        return decode(data), fds
    except ChannelError:
        _close_all(fds)
        raise


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


Handler = Callable[[Message, list[int]], None]


class Channel:
    """One end of a pair, driven by the running event loop.

    `on_message(msg, fds)` owns the descriptors it is given; `on_close()` runs once, at end of
    stream or on close(); `on_error(exc)` hears about dropped malformed or oversized messages.
    """

    def __init__(self, sock: socket.socket, on_message: Handler, on_close: Callable[[], None],
                 on_error: Callable[[ChannelError], None] = lambda _e: None,
                 max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._on_message, self._on_close, self._on_error = on_message, on_close, on_error
        self.max_queued = max_queued
        self._out: deque[tuple[bytes, list[int]]] = deque()
        self.queued = 0
        self.closed = False
        self.errors = 0
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(self, msg: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
        """Queue one message (the descriptors are duplicated: the caller keeps its own)."""
        if self.closed:
            raise ChannelError("channel closed")
        data = encode(msg)
        if len(fds) > MAX_FDS:
            raise MessageTooLarge(f"{len(fds)} descriptors exceed {MAX_FDS}")
        if not self._out:
            try:
                send_now(self.sock, data, fds)
                return
            except BlockingIOError:
                pass
            except OSError as exc:  # the peer is gone: its end-of-stream closes us
                raise ChannelError(f"send failed: {exc}") from exc
        if self.queued + len(data) > self.max_queued:
            raise ChannelFull(f"{self.queued} bytes unread by the peer: it is stuck")
        first = not self._out
        self._out.append((data, [os.dup(fd) for fd in fds]))
        self.queued += len(data)
        if first:
            self._loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                send_now(self.sock, data, fds)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            self._out.popleft()
            self.queued -= len(data)
            _close_all(fds)
        self._loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        for _ in range(64):  # a bounded batch per wake-up: other callbacks get their turn
            try:
                got = receive(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except ChannelError as exc:
                self.errors += 1
                self._on_error(exc)
                continue
            except OSError:
                got = None
            if got is None:
                self.close()
                return
            self._on_message(*got)
            if self.closed:
                return

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        if self._out:
            self._loop.remove_writer(self.sock.fileno())
        for _data, fds in self._out:
            _close_all(fds)
        self._out.clear()
        self.queued = 0
        self.sock.close()
        self._on_close()
