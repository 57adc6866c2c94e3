"""The live flow map: a small read-only web UI on the admin endpoint (localhost by default).

  GET /ui/               the page (plain HTML, CSS and JS shipped in agent/telemetry/ui/; no build
                         step, nothing fetched from elsewhere)
  GET /flows/events      Server-Sent Events: the recent matching records, then each new one, from
                         the same FlowHub subscription as `GET /flows?follow=1` (`nodemesh flows
                         --follow`); same query parameters. `event: dropped` carries the count of
                         records this reader lost by being slow.

The page reads /config_dump for the workloads (map nodes) and which are enrolled here.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Final

from aiohttp import web

from agent.telemetry.stream import FilterError, FlowFilter, FlowHub, Subscription

# How often an idle event stream sends a comment: it notices a departed client and keeps
# intermediaries from timing the stream out.
KEEPALIVE_SECONDS: Final = 5.0
ASSETS: Final = {
    "index.html": "text/html",
    "flowmap.js": "text/javascript",
    "flowmap.css": "text/css",
}
# The page loads only its own files: no inline script, no other origin.
CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
              "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _asset(name: str) -> bytes:
    return resources.files("agent.telemetry").joinpath("ui", name).read_bytes()


class FlowEvents:
    """`GET /flows/events`; `close_followers` ends open streams at shutdown."""

    def __init__(self, hub: FlowHub, keepalive: float = KEEPALIVE_SECONDS) -> None:
        self.hub = hub
        self.keepalive = keepalive
        self._active: set[Subscription] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            filt = FlowFilter.from_query(request.query)
        except FilterError as e:
            raise web.HTTPBadRequest(text=f"bad /flows/events query: {e}\n") from None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store"})
        await resp.prepare(request)
        with self.hub.subscribe(filt, backlog=True) as sub:
            self._active.add(sub)
            try:
                await self._pump(request, resp, sub)
            finally:
                self._active.discard(sub)
        return resp

    async def _pump(self, request: web.Request, resp: web.StreamResponse,
                    sub: Subscription) -> None:
        await resp.write(b": nodemesh flow events\n\n")
        while not sub.closed:
            batch, lost = await sub.next_batch(timeout=self.keepalive)
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            parts = [f"event: dropped\ndata: {json.dumps({'dropped': lost})}\n\n"] if lost else []
            parts += [f"data: {rec.to_json()}\n\n" for rec in batch]
            try:
                await resp.write("".join(parts).encode() if parts else b": keepalive\n\n")
            except ConnectionError:
                return

    async def close_followers(self, _app: web.Application | None = None) -> None:
        for sub in list(self._active):
            sub.close()


def add_routes(app: web.Application, hub: FlowHub) -> FlowEvents:
    """Mount the flow map (/ui/) and its event stream (/flows/events) on an admin app."""
    events = FlowEvents(hub)

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.Response(body=_asset(name), content_type=ASSETS[name],
                            headers={"Content-Security-Policy": CSP,
                                     "X-Content-Type-Options": "nosniff",
                                     "Cache-Control": "no-store"})

    async def to_ui(_req: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    app.router.add_get("/ui", to_ui)
    app.router.add_get("/ui/", asset)
    app.router.add_get("/ui/{name}", asset)
    app.router.add_get("/flows/events", events.handle)
    app.on_shutdown.append(events.close_followers)
    return events
