"""The metrics endpoint on port 15020: `/metrics` and Istio's `/stats/prometheus`, same content.

Exposition runs in a worker thread: scrape-time readers make BPF map syscalls and a large registry
takes milliseconds to render, which must not stall the event loop that relays traffic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

# All addresses: Prometheus scrapes the node from outside.
DEFAULT_HOST: Final = "0.0.0.0"
DEFAULT_PORT: Final = 15020
PATHS: Final = ("/metrics", "/stats/prometheus")


def metrics_handler(
        registry: CollectorRegistry) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler rendering `registry`, negotiating OpenMetrics from the Accept header."""

    async def handle(request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = await asyncio.get_running_loop().run_in_executor(None, encode, registry)
        resp = web.Response(body=body)
        # Set the header verbatim: aiohttp's content_type= would drop the version parameter.
        resp.headers["Content-Type"] = content_type
        return resp

    return handle


def add_routes(app: web.Application, registry: CollectorRegistry) -> None:
    handler = metrics_handler(registry)
    for path in PATHS:
        app.router.add_get(path, handler)


class MetricsServer:
    """Serves `registry` on host:port until `stop`. Port 0 picks a free port (see `port`)."""

    def __init__(self, registry: CollectorRegistry, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT) -> None:
        self.host, self.port = host, port
        app = web.Application()
        add_routes(app, registry)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> tuple[str, int]:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise OSError(e.errno, f"cannot serve metrics on {self.host}:{self.port}: "
                                   f"{e.strerror} (is another agent or ztunnel running?)") from e
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        log.info("metrics on http://%s:%d%s", self.host, self.port, PATHS[0])
        return self.host, self.port

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
