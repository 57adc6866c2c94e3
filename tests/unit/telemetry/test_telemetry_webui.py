"""The flow map's server side over real HTTP on loopback: the page and its assets (only its own,
with a strict CSP), and the Server-Sent Events stream fed by the FlowHub."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web
from telemetry_samples import OUTSIDER, REVIEWS, SLEEP, T0

from agent.runtime.admin import admin_app
from agent.telemetry.flow import FlowEventKind, FlowRecord, FlowVerdict, Reporter
from agent.telemetry.stream import FlowHub


@asynccontextmanager
async def serve(hub: FlowHub) -> AsyncIterator[str]:
    runner = web.AppRunner(admin_app(lambda: {"workloads": []}, hub))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def record(kind: FlowEventKind = FlowEventKind.CLOSE) -> FlowRecord:
    denied = kind is FlowEventKind.DENY
    return FlowRecord(kind, Reporter.DESTINATION, OUTSIDER if denied else SLEEP, REVIEWS,
                      time=T0, verdict=FlowVerdict.DENIED if denied else FlowVerdict.ALLOWED)


async def events(resp: aiohttp.ClientResponse, n: int) -> list[tuple[str, dict[str, object]]]:
    """The next n events (name, data) of an SSE response; comments are skipped."""
    out: list[tuple[str, dict[str, object]]] = []
    name = "message"
    while len(out) < n:
        line = (await asyncio.wait_for(resp.content.readline(), 10)).decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
            name = "message"
    return out


def test_page_and_assets_are_served_with_a_strict_policy() -> None:
    async def go() -> None:
        async with serve(FlowHub()) as base, aiohttp.ClientSession() as s:
            async with s.get(f"{base}/ui", allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"] == "/ui/"
            async with s.get(f"{base}/ui/") as r:
                assert r.status == 200 and r.content_type == "text/html"
                page = await r.text()
                csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp
            # Everything the page loads is its own: no CDN, no inline script.
            refs = re.findall(r'(?:src|href)="([^"]+)"', page)
            assert sorted(refs) == ["flowmap.css", "flowmap.js"]
            assert "<script>" not in page
            for name, ctype in (("flowmap.js", "text/javascript"), ("flowmap.css", "text/css")):
                async with s.get(f"{base}/ui/{name}") as r:
                    assert r.status == 200 and r.content_type == ctype
                    body = await r.text()
                    assert "http://" not in body.replace("http://www.w3.org/2000/svg", "")
                    assert "https://" not in body
            for bad in ("../webui.py", "nope.js", "%2e%2e%2fwebui.py"):
                async with s.get(f"{base}/ui/{bad}") as r:
                    assert r.status == 404, bad

    asyncio.run(go())


def test_event_stream_sends_backlog_then_live_records_with_filters() -> None:
    async def go() -> None:
        hub = FlowHub()
        hub.publish(record())
        async with serve(hub) as base, aiohttp.ClientSession() as s:
            async with s.get(f"{base}/flows/events") as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "text/event-stream"
                [(_, first)] = await events(r, 1)  # the backlog
                assert first["kind"] == "close"
                hub.publish(record(FlowEventKind.DENY))
                [(name, live)] = await events(r, 1)
                assert name == "message" and live["verdict"] == "denied"
                assert FlowRecord.from_dict(live) == record(FlowEventKind.DENY)
            async with s.get(f"{base}/flows/events", params={"verdict": "denied"}) as r:
                [(_, only)] = await events(r, 1)
                assert only["kind"] == "deny"
            async with s.get(f"{base}/flows/events", params={"verdict": "maybe"}) as r:
                assert r.status == 400 and "verdict" in await r.text()
        assert hub.subscriber_count == 0  # streams end and unsubscribe with the server

    asyncio.run(go())


def test_slow_reader_is_told_how_many_records_it_lost() -> None:
    async def go() -> None:
        hub = FlowHub(queue_size=2)
        async with serve(hub) as base, aiohttp.ClientSession() as s, \
                s.get(f"{base}/flows/events") as r:
            while hub.subscriber_count < 1:
                await asyncio.sleep(0.01)
            for _ in range(5):  # published faster than the queue of 2 drains
                hub.publish(record())
            got = await events(r, 3)
            names = [n for n, _ in got]
            assert "dropped" in names
            dropped = next(d for n, d in got if n == "dropped")
            assert dropped == {"dropped": 3}

    asyncio.run(go())
