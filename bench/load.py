"""Load and soak: N simulated users chatting with the real core, the shipped model and a real database.

Every message goes through SessionManager.handle (--through core) or, as signed Slack
Events API POSTs, through the real Slack adapter's HTTP endpoint on loopback, whose Web API
client talks to the fake Slack of tests/fakes/slack_api.py (--through slack); there a
message is done when the adapter has written the reply's last chat.postMessage/chat.update
(so it includes the adapter's throttle of one chat.update per second).
Each user keeps one conversation, so history, the prompt window and KV reuse are exercised.
The database is a scratch one (a temporary SQLite file, or a temporary PostgreSQL database
dropped afterwards); data/bot.db is never touched. Users send after each reply and a think
time (closed loop), or --rate messages per second arrive in total (open loop).

Prints a row at the start, after --warmup seconds and every --every seconds (memory over
time), then throughput, latency, time to first token (when the core produced the reply's
first text, in both modes), errors by kind and RSS measured over --seconds after warm-up.
Soak criterion: no errors, and RSS at the end at most 10% above RSS after warm-up (exit 1 if not).

    python bench/load.py --database sqlite --users 20 --seconds 600 --rate 4
    python bench/load.py --database postgres --postgres postgresql+asyncpg://postgres@127.0.0.1:5432/test \\
        --users 20 --seconds 600 --rate 4
    python bench/load.py --database sqlite --through slack --users 20 --seconds 600 --rate 4
    python bench/load.py --database sqlite --users 4 --seconds 10 --warmup 3   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

from bot.config import Settings  # noqa: E402
from bot.messages import Incoming, Reply  # noqa: E402
from bot.metrics import Metrics  # noqa: E402
from bot.sessions import SessionManager  # noqa: E402
from bot.slack_adapter import EVENTS_PATH, SlackAdapter, slack_client  # noqa: E402
from core_bench import scratch_database  # noqa: E402
from model.checkpoint import LoadedModel, load_model  # noqa: E402
from model.engine import InferenceEngine, leave_threads_to_the_engine  # noqa: E402
from run_bot import engine_options  # noqa: E402
from storage.db import make_engine, make_session_factory, migrate  # noqa: E402
from storage.turn_locks import TurnLocks  # noqa: E402
from tests.fakes.slack_api import FakeSlack  # noqa: E402

log = logging.getLogger("bench.load")

SOAK_RSS_GROWTH = 10.0  # percent of RSS after warm-up that the soak may add by its end
LOST_AFTER = 300.0  # seconds after which a Slack event that never reached the core counts as lost
LINES = [
    "hi there, how are you today?", "what did you do this weekend?", "I just got back from a long walk.",
    "do you like music?", "what is your favourite food?", "it is raining here again.",
    "I am thinking about learning to cook.", "have you read any good books lately?", "tell me about your day.",
    "I love going to the beach in summer.", "my cat keeps waking me up at night.", "what do you do for fun?",
    "I started a new job last week.", "do you have any pets?", "the weather is lovely today.",
    "what kind of movies do you like?", "I am a bit tired today.", "do you like to travel?",
    "I went hiking in the mountains.", "what are your plans for tonight?", "I play the guitar a little.",
    "coffee or tea?", "I am learning to speak Spanish.", "that sounds like fun!", "why do you think so?",
]


@dataclass
class Turn:
    """One message's clock (perf_counter seconds): sent, first piece of the reply, reply complete."""

    sent: float
    first: float | None = None
    done: float = 0.0
    refused: bool = False  # answered with an ErrorKind (busy, ...) instead of a reply: counted as an error only


Send = Callable[[int, int, str], Awaitable[Turn]]  # (user, message number, text) -> the finished turn


async def timed(pieces: AsyncIterator[str], turn: Turn) -> AsyncIterator[str]:
    """The reply's pieces, passed on unchanged, noting when the first arrived."""
    async for piece in pieces:
        if turn.first is None:
            turn.first = time.perf_counter()
        yield piece


