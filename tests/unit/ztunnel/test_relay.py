"""The plain side of a relay over a real socket pair: nothing read before attach is lost."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from ztunnel.relay import PlainSide


class Recorder:
    """An Endpoint that records what the plain side forwards."""

    def __init__(self) -> None:
        self.data = b""
        self.finished = False
        self.resets = 0

    def send(self, data: bytes) -> bool:
        self.data += data
        return True

    def drained(self, n: int) -> None:
        pass

    def finish(self) -> None:
        self.finished = True

    def reset(self) -> None:
        self.resets += 1


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, app): a connected TCP pair on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        app = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    return ours, app


async def _until(cond: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(5):
            while not cond():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"no {what} within 5 s") from None


def test_bytes_and_eof_read_before_attach_reach_the_peer() -> None:
    # start_paused=False stands in for a loop that starts reading before the protocol can pause
    # it (uvloop ignores pause_reading() inside connection_made).
    async def body() -> None:
        loop = asyncio.get_running_loop()
        ours, app = tcp_pair()
        with app:
            _, plain = await loop.connect_accepted_socket(PlainSide, ours)
            app.sendall(b"early bytes")
            app.shutdown(socket.SHUT_WR)
            await _until(lambda: plain.bytes_read == 11, "bytes before attach")
            peer = Recorder()
            plain.attach(peer)
            assert peer.data == b"early bytes"
            await _until(lambda: peer.finished, "EOF after attach")  # held back by the pause
            plain.finish()  # our direction done too: the socket closes cleanly
            await _until(lambda: plain.closed, "close")
            assert peer.resets == 0

    asyncio.run(body())


def test_a_reset_before_attach_reaches_the_peer() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        ours, app = tcp_pair()
        _, plain = await loop.connect_accepted_socket(PlainSide, ours)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        app.close()  # RST
        await _until(lambda: plain.closed, "close before attach")
        peer = Recorder()
        plain.attach(peer)
        assert (peer.data, peer.finished, peer.resets) == (b"", False, 1)

    asyncio.run(body())
