"""Admin (localhost: /config_dump, /flows, /posture, /ui/) and readiness (/healthz/ready, /healthz)
endpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from agent.telemetry.stream import FlowHub
from agent.telemetry.stream import add_routes as add_flow_routes
from agent.telemetry.webui import add_routes as add_flow_map_routes


def admin_app(dump: Callable[[], dict[str, Any]], hub: FlowHub,
              posture: Callable[[], dict[str, Any]] | None = None) -> web.Application:
    app = web.Application()

    async def config_dump(_req: web.Request) -> web.Response:
        return web.json_response(dump(), dumps=lambda o: json.dumps(o, default=str, indent=2))

    app.router.add_get("/config_dump", config_dump)
    add_flow_routes(app, hub)
    add_flow_map_routes(app, hub)  # /ui/: the live flow map, fed by /flows/events
    if posture is not None:  # GET /posture: `nodemesh posture` against this agent

        async def posture_report(_req: web.Request) -> web.Response:
            return web.json_response(posture(), dumps=lambda o: json.dumps(o, indent=2))

        app.router.add_get("/posture", posture_report)
    return app


def readiness_app(check: Callable[[], tuple[bool, str]],
                  health: Callable[[], dict[str, Any]] | None = None) -> web.Application:
    """/healthz/ready for probes: 200 or 503, with the reason in the body; /healthz always
    answers 200 with details (`health()`), such as a rejected configuration that left the last
    good one in force."""
    app = web.Application()

    async def details(_req: web.Request) -> web.Response:
        ok, why = check()
        body = {"ready": ok, "why": why, **(health() if health is not None else {})}
        return web.json_response(body, dumps=lambda o: json.dumps(o, default=str, indent=2))

    async def healthz(_req: web.Request) -> web.Response:
        ok, why = check()
        return web.Response(status=200 if ok else 503, text=f"{why}\n")

    app.router.add_get("/healthz/ready", healthz)
    app.router.add_get("/healthz", details)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
