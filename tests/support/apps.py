"""Test applications run inside pods (python apps.py <role> ...).

Transfer protocol, both directions at once: the client sends SIZE bytes then shuts down writing;
the server, while reading, sends SIZE bytes of its own, and after the client's EOF appends the
SHA-256 of everything it received and closes. The client checks both. Payloads are seeded random
bytes with MARKER every 4 KiB, so a packet capture of plaintext would find it.

Roles:
  server PORT SIZE           serve transfers forever (prints "ready", then "peer <ip>" for
                             every connection: what the app sees as its client address)
                             and the mark its accepted socket inherited
  client HOST PORT SIZE N    N concurrent transfers; prints one JSON line with the results
  capture IFACE              raw AF_PACKET capture until stdin closes; prints JSON counts of
                             bytes, frames, frames to/from port 15008 and frames with MARKER
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import select
import socket
import struct
import sys

MARKER = b"NODEMESH-PLAINTEXT-MARKER-7f3a"
CHUNK = 64 * 1024


def payload(seed: int, size: int) -> bytes:
    data = bytearray(random.Random(seed).randbytes(size))
    for off in range(0, max(0, size - len(MARKER)), 4096):
        data[off:off + len(MARKER)] = MARKER
    return bytes(data)


async def _send_all(w: asyncio.StreamWriter, data: bytes, eof: bool = False) -> None:
    for off in range(0, len(data), CHUNK):
        w.write(data[off:off + CHUNK])
        await w.drain()
    if eof:
        w.write_eof()


SERVER_DATA: dict[int, bytes] = {}


async def serve(port: int, size: int) -> None:
    SERVER_DATA[size] = payload(0, size)
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer = w.get_extra_info("peername")
        mark = w.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
        print(f"peer {peer[0]} mark {mark}", flush=True)
        try:
            sender = asyncio.create_task(_send_all(w, SERVER_DATA[size]))
            h = hashlib.sha256()
            while chunk := await r.read(CHUNK):
                h.update(chunk)
            await sender
            w.write(h.digest())
            await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=512)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def one_transfer(host: str, port: int, size: int, i: int) -> str | None:
    try:
        r, w = await asyncio.open_connection(host, port)
    except OSError as exc:
        return f"connect: {exc!r}"
    local_port = w.get_extra_info("sockname")[1]
    mine = payload(local_port, size)
    try:
        sender = asyncio.create_task(_send_all(w, mine, eof=True))
        got = bytearray()
        while chunk := await r.read(CHUNK):
            got += chunk
        await sender
    except (ConnectionError, OSError) as exc:
        return f"transfer {i}: {exc!r}"
    finally:
        w.close()
    if bytes(got[:size]) != payload(0, size):
        return f"transfer {i}: server data differs ({len(got)} bytes received)"
    if bytes(got[size:]) != hashlib.sha256(mine).digest():
        return f"transfer {i}: server's hash of our data differs"
    return None


async def clients(host: str, port: int, size: int, n: int) -> None:
    async def run(i: int) -> str | None:
        return await one_transfer(host, port, size, i)

    results = await asyncio.gather(*(run(i) for i in range(n)))
    errors = [e for e in results if e]
    print(json.dumps({"ok": n - len(errors), "errors": errors[:10]}), flush=True)


def capture(iface: str) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
    s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: keep up with bursts
    s.bind((iface, 0))
    print("ready", flush=True)
    counts = {"bytes": 0, "frames": 0, "hbone_frames": 0, "marker_frames": 0}
    buf = bytearray(1 << 17)
    while True:
        ready, _, _ = select.select([s, sys.stdin], [], [])
        if sys.stdin in ready:
            break
        n = s.recv_into(buf)
        frame = bytes(buf[:n])
        counts["bytes"] += n
        counts["frames"] += 1
        if MARKER in frame:
            counts["marker_frames"] += 1
        if n >= 14 + 20 + 4 and frame[12:14] == b"\x08\x00" and frame[23] == 6:
            ihl = (frame[14] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
            if 15008 in (sport, dport):
                counts["hbone_frames"] += 1
    print(json.dumps(counts), flush=True)


def main() -> None:
    role = sys.argv[1]
    if role == "server":
        asyncio.run(serve(int(sys.argv[2]), int(sys.argv[3])))
    elif role == "client":
        asyncio.run(clients(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
    elif role == "capture":
        capture(sys.argv[2])
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
