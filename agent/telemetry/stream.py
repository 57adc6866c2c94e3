"""Live flow stream: an in-process fan-out hub and the admin endpoint `GET /flows`.

The hub sits on the data path (producers call `publish` for every record), so publishing never
waits: each subscriber has a bounded queue, and a subscriber too slow to keep up loses records,
which are counted and reported to it as a gap. `publish` is safe from any thread (the ring-buffer
reader may run in one); subscribers live on an asyncio loop.

Endpoint (mounted on the admin server, 127.0.0.1:15000), newline-delimited JSON:
  GET /flows?verdict=denied&namespace=prod&from=<RFC3339>&to=<RFC3339>[&follow=1][&limit=N]
Without `follow`: the matching records of the recent ring, oldest first, then the response ends.
With `follow=1`: those, then every matching record as it is published, until the client leaves.
A line `{"dropped": N}` means N matching records were lost because the client read too slowly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from aiohttp import web

from agent.telemetry.flow import FlowRecord, FlowRecordError, FlowVerdict, parse_rfc3339, rfc3339

log = logging.getLogger(__name__)

DEFAULT_RECENT: Final = 4096
DEFAULT_QUEUE: Final = 1024
# How often an idle follower checks that its client is still connected (aiohttp does not cancel
# handlers when a client leaves).
IDLE_CHECK_SECONDS: Final = 5.0
NDJSON: Final = "application/x-ndjson"


class FilterError(ValueError):
    """A flow filter parameter is malformed."""


@dataclass(frozen=True)
class FlowFilter:
    """Which records a reader wants. `namespace` matches either side's namespace; `since` and
    `until` bound the record time (inclusive)."""

    since: datetime | None = None
    until: datetime | None = None
    verdict: FlowVerdict | None = None
    namespace: str | None = None

    def matches(self, rec: FlowRecord) -> bool:
        if self.verdict is not None and rec.verdict is not self.verdict:
            return False
        if self.namespace is not None and self.namespace not in (
                rec.source.namespace, rec.destination.namespace):
            return False
        if self.since is not None and rec.time < self.since:
            return False
        return self.until is None or rec.time <= self.until

    def to_query(self) -> dict[str, str]:
        q: dict[str, str] = {}
        if self.since is not None:
            q["from"] = rfc3339(self.since)
        if self.until is not None:
            q["to"] = rfc3339(self.until)
        if self.verdict is not None:
            q["verdict"] = self.verdict.value
        if self.namespace is not None:
            q["namespace"] = self.namespace
        return q

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> FlowFilter:
        try:
            since = parse_rfc3339(query["from"]) if "from" in query else None
            until = parse_rfc3339(query["to"]) if "to" in query else None
        except FlowRecordError as e:
            raise FilterError(f"from/to: {e}") from None
        verdict = None
        if "verdict" in query:
            try:
                verdict = FlowVerdict(query["verdict"])
            except ValueError:
                raise FilterError(f"verdict {query['verdict']!r}: want allowed or denied") from None
        namespace = query.get("namespace") or None
        if since is not None and until is not None and until < since:
            raise FilterError("`to` is before `from`")
        return cls(since, until, verdict, namespace)


class Subscription:
    """One reader's bounded queue. Create with FlowHub.subscribe on the reader's event loop."""

    def __init__(self, hub: FlowHub, filt: FlowFilter, size: int) -> None:
        self.filter = filt
        self.dropped = 0  # total lost, for the reader's information
        self._hub = hub
        self._queue: deque[FlowRecord] = deque()
        self._size = size
        self._unreported = 0  # lost since the last batch was handed out
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._ready = asyncio.Event()
        self._wake_pending = False

    # Called by the hub with the hub lock held.
    def _offer(self, rec: FlowRecord) -> bool:
        if len(self._queue) >= self._size:
            self.dropped += 1
            self._unreported += 1
            return False
        self._queue.append(rec)
        self._wake()
        return True

    def _wake(self) -> None:
        if threading.get_ident() == self._thread:
            self._ready.set()
        elif not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._set_ready)
            except RuntimeError:  # the reader's loop is gone; nobody will read this queue
                self._closed = True

    def _set_ready(self) -> None:
        with self._hub._lock:
            self._wake_pending = False
        self._ready.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def next_batch(self, timeout: float | None = None) -> tuple[list[FlowRecord], int]:
        """Wait for records; return them with the count lost since the last batch. Returns
        ([], 0) on timeout or once the subscription is closed (check `closed`)."""
        if not self._queue and not self._unreported and not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
        with self._hub._lock:
            self._ready.clear()
            batch = list(self._queue)
            self._queue.clear()
            lost, self._unreported = self._unreported, 0
        return batch, lost

    def close(self) -> None:
        self._hub._remove(self)
        self._closed = True
        if threading.get_ident() == self._thread:
            self._ready.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                self._loop.call_soon_threadsafe(self._ready.set)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FlowHub:
    """Fan-out of flow records to live subscribers, with a ring of the most recent ones."""

    def __init__(self, recent: int = DEFAULT_RECENT, queue_size: int = DEFAULT_QUEUE) -> None:
        if recent < 1 or queue_size < 1:
            raise ValueError("recent and queue_size must be positive")
        self._lock = threading.Lock()
        self._recent: deque[FlowRecord] = deque(maxlen=recent)
        self._subs: list[Subscription] = []
        self._queue_size = queue_size
        self._dropped = 0

    def publish(self, rec: FlowRecord) -> None:
        """Never blocks: a full subscriber queue loses the record (counted)."""
        with self._lock:
            self._recent.append(rec)
            for sub in self._subs:
                if sub.filter.matches(rec) and not sub._offer(rec):
                    self._dropped += 1

    def recent(self, filt: FlowFilter | None = None, limit: int | None = None) -> list[FlowRecord]:
        """Matching records from the ring, oldest first; with `limit`, the newest `limit`."""
        filt = filt or FlowFilter()
        with self._lock:
            out = [r for r in self._recent if filt.matches(r)]
        return out[-limit:] if limit is not None else out

    def subscribe(self, filt: FlowFilter | None = None, *, backlog: bool = False) -> Subscription:
        """Start receiving matching records published from now on. With `backlog`, the matching
        recent records come first, with no gap or duplicate between them and the live ones.
        Must be called on the event loop the subscriber reads from."""
        sub = Subscription(self, filt or FlowFilter(), self._queue_size)
        with self._lock:
            if backlog:
                matching = [r for r in self._recent if sub.filter.matches(r)]
                for rec in matching[-self._queue_size:]:
                    sub._offer(rec)
            self._subs.append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._subs.remove(sub)

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subs)

    def dropped_count(self) -> int:
        """Records lost to slow subscribers since start (AgentMetrics.stream_dropped reads it)."""
        with self._lock:
            return self._dropped


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


class FlowsEndpoint:
    """The aiohttp handler for `GET /flows` (see the module docstring)."""

    def __init__(self, hub: FlowHub, idle_check: float = IDLE_CHECK_SECONDS) -> None:
        self.hub = hub
        self.idle_check = idle_check
        self._active: set[Subscription] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            filt = FlowFilter.from_query(request.query)
            limit = _limit(request.query["limit"]) if "limit" in request.query else None
        except (FilterError, ValueError) as e:
            raise web.HTTPBadRequest(text=f"bad /flows query: {e}\n") from None
        resp = web.StreamResponse(headers={"Content-Type": NDJSON})
        await resp.prepare(request)
        if not _flag(request.query.get("follow")):
            lines = [rec.to_json() + "\n" for rec in self.hub.recent(filt, limit)]
            await resp.write("".join(lines).encode())
            await resp.write_eof()
            return resp
        with self.hub.subscribe(filt, backlog=True) as sub:
            self._active.add(sub)
            try:
                await _follow(request, resp, sub, self.idle_check)
            finally:
                self._active.discard(sub)
        return resp

    async def close_followers(self, _app: web.Application | None = None) -> None:
        """End every open follow stream (open streams would otherwise hold up a shutdown)."""
        for sub in list(self._active):
            sub.close()


async def _follow(request: web.Request, resp: web.StreamResponse, sub: Subscription,
                  idle_check: float) -> None:
    while not sub.closed:
        batch, lost = await sub.next_batch(timeout=idle_check)
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        if not batch and not lost:
            continue
        lines = [json.dumps({"dropped": lost}) + "\n"] if lost else []
        lines += [rec.to_json() + "\n" for rec in batch]
        try:
            await resp.write("".join(lines).encode())
        except ConnectionError:  # the client left between our check and the write
            return


def add_routes(app: web.Application, hub: FlowHub) -> FlowsEndpoint:
    """Mount `GET /flows` on an admin app; its follow streams end when the app shuts down."""
    endpoint = FlowsEndpoint(hub)
    app.router.add_get("/flows", endpoint.handle)
    app.on_shutdown.append(endpoint.close_followers)
    return endpoint


def _limit(text: str) -> int:
    """`limit=` of GET /flows: ASCII digits only (int() would also take "٣", " 3" and "1_0")."""
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise ValueError(f"limit {text[:16]!r}: want a whole number in ASCII digits")
    return int(text)
