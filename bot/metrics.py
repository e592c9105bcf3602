"""The bot's Prometheus metrics, and the record of one handled message: counted, timed and logged once."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

from bot.messages import Incoming

log = logging.getLogger("bot.turns")

# Seconds: a command answers in milliseconds, a long reply on a busy CPU takes a minute.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)

OK = "ok"
TIMEOUT = "timeout"
CANCELLED = "cancelled"  # the platform went away or the bot stopped: not the user's fault, not ours


class Metrics:
    """Every metric the bot serves at /metrics, on one registry that the caller owns.

    Made in run_bot.py and handed to SessionManager (which records each message) and
    the adapters (which count the platforms' rate limits).
    """

    def __init__(self, registry: CollectorRegistry, *, log_content: bool = False) -> None:
        self.registry = registry
        self.log_content = log_content
        by_platform = ["platform"]
        self.received = Counter(
            "bot_messages_received", "Messages that reached the core, by platform", by_platform, registry=registry
        )
        self.answered = Counter(
            "bot_messages_answered",
            "Messages answered normally (a model reply or a command's answer), by platform",
            by_platform,
            registry=registry,
        )
        self.errors = Counter(
            "bot_errors",
            "Messages not answered normally, by platform and kind: invalid, busy, failed, refused, duplicate, timeout",
            ["platform", "kind"],
            registry=registry,
        )
        self.latency = Histogram(
            "bot_reply_latency_seconds",
            "Time from a chat message's arrival to the end of its reply",
            by_platform,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "bot_time_to_first_token_seconds",
            "Time from a chat message's arrival to the first piece of its reply",
            by_platform,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "bot_tokens_generated", "Reply tokens generated, by platform", by_platform, registry=registry
        )
        self.token_rate = Histogram(
            "bot_tokens_per_second",
            "Decoding speed of each reply: tokens after the first per second after the first",
            buckets=RATE_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge("bot_queue_depth", "Requests waiting for the inference engine", registry=registry)
        self.active_conversations = Gauge(
            "bot_active_conversations",
            "Places (a DM, channel or thread) with a message being answered or waiting",
            registry=registry,
        )
        self.rate_limited = Counter(
            "bot_platform_rate_limited",
            "Platform API calls answered 429 (rate limited), by platform",
            by_platform,
            registry=registry,
        )
        ProcessCollector(registry=registry)  # memory, CPU time, open files of this process
        PlatformCollector(registry=registry)

    def watch_load(self, queue_depth: Callable[[], float], active_conversations: Callable[[], float]) -> None:
        """Read the engine's queue and the busy places when scraped, so they are never stale."""
        self.queue_depth.set_function(queue_depth)
        self.active_conversations.set_function(active_conversations)

    def rate_limit_hit(self, platform: str) -> None:
        self.rate_limited.labels(platform).inc()

    def turn(self, msg: Incoming) -> TurnRecord:
        """Count msg as received and start its clock."""
        self.received.labels(msg.platform).inc()
        return TurnRecord(self, msg)


class TurnRecord:
    """One message on its way through the core; finished once, wherever its turn ends."""

    def __init__(self, metrics: Metrics, msg: Incoming) -> None:
        self._metrics = metrics
        self._msg = msg
        self._started = time.perf_counter()
        self._first: float | None = None
        self.finished = False

    def first_piece(self) -> None:
        """The model's first text for this message arrived."""
        if self._first is None:
            self._first = time.perf_counter()
            self._metrics.first_token.labels(self._msg.platform).observe(self._first - self._started)

    def finish(self, outcome: str) -> None:
        """A message answered without the model: a command, a refusal, an invalid or duplicate message."""
        if not self.finished:
            self._close(outcome, time.perf_counter(), tokens=0, reply=None)

    def replied(self, outcome: str, *, tokens: int, reply: str) -> None:
        """A model reply ended: ok, timeout, busy, failed or cancelled, after `tokens` tokens."""
        if self.finished:
            return
        now = time.perf_counter()
        m, platform = self._metrics, self._msg.platform
        m.latency.labels(platform).observe(now - self._started)
        m.tokens.labels(platform).inc(tokens)
        if self._first is not None and tokens > 1 and now > self._first:
            m.token_rate.observe((tokens - 1) / (now - self._first))
        self._close(outcome, now, tokens=tokens, reply=reply)

    def _close(self, outcome: str, now: float, *, tokens: int, reply: str | None) -> None:
        self.finished = True
        m, msg = self._metrics, self._msg
        if outcome == OK:
            m.answered.labels(msg.platform).inc()
        elif outcome != CANCELLED:
            m.errors.labels(msg.platform, outcome).inc()
        fields: dict[str, object] = {
            "platform": msg.platform,
            "user": user_hash(msg),
            "latency_ms": round((now - self._started) * 1000),
            "tokens": tokens,
            "outcome": outcome,
        }
        if m.log_content:
            fields["text"] = msg.text
            if reply is not None:
                fields["reply"] = reply
        log.info("message handled", extra=fields)


def user_hash(msg: Incoming) -> str:
    """A stable pseudonym for the sender, so log lines of one user can be found without storing their id."""
    key = f"{msg.platform}:{msg.workspace_id}:{msg.user_id}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]
