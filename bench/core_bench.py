"""The session manager's own overhead per message: everything except generation.

Each message goes through the whole core (access, rate limit, ordering, event id,
user and conversation, history, prompt with the real tokenizer, storing both turns,
usage). Generation is replaced by an engine that answers a fixed reply at once, so
what is timed is the core itself. Prints p50/p95 per message for 1 and 50 concurrent
users on SQLite, and on PostgreSQL when a URL is given or TEST_DATABASE_URL is set.

    python bench/core_bench.py [--messages 400] [--postgres postgresql+asyncpg://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bot.config import SHIPPED_MODEL, Settings  # noqa: E402
from bot.messages import Incoming  # noqa: E402
from bot.sessions import SessionManager  # noqa: E402
from model.checkpoint import LoadedModel, load_model  # noqa: E402
from model.generate import SamplingParams  # noqa: E402
from storage.db import make_engine, make_session_factory, migrate  # noqa: E402
from storage_bench import temporary_postgres  # noqa: E402


REPLY = "That is a fine question, and here is a short answer to it."


class InstantEngine:
    """Stands in for the inference engine: the shipped model's tokenizer, no generation."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.context_size = loaded.config.block_size

    async def stream(self, prompt_ids: list[int], params: SamplingParams, cache_key: str | None = None) -> AsyncIterator[str]:
        yield REPLY


@asynccontextmanager
async def scratch_database(url: str) -> AsyncIterator[str]:
    """A new, empty database beside the one url names (dropped afterwards), so a benchmark never touches real data."""
    if url.startswith("sqlite"):
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite+aiosqlite:///{tmp}/bench.db"
    else:
        async with temporary_postgres(url) as scratch:
            yield scratch


async def run(server_url: str, users: int, messages: int, loaded: LoadedModel) -> list[float]:
    async with scratch_database(server_url) as url:
        return await _run(url, users, messages, loaded)


async def _run(url: str, users: int, messages: int, loaded: LoadedModel) -> list[float]:
    db = make_engine(url, pool_size=min(users, 20), max_overflow=0)
    await migrate(db)
    settings = Settings(_env_file=None, database_url=url, rate_limit="0/minute", max_waiting_per_user=1000)
    manager = SessionManager(settings, make_session_factory(db), InstantEngine(loaded))  # type: ignore[arg-type]
    latencies: list[float] = []

    async def user(n: int) -> None:
        for i in range(messages // users):
            incoming = Incoming(platform="discord", user_id=f"u{n}", display_name=f"User {n}",
                                text=f"message {i}: how are you today?", event_id=f"{n}-{i}")
            start = time.perf_counter()
            reply = await manager.handle(incoming)
            await reply.collect()
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(user(n) for n in range(users)))
    await manager.close()
    await db.dispose()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=400, help="messages per run (default 400)")
    parser.add_argument("--postgres", default=os.environ.get("TEST_DATABASE_URL"), help="a PostgreSQL URL to measure too")
    args = parser.parse_args()
    loaded = load_model(SHIPPED_MODEL)
    backends = {"SQLite": "sqlite"}
    if args.postgres:
        backends["PostgreSQL"] = args.postgres
    print(f"core overhead per message (no generation), {args.messages} messages per run")
    print(f"{'database':<11} {'users':>5} {'p50 ms':>8} {'p95 ms':>8} {'msgs/s':>8}")
    for name, url in backends.items():
        for users in (1, 50):
            start = time.perf_counter()
            latencies = asyncio.run(run(url, users, args.messages, loaded))
            elapsed = time.perf_counter() - start
            q = statistics.quantiles(latencies, n=20)
            print(f"{name:<11} {users:>5} {statistics.median(latencies) * 1e3:>8.2f} {q[18] * 1e3:>8.2f} "
                  f"{len(latencies) / elapsed:>8.0f}")


if __name__ == "__main__":
    main()