def memory_mib() -> tuple[float, float]:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), in MiB; Linux only."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def counter_total(counter: Collector, label: str | None = None) -> Counter[str]:
    """A Prometheus counter's values summed by one label (or all under ""), read through its public collect()."""
    totals: Counter[str] = Counter()
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                totals[sample.labels[label] if label else ""] += int(sample.value)
    return totals


@dataclass
class Load:
    """What the run has seen: every answered message's clock, and failures the bench met itself."""

    metrics: Metrics
    started: float = field(default_factory=time.perf_counter)
    turns: list[Turn] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    row_at: float = field(default_factory=time.perf_counter)

    def errors(self) -> Counter[str]:
        """Errors by kind: the core's (ErrorKind values and timeouts) plus exceptions and refused POSTs."""
        return counter_total(self.metrics.errors, "kind") + self.failures

    def tokens(self) -> int:
        return counter_total(self.metrics.tokens)[""]

    async def one(self, send: Send, user: int, number: int) -> None:
        """Send one message and record its outcome; an exception is an error of its own kind, never fatal."""
        try:
            turn = await send(user, number, LINES[(user * 7 + number) % len(LINES)])
        except Exception as exc:
            if not self.failures[type(exc).__name__]:
                log.warning("user %d, message %d failed", user, number, exc_info=exc)
            self.failures[type(exc).__name__] += 1
        else:
            if not turn.refused:
                self.turns.append(turn)

    def row(self, phase: str) -> float:
        """Print one progress row (rate and p95 since the last row) and return the RSS now."""
        now = time.perf_counter()
        recent = [t.done - t.sent for t in self.turns if t.done >= self.row_at]
        rate = len(recent) / (now - self.row_at) if now > self.row_at else 0.0
        rss, peak = memory_mib()
        print(f"{phase:<8} {now - self.started:>9.0f} {len(self.turns):>7} {rate:>7.2f} {percentile(recent, 95):>7.2f} "
              f"{sum(self.errors().values()):>7} {rss:>8.0f} {peak:>8.0f}", flush=True)
        self.row_at = now
        return rss


def core_sender(manager: SessionManager) -> Send:
    """Messages straight into the core, as an adapter would hand them over; the reply is read to its end."""

    async def send(user: int, number: int, text: str) -> Turn:
        msg = Incoming(platform="discord", user_id=f"u{user}", display_name=f"User {user}", text=text,
                       event_id=f"{user}-{number}")
        turn = Turn(time.perf_counter())
        reply = await manager.handle(msg)
        turn.refused = reply.error is not None
        async for _ in timed(reply.pieces, turn):
            pass
        turn.done = time.perf_counter()
        return turn

    return send


class SlackRefused(Exception):
    """The bot's Slack endpoint answered a signed event with a status other than 200."""


class SlackTap:
    """The core as the Slack adapter sees it: notes when each event's reply begins and which task shows it."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.waiting: dict[str, tuple[Turn, asyncio.Future[asyncio.Task[Any]]]] = {}

    async def handle(self, msg: Incoming) -> Reply:
        turn, shown = self.waiting.pop(msg.event_id)
        task = asyncio.current_task()  # bolt's listener task: it ends once the reply is written to Slack
        assert task is not None
        if not shown.done():  # done only when the bench gave up waiting (LOST_AFTER)
            shown.set_result(task)
        reply = await self.manager.handle(msg)
        turn.refused = reply.error is not None
        return replace(reply, pieces=timed(reply.pieces, turn))


def slack_event(user: int, number: int, text: str) -> dict[str, Any]:
    """Even users write in a DM (message.im); odd ones mention the bot in a channel thread of their own."""
    ts, who = f"{1000 + user}.{number + 1:06d}", f"U{user:05d}"
    if user % 2 == 0:
        return {"type": "message", "channel_type": "im", "channel": "D" + who, "user": who, "text": text, "ts": ts}
    return {"type": "app_mention", "channel": "C0LOAD", "user": who, "text": f"<@UBOT> {text}", "ts": ts,
            "thread_ts": f"{1000 + user}.000000"}


def slack_sender(slack: FakeSlack, tap: SlackTap, url: str) -> Send:
    """Signed event POSTs to the bot; a message is done when the adapter has finished writing its reply."""

    async def send(user: int, number: int, text: str) -> Turn:
        event_id = f"Ev{user}x{number}"
        turn = Turn(time.perf_counter())
        shown: asyncio.Future[asyncio.Task[Any]] = asyncio.get_running_loop().create_future()
        tap.waiting[event_id] = (turn, shown)
        sent = await slack.send_event(url, slack_event(user, number, text), event_id=event_id)
        if sent.status != 200:
            tap.waiting.pop(event_id, None)
            raise SlackRefused(f"HTTP {sent.status}: {sent.body[:200]}")
        await asyncio.wait({await asyncio.wait_for(shown, LOST_AFTER)})
        turn.done = time.perf_counter()
        slack.calls.clear()  # the fake records every call for tests; over a soak that would count as the bot's memory
        return turn

    return send


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def drive(load: Load, send: Send, args: argparse.Namespace, deadline: float) -> None:
    """Send until the deadline, then wait for every reply: closed loop, or open loop at --rate."""
    if args.rate is None:

        async def user(n: int) -> None:
            await asyncio.sleep(args.think * n / args.users)  # spread the first messages over one think time
            number = 0
            while time.perf_counter() < deadline:
                await load.one(send, n, number)
                number += 1
                await asyncio.sleep(args.think)

        await asyncio.gather(*(user(n) for n in range(args.users)))
        return
    tasks: set[asyncio.Task[None]] = set()
    start, sent = time.perf_counter(), 0
    while (due := start + sent / args.rate) < deadline:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        task = asyncio.create_task(load.one(send, sent % args.users, sent // args.users))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    await asyncio.gather(*tasks)


async def run(args: argparse.Namespace, loaded: LoadedModel) -> bool:
    """One load run on a scratch database; True when it passes the soak criterion."""
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(scratch_database(args.postgres or "sqlite"))
        slack = await stack.enter_async_context(FakeSlack()) if args.through == "slack" else None
        platform = {} if slack is None else {
            "slack_bot_token": slack.bot_token, "slack_signing_secret": slack.signing_secret,
            "slack_api_url": slack.api_url, "http_port": free_port(),
        }
        settings = Settings(_env_file=None, database_url=url, rate_limit="0/minute",
                            max_reply_tokens=args.reply_tokens, **platform)
        pool = {"pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow,
                "pool_timeout": settings.db_pool_timeout}
        db = make_engine(url, **pool)
        stack.push_async_callback(db.dispose)
        await migrate(db)
        turn_locks = TurnLocks.for_database(url, **pool)
        stack.push_async_callback(turn_locks.close)
        engine = InferenceEngine(loaded, **engine_options(settings))
        stack.callback(engine.close)
        metrics = Metrics(CollectorRegistry())
        manager = SessionManager(settings, make_session_factory(db), engine, metrics=metrics, turn_locks=turn_locks)
        stack.push_async_callback(manager.close)
        if slack is None:
            send = core_sender(manager)
        else:
            tap = SlackTap(manager)
            adapter = SlackAdapter(tap, settings, slack_client(settings))  # type: ignore[arg-type]
            await adapter.start()
            stack.push_async_callback(adapter.stop)
            send = slack_sender(slack, tap, f"http://127.0.0.1:{settings.http_port}{EVENTS_PATH}")

        loop_kind = f"open loop at {args.rate:g} msgs/s" if args.rate else f"closed loop, think {args.think:g} s"
        print(f"{args.users} users, {loop_kind}, through {args.through}, {args.database}, "
              f"{args.reply_tokens} reply tokens, max_batch {settings.max_batch}, {os.cpu_count()} CPUs")
        print(f"{'phase':<8} {'elapsed s':>9} {'msgs':>7} {'msgs/s':>7} {'p95 s':>7} {'errors':>7} "
              f"{'RSS MiB':>8} {'peak MiB':>8}")
        load = Load(metrics)
        load.row("start")
        driver = asyncio.create_task(drive(load, send, args, time.perf_counter() + args.warmup + args.seconds))
        await asyncio.wait({driver}, timeout=args.warmup)
        warm_at, warm_tokens, warm_rss = time.perf_counter(), load.tokens(), load.row("warm-up")
        while not driver.done():
            await asyncio.wait({driver}, timeout=args.every)
            if not driver.done():
                load.row("run")
        await driver
        end_rss = load.row("end")
        return summary(load, warm_at, warm_tokens, warm_rss, end_rss)


def summary(load: Load, warm_at: float, warm_tokens: int, warm_rss: float, end_rss: float) -> bool:
    """Print what the messages sent after warm-up saw; True when the soak criterion holds."""
    span = time.perf_counter() - warm_at
    measured = [t for t in load.turns if t.sent >= warm_at]
    latency = [t.done - t.sent for t in measured]
    first = [t.first - t.sent for t in measured if t.first is not None]
    errors = load.errors()
    growth = (end_rss - warm_rss) / warm_rss * 100
    _, peak = memory_mib()
    passed = not errors and growth <= SOAK_RSS_GROWTH
    print(f"\nafter warm-up: {len(measured)} messages answered in {span:.0f} s")
    tokens_per_second = (load.tokens() - warm_tokens) / span
    print(f"{'throughput':<14} {len(measured) / span:>8.2f} msgs/s {tokens_per_second:>9.1f} tokens/s")
    print(f"{'latency s':<14} p50 {percentile(latency, 50):>6.2f}  p95 {percentile(latency, 95):>6.2f}  "
          f"p99 {percentile(latency, 99):>6.2f}")
    print(f"{'first token s':<14} p50 {percentile(first, 50):>6.2f}  p95 {percentile(first, 95):>6.2f}")
    print(f"{'errors':<14} {', '.join(f'{kind} {n}' for kind, n in sorted(errors.items())) or 'none'} (whole run)")
    print(f"{'RSS MiB':<14} after warm-up {warm_rss:.0f}, end {end_rss:.0f} ({growth:+.1f}%), peak {peak:.0f}")
    print(f"{'soak':<14} {'PASS' if passed else 'FAIL'} (RSS growth after warm-up <= {SOAK_RSS_GROWTH:g}%, no errors)")
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres", default=os.environ.get("TEST_DATABASE_URL"),
                        help="PostgreSQL server URL for --database postgres (default: TEST_DATABASE_URL); "
                        "a scratch database is created on it and dropped afterwards")
    parser.add_argument("--through", choices=("core", "slack"), default="core")
    parser.add_argument("--users", type=int, default=20, help="simulated users (default 20)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds after warm-up (default 60)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of load before measuring (default 30)")
    parser.add_argument("--rate", type=float, help="open loop: messages per second in total (default: closed loop)")
    parser.add_argument("--think", type=float, default=1.0, help="closed loop: seconds between a reply and the "
                        "user's next message (default 1)")
    parser.add_argument("--reply-tokens", type=int, default=32, help="max_reply_tokens (default 32)")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between progress rows (default 60)")
    args = parser.parse_args()
    if args.database == "postgres" and not args.postgres:
        parser.error("--database postgres needs --postgres URL or TEST_DATABASE_URL")
    if args.database == "sqlite":
        args.postgres = None
    if args.users < 1 or (args.rate is not None and args.rate <= 0):
        parser.error("--users and --rate must be above 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    base = Settings(_env_file=None)
    leave_threads_to_the_engine()
    loaded = load_model(base.model_path, base.device)
    sys.exit(0 if asyncio.run(run(args, loaded)) else 1)


if __name__ == "__main__":
    main()
