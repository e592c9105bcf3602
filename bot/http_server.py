"""The bot's one HTTP listener: /healthz, /readyz and /metrics, and the routes adapters mount (Slack's events)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bot.health import Readiness

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpServerError(Exception):
    """The server cannot listen where BOT_HTTP_HOST and BOT_HTTP_PORT say; the admin must pick another."""


class HttpServer:
    """An aiohttp server on host:port. Routes are added before start(): aiohttp fixes them when it starts."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.app = web.Application()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        self.app.router.add_route(method, path, handler)

    def add_health(self, readiness: Readiness, registry: CollectorRegistry) -> None:
        """Mount /healthz (the process answers), /readyz (it can do its work) and /metrics (Prometheus text)."""
        self.add_route("GET", "/healthz", _healthz)
        self.add_route("GET", "/readyz", _readyz(readiness))
        self.add_route("GET", "/metrics", _metrics(registry))

    async def start(self) -> None:
        """Listen; HttpServerError names the settings when the address is taken or not ours."""
        # No access log: a scraper asks every few seconds, which would bury the bot's own lines.
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            await self.stop()
            problem = f"cannot listen on BOT_HTTP_HOST:BOT_HTTP_PORT={self.host}:{self.port}: {exc.strerror}"
            raise HttpServerError(problem) from exc
        log.info("HTTP server listening on %s", self.url)

    async def stop(self) -> None:
        """Stop listening; safe to call twice."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def _readyz(readiness: Readiness) -> Handler:
    async def readyz(request: web.Request) -> web.Response:
        problems = await readiness.problems()
        if problems:
            return web.Response(status=503, text="".join(f"{problem}\n" for problem in problems))
        return web.Response(text="ready\n")

    return readyz


def _metrics(registry: CollectorRegistry) -> Handler:
    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics
