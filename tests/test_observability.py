"""Observability end to end: /healthz, /readyz and /metrics over loopback, the log lines, and secrets kept out.

The parts are real: the session manager over the test's database, our GPT (the reciting
model, so replies are known), the HTTP server, discord.py and slack_sdk against the fakes
of tests/fakes, and run_bot.py as a subprocess.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.config import SHIPPED_MODEL, Settings
from bot.console_adapter import ConsoleAdapter
from bot.discord_adapter import DiscordAdapter
from bot.health import Readiness
from bot.http_server import HttpServer
from bot.log_setup import REDACTED, setup_logging
from bot.messages import Adapter, ErrorKind, Incoming
from bot.metrics import Metrics, user_hash
from bot.sessions import SessionManager
from bot.slack_adapter import EVENTS_PATH, SlackAdapter, slack_client
from fakes.discord_server import TOKEN, FakeDiscord
from fakes.reciting_model import recital, reciting_model
from fakes.slack_api import FakeSlack
from model.checkpoint import LoadedModel
from model.engine import InferenceEngine
from storage.db import make_engine, make_session_factory
from storage.models import Message

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ["Hello", " there", ",", " friend", "."]
REPLY_TOKENS = 6
MISSING_POSTGRES = "postgresql+asyncpg://nobody@127.0.0.1:1/none"  # nothing listens on port 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reciting() -> LoadedModel:
    return reciting_model(SCRIPT)


@dataclass
class Core:
    settings: Settings
    db: AsyncEngine
    engine: InferenceEngine
    metrics: Metrics
    manager: SessionManager


Build = Callable[..., Core]


@pytest.fixture
async def build(db_url: str, reciting: LoadedModel) -> AsyncIterator[Build]:
    """Builds the core (settings, database, engine, metrics, session manager); closes everything afterwards."""
    async with AsyncExitStack() as stack:

        def make(*, metrics: Metrics | None = None, **overrides: Any) -> Core:
            values = {"database_url": db_url, "max_reply_tokens": REPLY_TOKENS, "rate_limit": "0/minute"}
            settings = Settings(_env_file=None, **{**values, **overrides})
            db = make_engine(db_url)
            stack.push_async_callback(db.dispose)
            engine = InferenceEngine(reciting)
            stack.callback(engine.close)
            manager = SessionManager(settings, make_session_factory(db), engine, metrics=metrics)
            stack.push_async_callback(manager.close)
            return Core(settings, db, engine, manager.metrics, manager)

        yield make


Serve = Callable[..., Awaitable[HttpServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts an HTTP server with the health routes on a free port; stops it afterwards."""
    async with AsyncExitStack() as stack:

        async def start(
            core: Core, adapters: list[Adapter], *, server: HttpServer | None = None, db: AsyncEngine | None = None
        ) -> HttpServer:
            server = server or HttpServer("127.0.0.1", free_port())
            server.add_health(Readiness(db or core.db, core.manager, adapters), core.metrics.registry)
            await server.start()
            stack.push_async_callback(server.stop)
            return server

        yield start


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page by name and labels, read with prometheus-client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return page.get((name, frozenset(labels.items())))


def console_message(text: str, user: str = "ann") -> Incoming:
    return Incoming(platform="console", user_id=user, display_name=user, text=text)


async def say(manager: SessionManager, msg: Incoming) -> str:
    return await (await manager.handle(msg)).collect()


def quiet_console(manager: SessionManager) -> ConsoleAdapter:
    return ConsoleAdapter(manager, stdin=io.StringIO(), stdout=io.StringIO(), user="ann")


# Health, readiness and metrics


async def test_healthz_readyz_and_metrics_after_messages_went_through(build: Build, serve: Serve) -> None:
    core = build()
    server = await serve(core, [quiet_console(core.manager)])
    assert await get(server.url + "/healthz") == (200, "ok\n")
    assert await get(server.url + "/readyz") == (200, "ready\n")

    assert await say(core.manager, console_message("hello")) == recital(SCRIPT, REPLY_TOKENS).strip()
    assert "/help" in await say(core.manager, console_message("/help"))
    await say(core.manager, console_message("   "))  # empty: invalid

    status, text = await get(server.url + "/metrics")
    assert status == 200
    page = samples(text)
    console = {"platform": "console"}
    assert value(page, "bot_messages_received_total", **console) == 3
    assert value(page, "bot_messages_answered_total", **console) == 2
    assert value(page, "bot_errors_total", **console, kind=ErrorKind.INVALID.value) == 1
    async with make_session_factory(core.db)() as session:
        stored = await session.scalar(select(Message.token_count).where(Message.role == "bot"))
    assert value(page, "bot_tokens_generated_total", **console) == stored == REPLY_TOKENS
    assert value(page, "bot_reply_latency_seconds_count", **console) == 1
    assert value(page, "bot_time_to_first_token_seconds_count", **console) == 1
    assert value(page, "bot_tokens_per_second_count") == 1
    assert value(page, "bot_queue_depth") == 0
    assert value(page, "bot_active_conversations") == 0
    assert "process_resident_memory_bytes" in text


async def test_readyz_is_503_with_the_reasons_when_a_part_is_not_ready(build: Build, serve: Serve) -> None:
    core = build(DISCORD_TOKEN=TOKEN)
    gone = make_engine(MISSING_POSTGRES)
    try:
        never_connected = DiscordAdapter(core.manager, core.settings)
        server = await serve(core, [quiet_console(core.manager), never_connected], db=gone)
        status, body = await get(server.url + "/readyz")
        assert status == 503
        lines = body.splitlines()
        assert [line.split(":")[0] for line in lines] == ["database", "discord"], body
        assert lines[1] == "discord: not connected"
        assert await get(server.url + "/healthz") == (200, "ok\n"), "alive all the same"

        core.engine.close()
        status, body = await get(server.url + "/readyz")
        assert status == 503 and "model: the inference engine is not running" in body
    finally:
        await gone.dispose()


async def test_readyz_is_503_shutting_down_once_the_core_shuts_down(build: Build, serve: Serve) -> None:
    core = build()
    server = await serve(core, [quiet_console(core.manager)])
    assert await get(server.url + "/readyz") == (200, "ready\n")
    await core.manager.shutdown(grace=1.0)
    assert await get(server.url + "/readyz") == (503, "shutting down\n"), "load balancers stop sending work"
    assert await get(server.url + "/healthz") == (200, "ok\n"), "alive until it has finished"


async def test_slack_mounts_its_events_on_the_shared_server_and_429s_are_counted(build: Build, serve: Serve) -> None:
    async with FakeSlack() as slack:
        core = build(
            slack_bot_token=slack.bot_token, slack_signing_secret=slack.signing_secret, slack_api_url=slack.api_url
        )
        server = HttpServer("127.0.0.1", free_port())
        adapter = SlackAdapter(
            core.manager, core.settings, slack_client(core.settings, core.metrics), update_interval=0.05, http=server
        )
        await serve(core, [adapter], server=server)
        assert await get(server.url + "/readyz") == (503, "slack: not connected\n"), "not before it has signed in"
        await adapter.start()
        try:
            assert await get(server.url + "/readyz") == (200, "ready\n")
            slack.rate_limit_next("chat.postMessage")
            dm = {"type": "message", "channel_type": "im", "channel": "DANN", "user": "UANN", "text": "hi", "ts": "1.1"}
            sent = await slack.send_event(server.url + EVENTS_PATH, dm, event_id="Ev1")
            assert sent.status == 200
            [post] = await slack.wait_for("chat.postMessage")  # the call after the 429
            assert post.args["channel"] == "DANN"
        finally:
            await adapter.stop()
        page = samples((await get(server.url + "/metrics"))[1])
        assert value(page, "bot_platform_rate_limited_total", platform="slack") == 1
        assert value(page, "bot_messages_received_total", platform="slack") == 1


async def test_discord_reports_its_connection_and_its_429s_are_counted(build: Build) -> None:
    async with FakeDiscord() as discord:
        core = build(DISCORD_TOKEN=TOKEN, DISCORD_API_BASE=discord.api_base, DISCORD_GATEWAY_URL=discord.gateway_url)
        adapter = DiscordAdapter(core.manager, core.settings, edit_interval=0.05)
        assert not await adapter.connected()
        task = asyncio.create_task(adapter.run())
        try:
            async with asyncio.timeout(20):
                while not await adapter.connected():
                    await asyncio.sleep(0.05)
            path = f"/channels/{discord.channel_id}/messages"
            discord.rate_limit_next("POST", path)
            bot = FakeDiscord.BOT
            await discord.post_message(FakeDiscord.ANN, f"<@{bot['id']}> hello", mentions=[bot])
            await discord.wait_for(lambda: len(discord.find_calls("POST", path)) == 2)  # 429, then the retry
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert not await adapter.connected()
        assert core.metrics.registry.get_sample_value("bot_platform_rate_limited_total", {"platform": "discord"}) == 1


# Logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging configures the process's root logger; put back what pytest had."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.usefixtures("restore_logging")
async def test_json_lines_for_every_record_with_a_line_per_message_and_no_content(build: Build) -> None:
    core = build(log_format="json", log_level="INFO")
    out = io.StringIO()
    setup_logging(core.settings, out)
    await say(core.manager, console_message("my private words", user="ann-raw-id"))
    logging.getLogger("some.library").warning("a library's line")

    records = json_lines(out.getvalue())  # every line is one JSON object
    [handled] = [r for r in records if r["message"] == "message handled"]
    assert handled["logger"] == "bot.turns" and handled["level"] == "INFO"
    assert handled["platform"] == "console"
    assert handled["user"] == user_hash(console_message("", user="ann-raw-id"))
    assert handled["outcome"] == "ok" and handled["tokens"] == REPLY_TOKENS
    assert isinstance(handled["latency_ms"], int)
    assert "text" not in handled and "reply" not in handled
    assert "ann-raw-id" not in out.getvalue() and "private words" not in out.getvalue()
    assert any(r["logger"] == "some.library" for r in records)


@pytest.mark.usefixtures("restore_logging")
async def test_content_is_logged_only_when_asked(build: Build) -> None:
    core = build(log_format="text", log_level="INFO", log_content=True)
    out = io.StringIO()
    setup_logging(core.settings, out)
    await say(core.manager, console_message("my words"))
    [line] = [line for line in out.getvalue().splitlines() if "message handled" in line]
    assert "platform='console'" in line and "outcome='ok'" in line and f"tokens={REPLY_TOKENS}" in line
    assert "text='my words'" in line
    assert f"reply={recital(SCRIPT, REPLY_TOKENS).strip()!r}" in line


SECRETS = {
    "DISCORD_TOKEN": "discord-secret-1f2e3d",
    "SLACK_BOT_TOKEN": "xoxb-slack-secret-4c5b6a",
    "SLACK_SIGNING_SECRET": "signing-secret-7a8b9c",
    "SLACK_APP_TOKEN": "xapp-app-secret-0d1e2f",
}


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_are_redacted_from_messages_arguments_tracebacks_and_fields(log_format: str) -> None:
    settings = Settings(
        _env_file=None, database_url="postgresql+asyncpg://bot:db-password-55@db/bot", log_format=log_format, **SECRETS
    )
    out = io.StringIO()
    setup_logging(settings, out)
    log = logging.getLogger("test.secrets")
    log.warning("token %s in an argument, and %s in the message", SECRETS["DISCORD_TOKEN"], "x")
    log.warning(f"the signing secret {SECRETS['SLACK_SIGNING_SECRET']} in the text")
    try:
        raise RuntimeError(f"refused {SECRETS['SLACK_BOT_TOKEN']}")
    except RuntimeError:
        log.exception("a failure")
    log.warning("a field", extra={"header": f"Bearer {SECRETS['SLACK_APP_TOKEN']}"})
    log.warning("connecting to postgresql+asyncpg://bot:db-password-55@db/bot")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"a warning with {SECRETS['DISCORD_TOKEN']}")
    text = out.getvalue()
    for secret in [*SECRETS.values(), "db-password-55"]:
        assert secret not in text
    assert text.count(REDACTED) == 6
    if log_format == "json":
        assert len(json_lines(text)) == 6


# The whole program


async def test_run_bot_serves_metrics_and_never_prints_a_secret(tmp_path: Path) -> None:
    """run_bot.py as an admin starts it: secrets in the environment, DEBUG logs, the terminal chat in a pipe."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BOT_", "SLACK_", "DISCORD_"))}
    env = {
        **base,
        **SECRETS,
        "BOT_LOG_LEVEL": "DEBUG",
        "BOT_LOG_FORMAT": "json",
        "BOT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
        "BOT_HTTP_PORT": str(port),
        "BOT_MAX_REPLY_TOKENS": "8",
        "BOT_MODEL_PATH": str(SHIPPED_MODEL),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run_bot.py"), "--adapter", "console",
        env=env, cwd=tmp_path,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        url = f"http://127.0.0.1:{port}"
        async with asyncio.timeout(120):
            while True:  # the model loads and the database is migrated first
                try:
                    if (await get(url + "/readyz"))[0] == 200:
                        break
                except aiohttp.ClientConnectionError:
                    pass
                if process.returncode is not None:
                    break
                await asyncio.sleep(0.2)
            process.stdin.write(b"hello\n")
            await process.stdin.drain()
            answer = await process.stdout.readline()
        assert answer.strip(), "the terminal chat answered in one line"
        status, text = await get(url + "/metrics")
        assert status == 200
        assert value(samples(text), "bot_messages_received_total", platform="console") == 1
    finally:
        process.stdin.close()
        out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()[-4000:]
    everything = (answer + out + err).decode()
    for name, secret in SECRETS.items():
        assert secret not in everything, f"{name} was printed"
    records = json_lines(err.decode())  # every line on standard error is a JSON log record
    assert any(r["message"] == "message handled" for r in records)
    assert any(r["message"].startswith("HTTP server listening on") for r in records)
