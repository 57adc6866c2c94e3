"""The control <-> worker channel: one JSON message per packet, bounded in bytes and
descriptors, SCM_RIGHTS descriptors delivered with their message, nothing lost after a bad one,
and a sender that never blocks (a bounded queue, then ChannelFull)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from agent.dataplane import channel

pytestmark = pytest.mark.unit


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_messages_keep_their_boundaries_and_descriptors_arrive_with_theirs() -> None:
    a, b = channel.pair()
    r, w = os.pipe()
    with a, b:
        channel.send_now(a, channel.encode({"op": "first", "n": 1}))
        channel.send_now(a, channel.encode({"op": "listener"}), [w])
        assert channel.receive(b) == ({"op": "first", "n": 1}, [])
        got = channel.receive(b)
        assert got is not None
        msg, fds = got
        assert msg == {"op": "listener"} and len(fds) == 1 and fds[0] != w
        os.write(fds[0], b"through the passed descriptor")  # the same pipe, another fd
        assert os.read(r, 100) == b"through the passed descriptor"
        for fd in (r, w, fds[0]):
            os.close(fd)
        a.close()
        assert channel.receive(b) is None  # end of stream


def test_bounds_are_refused_at_both_ends_and_the_next_message_still_arrives() -> None:
    with pytest.raises(channel.MessageTooLarge, match="exceeds"):
        channel.encode({"op": "big", "x": "y" * channel.MAX_MESSAGE})
    with pytest.raises(channel.ChannelError, match="'op'"):
        channel.encode({"no": "op"})
    a, b = channel.pair()
    with a, b:
        before = open_fds()
        a.send(b"{" + b" " * channel.MAX_MESSAGE + b"}")  # past the bound, bypassing encode
        pipes = [os.pipe() for _ in range(channel.MAX_FDS + 1)]
        extra = [fd for pair in pipes for fd in pair][: channel.MAX_FDS + 1]
        socket.send_fds(a, [b'{"op":"fds"}'], extra)  # one descriptor too many
        a.send(b"not json")
        a.send(b'["op"]')
        channel.send_now(a, channel.encode({"op": "after"}))
        with pytest.raises(channel.MessageTooLarge):
            channel.receive(b)
        with pytest.raises(channel.MessageTooLarge):
            channel.receive(b)
        with pytest.raises(channel.ChannelError, match="malformed"):
            channel.receive(b)
        with pytest.raises(channel.ChannelError, match="without a string 'op'"):
            channel.receive(b)
        assert channel.receive(b) == ({"op": "after"}, [])
        for r, w in pipes:
            os.close(r)
            os.close(w)
        assert open_fds() == before  # the refused message's descriptors were closed


def test_a_reader_that_stops_fills_a_bounded_queue_then_everything_arrives_in_order() -> None:
    asyncio.run(_fill_then_drain())


async def _fill_then_drain() -> None:
    a, b = channel.pair()
    closed: list[str] = []
    got: list[int] = []
    sender = channel.Channel(a, lambda _m, _f: None, lambda: closed.append("a"),
                             max_queued=4 * 1024 * 1024)
    payload = "z" * 60_000
    sent = 0
    with pytest.raises(channel.ChannelFull):
        while True:  # nobody reads b yet: the socket buffer fills, then the queue
            sender.send({"op": "chunk", "i": sent, "pad": payload})
            sent += 1
    assert sender.queued > 0
    done = asyncio.Event()

    def on_message(msg: channel.Message, fds: list[int]) -> None:
        assert fds == []
        got.append(msg["i"])
        if len(got) == sent:
            done.set()

    receiver = channel.Channel(b, on_message, lambda: closed.append("b"))
    await asyncio.wait_for(done.wait(), 30)
    assert got == list(range(sent))
    assert sender.queued == 0
    sender.close()
    await asyncio.sleep(0.05)
    assert sorted(closed) == ["a", "b"]  # the peer's end of stream closes the other side once
    assert receiver.closed
