"""Scenarios: the live flow stream over real HTTP on loopback, read through the `nodemesh flows`
code path; filters; slow subscribers lose records without blocking the publisher."""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta

import aiohttp
from aiohttp import web
from telemetry_samples import OUTSIDER, REVIEWS, SLEEP, T0

from agent.cli import build_parser
from agent.commands import telemetry as cli
from agent.telemetry.flow import FlowEndpoint, FlowEventKind, FlowRecord, FlowVerdict, Reporter
from agent.telemetry.stream import FlowFilter, FlowHub, FlowsEndpoint, add_routes


@asynccontextmanager
async def admin_server(hub: FlowHub) -> AsyncIterator[tuple[str, FlowsEndpoint]]:
    """The /flows endpoint mounted on an app served on an ephemeral loopback port."""
    app = web.Application()
    endpoint = add_routes(app, hub)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"127.0.0.1:{runner.addresses[0][1]}", endpoint
    finally:
        await runner.cleanup()


async def until_subscribed(hub: FlowHub, n: int = 1) -> None:
    while hub.subscriber_count < n:
        await asyncio.sleep(0.01)


def flows_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["flows", *argv])


def deny(src: FlowEndpoint, dst: FlowEndpoint, **kw: object) -> FlowRecord:
    return FlowRecord(FlowEventKind.DENY, Reporter.DESTINATION, src, dst, time=T0,
                      verdict=FlowVerdict.DENIED, reason="policy_deny", **kw)  # type: ignore[arg-type]  # test kwargs are FlowRecord fields


def opened(src: FlowEndpoint, dst: FlowEndpoint, **kw: object) -> FlowRecord:
    return FlowRecord(FlowEventKind.OPEN, Reporter.SOURCE, src, dst, time=T0, **kw)  # type: ignore[arg-type]  # test kwargs are FlowRecord fields


def lines(out: io.StringIO) -> list[str]:
    return [line for line in out.getvalue().splitlines() if line]


def test_follow_json_receives_records_published_after_subscribing() -> None:
    async def go() -> None:
        hub = FlowHub()
        async with admin_server(hub) as (admin, _):
            args = flows_args("--admin", admin, "--follow", "--json", "--verdict", "denied",
                              "--count", "2")
            out, err = io.StringIO(), io.StringIO()
            task = asyncio.create_task(cli.run(args, out, err))
            await until_subscribed(hub)
            wanted = [deny(SLEEP, REVIEWS), deny(OUTSIDER, REVIEWS, reason_code=3)]
            hub.publish(opened(SLEEP, REVIEWS))  # allowed: filtered out by --verdict
            hub.publish(wanted[0])
            hub.publish(wanted[1])
            assert await task == 0, err.getvalue()
            assert [FlowRecord.from_json(line) for line in lines(out)] == wanted
            assert err.getvalue() == ""
        assert hub.subscriber_count == 0

    asyncio.run(go())


def test_follow_from_another_thread_and_namespace_filter() -> None:
    other_ns = FlowEndpoint(workload="db", namespace="data", ip="10.0.3.3", port=5432)

    async def go() -> list[FlowRecord]:
        hub = FlowHub()
        async with admin_server(hub) as (admin, _):
            got: list[FlowRecord] = []

            async def follow() -> None:
                async for item in cli.read_flows(admin, FlowFilter(namespace="data"),
                                                 follow=True):
                    assert isinstance(item, FlowRecord)
                    got.append(item)
                    if len(got) == 2:
                        return

            task = asyncio.create_task(follow())
            await until_subscribed(hub)
            # The ring-buffer reader publishes from its own thread.
            records = [opened(SLEEP, REVIEWS), opened(SLEEP, other_ns),
                       deny(other_ns, REVIEWS)]
            def publish_all() -> None:
                for r in records:
                    hub.publish(r)

            t = threading.Thread(target=publish_all)
            t.start()
            await task
            t.join()
            return got

    got = asyncio.run(go())
    assert [(r.source.namespace, r.destination.namespace) for r in got] == [
        ("default", "data"), ("data", "prod")]


def test_recent_ring_with_time_and_verdict_filters() -> None:
    async def go(hub: FlowHub, filt: FlowFilter) -> list[FlowRecord]:
        async with admin_server(hub) as (admin, _):
            return [r async for r in cli.read_flows(admin, filt) if isinstance(r, FlowRecord)]

    hub = FlowHub(recent=4)
    times = [T0 + timedelta(seconds=i) for i in range(6)]
    for i, t in enumerate(times):
        rec = deny(SLEEP, REVIEWS) if i % 2 else opened(SLEEP, REVIEWS)
        hub.publish(replace(rec, time=t))
    # The ring keeps the newest 4 (times 2..5).
    assert [r.time for r in asyncio.run(go(hub, FlowFilter()))] == times[2:]
    window = FlowFilter(since=times[3], until=times[4])
    assert [r.time for r in asyncio.run(go(hub, window))] == times[3:5]
    denied = FlowFilter(verdict=FlowVerdict.DENIED)
    assert [r.time for r in asyncio.run(go(hub, denied))] == [times[3], times[5]]
    assert asyncio.run(go(hub, FlowFilter(namespace="nowhere"))) == []


def test_follow_starts_with_the_matching_backlog() -> None:
    async def go() -> list[FlowRecord]:
        hub = FlowHub()
        hub.publish(deny(SLEEP, REVIEWS))
        hub.publish(opened(SLEEP, REVIEWS))
        async with admin_server(hub) as (admin, _):
            out, err = io.StringIO(), io.StringIO()
            args = flows_args("--admin", admin, "-f", "--json", "--verdict", "denied", "-c", "2")
            task = asyncio.create_task(cli.run(args, out, err))
            await until_subscribed(hub)
            hub.publish(deny(OUTSIDER, REVIEWS))
            assert await task == 0
            return [FlowRecord.from_json(line) for line in lines(out)]

    got = asyncio.run(go())
    assert [r.source for r in got] == [SLEEP, OUTSIDER]


def test_slow_subscriber_loses_records_and_is_told_so() -> None:
    async def go() -> tuple[list[object], int]:
        hub = FlowHub(queue_size=1)
        async with admin_server(hub) as (admin, endpoint):
            items: list[object] = []

            async def follow() -> None:
                async for item in cli.read_flows(admin, FlowFilter(), follow=True):
                    items.append(item)
                    if isinstance(item, FlowRecord) and item.source == OUTSIDER:
                        await endpoint.close_followers()  # ends the stream from the server side

            task = asyncio.create_task(follow())
            await until_subscribed(hub)
            # Published without yielding to the loop: the handler cannot drain in between, so
            # its queue of 1 keeps the first and loses two.
            for _ in range(3):
                hub.publish(opened(SLEEP, REVIEWS))
            await until_drained(hub)
            hub.publish(opened(OUTSIDER, REVIEWS))
            await task  # returns once the server ends the stream
            return items, hub.dropped_count()

    items, dropped = asyncio.run(go())
    assert dropped == 2
    assert items[0] == cli.Dropped(2)
    assert [r.source for r in items[1:]] == [SLEEP, OUTSIDER]  # type: ignore[attr-defined]  # all FlowRecords


async def until_drained(hub: FlowHub) -> None:
    while any(s._queue for s in hub._subs):  # the handler has taken its batch
        await asyncio.sleep(0.01)


def test_publish_never_waits_for_a_subscriber() -> None:
    async def go() -> None:
        hub = FlowHub(queue_size=2)
        sub = hub.subscribe()
        for _ in range(5):  # nobody reads: the publisher must still return every time
            hub.publish(opened(SLEEP, REVIEWS))
        assert (sub.dropped, hub.dropped_count()) == (3, 3)
        batch, lost = await sub.next_batch()
        assert (len(batch), lost) == (2, 3)
        sub.close()
        assert hub.subscriber_count == 0
        assert await sub.next_batch() == ([], 0)

    asyncio.run(go())


def test_bad_query_is_a_400_with_the_reason() -> None:
    async def go() -> tuple[int, str]:
        async with admin_server(FlowHub()) as (admin, _), aiohttp.ClientSession() as s, \
                s.get(f"http://{admin}/flows", params={"verdict": "maybe"}) as resp:
            return resp.status, await resp.text()

    status, text = asyncio.run(go())
    assert status == 400
    assert "allowed or denied" in text


def test_cli_explains_an_unreachable_agent() -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, then released
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, err = io.StringIO(), io.StringIO()
    code = asyncio.run(cli.run(flows_args("--admin", f"127.0.0.1:{port}"), out, err))
    assert code == 1
    assert "is the agent running" in err.getvalue()


def table_for(records: Sequence[FlowRecord]) -> list[str]:
    async def go() -> list[str]:
        hub = FlowHub()
        for r in records:
            hub.publish(r)
        async with admin_server(hub) as (admin, _):
            out, err = io.StringIO(), io.StringIO()
            assert await cli.run(flows_args("--admin", admin), out, err) == 0
            return lines(out)

    return asyncio.run(go())


def test_table_is_readable_and_under_80_columns() -> None:
    long = FlowEndpoint(workload="a-very-long-workload-name-that-goes-on", namespace="namespace-x",
                        ip="10.9.9.9", port=8443)
    closed = FlowRecord(FlowEventKind.CLOSE, Reporter.DESTINATION, long, REVIEWS, time=T0,
                        bytes_sent=5 * 1024 * 1024, bytes_received=1500, duration=12.5,
                        response_flags="CONNECT")
    rows = table_for([closed, deny(OUTSIDER, REVIEWS), opened(SLEEP, REVIEWS, tunneled=True)])
    assert rows[0].split() == ["TIME", "KIND", "SOURCE", "DESTINATION", "SENT/RCVD", "INFO"]
    assert all(len(row) < 80 for row in rows)
    assert rows[1].split()[:2] == ["05:06:07", "close"]
    assert rows[1].split()[-3:] == ["5.0M/1.5K", "12.5s", "CONNECT"]
    assert rows[2].split()[1:] == ["DENY", "192.0.2.9:51000", "prod/reviews-v2:9080", "0/0",
                                   "policy_deny"]
    assert rows[3].split()[1:] == ["open", "default/sleep", "prod/reviews-v2:9080", "mtls"]


def test_from_accepts_an_age_or_rfc3339() -> None:
    now = T0
    assert cli.parse_time("10m", now) == T0 - timedelta(minutes=10)
    assert cli.parse_time("2026-03-04T05:06:07.123456Z") == T0
    assert cli.parse_time("2026-03-04T06:06:07.123456+01:00") == T0
