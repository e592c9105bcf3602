"""The session manager: every platform's messages go through here to become stored, answered turns."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.access import Access, admitted_user, quota_for
from bot.accounts import Account
from bot.commands import CommandHandler, parse_command
from bot.config import Settings, parse_rate
from bot.identity import AccountLinking
from bot.limits import RateLimiter, Ticket, Turnstile, seconds_text
from bot.messages import ErrorKind, Incoming, Reply
from bot.metrics import CANCELLED, OK, TIMEOUT, Metrics, TurnRecord
from bot.prompt import ChatPrompt, FittedPrompt, PromptTemplate, Turn, build_prompt
from model.engine import EngineBusy, ReplyEngine
from model.generate import SamplingParams
from storage import repository
from storage.events import mark_event_processed
from storage.models import utcnow
from storage.outage import TURN_RETRY_DELAYS, is_outage, outage_reason, retrying
from storage.turn_locks import TurnLocks
from storage.usage import add_usage
from storage.user_settings import Preferences, resolve_preferences

log = logging.getLogger(__name__)

_END = object()
PROMPT_STARTS_KEPT = 10_000  # conversations whose prompt start is remembered; forgetting one costs a full prefill

# A shown reply waits this long (about 30 s in all) for the database to come back to be stored.
STORE_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
UNAVAILABLE = "I am temporarily unavailable: I cannot reach my database. Please try again shortly."
SHUTTING_DOWN = "I am shutting down for a moment. Please send that again in a minute."


@dataclass(frozen=True)
class TurnContext:
    """What one chat turn needs after its user message is stored."""

    user_id: int
    conversation_id: int
    history: list[Turn]
    preferences: Preferences
    display_name: str


class SessionManager:
    """Maps platform accounts to users, keeps their history and asks the model for replies.

    Messages of one user in one place are answered one at a time, in arrival order;
    different users and places run concurrently. Each chat reply is produced by a
    task of its own, so a reply is completed and stored even if the platform
    connection drops while it streams. With turn_locks on PostgreSQL the same order
    holds across every process sharing the database. While the database cannot be
    reached, people are told to try again shortly; shutdown() ends it all gracefully.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        engine: ReplyEngine,
        *,
        template: PromptTemplate | ChatPrompt | None = None,
        linking: AccountLinking | None = None,
        rate_limiter: RateLimiter | None = None,
        metrics: Metrics | None = None,
        turn_locks: TurnLocks | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.engine = engine
        self.template = template or _prompt_template(settings, engine)
        self.access = Access(settings)
        self.rate_limiter = rate_limiter or RateLimiter(*parse_rate(settings.rate_limit))
        self.turnstile = Turnstile(max_waiting=settings.max_waiting_per_user)
        self.commands = CommandHandler(settings, sessions, self.access, linking or AccountLinking(settings))
        self._tasks: set[asyncio.Task[None]] = set()
        self._prompt_starts: dict[int, int] = {}  # conversation id -> first message id in its last prompt
        self._chats: set[asyncio.Task[None]] = set()  # chat turns, which shutdown() may cancel (never their stores)
        self.turn_locks = turn_locks or TurnLocks()
        self.closing = False
        self.metrics = metrics or Metrics(CollectorRegistry(), log_content=settings.log_content)
        self.metrics.watch_load(lambda: engine.waiting, lambda: self.turnstile.occupied)

    async def handle(self, msg: Incoming) -> Reply:
        """The reply to one incoming message: a command's answer, a refusal, or the model's streamed text.

        Every message is counted, timed and logged once its outcome is known (see bot/metrics.py).
        """
        record = self.metrics.turn(msg)
        try:
            reply = await self._reply(msg, record)
        except Exception:
            record.finish(ErrorKind.FAILED.value)
            raise
        if reply.error is not None:  # refused before any generation; a chat reply's end is recorded by _generate
            record.finish(reply.error.value)
        return reply

    async def _reply(self, msg: Incoming, record: TurnRecord) -> Reply:
        if self.closing:
            return self._unavailable(SHUTTING_DOWN)
        text = msg.text.replace("\x00", "").strip()
        if not text:
            return Reply.text("I got an empty message. Type something, or /help.", error=ErrorKind.INVALID)
        if len(text) > self.settings.max_message_chars:
            return Reply.text(
                f"That message is {len(text):,} characters long; the limit is "
                f"{self.settings.max_message_chars:,}. Please send a shorter one.",
                error=ErrorKind.INVALID,
            )
        wait = self.rate_limiter.wait_time(Account.of(msg))
        if wait:
            return self._busy(f"You are sending messages faster than I can answer. Try again in {seconds_text(wait)}.")
        # The place in line is taken before any await, so arrival order is kept.
        ticket = self.turnstile.enter(_place_key(msg))
        if ticket is None:
            return self._busy("I am still answering your earlier messages here. Try again in a few seconds.")
        command = parse_command(text)
        if command is not None:
            try:
                async with ticket, self.turn_locks.hold(*_place_key(msg)):
                    if not await self._first_time(msg):
                        return Reply.text("", error=ErrorKind.DUPLICATE)
                    answer = await self.commands.run(command, msg)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.warning("database unreachable; a command got 'try again shortly' (%s)", outage_reason(exc))
                return self._unavailable(UNAVAILABLE)
            record.finish(answer.error.value if answer.error else OK)
            return answer
        queue: asyncio.Queue[object] = asyncio.Queue()
        task = self._track(asyncio.create_task(self._chat(msg, text, ticket, queue, record)), chat=True)
        first = await queue.get()
        if isinstance(first, Reply):  # refused or duplicate before generation began
            return first
        return Reply(pieces=self._drain(first, queue, task))

    @staticmethod
    def _busy(text: str) -> Reply:
        return Reply.text(text, ephemeral=True, error=ErrorKind.BUSY)

    @staticmethod
    def _unavailable(text: str) -> Reply:
        return Reply.text(text, ephemeral=True, error=ErrorKind.UNAVAILABLE)

    async def _first_time(self, msg: Incoming) -> bool:
        """False when the platform sent this event before (a retry): it was answered already."""
        if not msg.event_id:
            return True
        async with self.sessions() as session, session.begin():
            return await mark_event_processed(session, platform=msg.platform, event_id=msg.event_id)

    @staticmethod
    async def _drain(first: object, queue: asyncio.Queue[object], task: asyncio.Task[None]) -> AsyncIterator[str]:
        """The pieces a chat task produces; closing this early cancels the generation."""
        item = first
        try:
            while item is not _END:
                yield item  # type: ignore[misc]
                item = await queue.get()
        finally:
            if item is not _END and not task.done():
                task.cancel()

    async def _chat(
        self, msg: Incoming, text: str, ticket: Ticket, queue: asyncio.Queue[object], record: TurnRecord
    ) -> None:
        """One chat turn, in its own task: wait for the turn, store, generate, store; pieces go to queue."""
        turn: TurnContext | None = None
        try:
            async with ticket, self.turn_locks.hold(*_place_key(msg)):
                # Safe to repeat: a try that lost its connection committed nothing.
                refusal, turn = await retrying(
                    lambda: self.begin_turn(msg, text), delays=TURN_RETRY_DELAYS, what="storing a message"
                )
                if refusal is not None:
                    queue.put_nowait(refusal)
                    return
                assert turn is not None
                await self._generate(turn, text, queue, record)
        except asyncio.CancelledError:
            if turn is None and self.closing:  # shut down while it waited for its turn
                queue.put_nowait(self._unavailable(SHUTTING_DOWN))
            raise
        except Exception as exc:
            if turn is not None:  # pieces of the reply may be out already: the reader expects text now
                log.exception("chat turn failed while answering (conversation %s)", turn.conversation_id)
                queue.put_nowait("\n(Sorry, something went wrong on my side. Please try again.)")
            elif is_outage(exc):
                log.warning("database unreachable; a message got 'try again shortly' (%s)", outage_reason(exc))
                queue.put_nowait(self._unavailable(UNAVAILABLE))
            else:
                log.exception("chat turn failed (platform %s)", msg.platform)
                queue.put_nowait(Reply.text("Sorry, something went wrong on my side. Please try again.", error=ErrorKind.FAILED))
        finally:
            queue.put_nowait(_END)

    async def begin_turn(self, msg: Incoming, text: str) -> tuple[Reply | None, TurnContext | None]:
        """Drop a retried event, check access and quota, then store the user's turn.

        All in one transaction, before generation, so a failure never loses the user's turn.
        """
        async with self.sessions() as session, session.begin():
            if msg.event_id and not await mark_event_processed(session, platform=msg.platform, event_id=msg.event_id):
                return Reply.text("", error=ErrorKind.DUPLICATE), None
            (user, user_settings), decision = await admitted_user(session, access=self.access, msg=msg)
            if not decision.allowed:
                return Reply.text(decision.message, ephemeral=True, error=ErrorKind.REFUSED), None
            if self.settings.daily_token_quota:
                quota = await quota_for(session, settings=self.settings, user_id=user.id, today=utcnow().date())
                if quota.exceeded:
                    return Reply.text(quota.message, ephemeral=True, error=ErrorKind.REFUSED), None
            conversation_id, stored = await repository.active_history(
                session,
                user_id=user.id,
                platform=msg.platform,
                place=msg.place,
                is_dm=msg.is_dm,
                limit=self._history_limit(),
            )
            tokens = len(self.engine.loaded.tokenizer.encode(text))
            await repository.add_message(
                session, conversation_id=conversation_id, role="user", text=text, token_count=tokens
            )
        preferences = resolve_preferences(user_settings, self.settings)
        # Failed and cancelled bot turns stay on record but are not shown to the model.
        history = [Turn(m.role, m.text, m.id) for m in stored if m.role == "user" or m.status == "ok"]
        name = preferences.display_name or msg.display_name
        return None, TurnContext(user.id, conversation_id, history, preferences, name)

    def _history_limit(self) -> int:
        """Messages worth loading: no more than could fit in the window (a turn takes at least 3 tokens)."""
        return min(self.settings.history_messages, self.engine.context_size // 3 + 1)

    def prompt(self, turn: TurnContext, text: str) -> FittedPrompt:
        """The model's input for a new message after the turn's history: token ids, and chat messages where
        the model has a chat template.

        Remembers which stored turn the prompt starts with, so that the conversation's next
        prompt starts there too while it fits (see build_prompt) and extends this one.
        """
        ids = [t.id for t in turn.history]
        start = self._prompt_starts.get(turn.conversation_id)
        fitted = build_prompt(
            self.template,
            self.engine.loaded.tokenizer,
            persona=turn.preferences.persona,
            user_name=turn.display_name,
            history=turn.history,
            message=text,
            context_size=self.engine.context_size,
            reply_budget=turn.preferences.max_reply_tokens,
            keep_from=ids.index(start) if start in ids else None,
        )
        self._prompt_starts.pop(turn.conversation_id, None)
        first_id = ids[fitted.first] if fitted.first < len(ids) else None
        if first_id is not None:
            self._prompt_starts[turn.conversation_id] = first_id
            if len(self._prompt_starts) > PROMPT_STARTS_KEPT:
                del self._prompt_starts[next(iter(self._prompt_starts))]  # the least recently used
        return fitted

    async def _generate(self, turn: TurnContext, text: str, queue: asyncio.Queue[object], record: TurnRecord) -> None:
        prompt = self.prompt(turn, text)
        pieces: list[str] = []
        status = "failed"
        outcome = ErrorKind.FAILED.value  # what the metrics and the log line call it; status is what is stored
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.reply_timeout):
                # The conversation id lets the engine reuse the KV cache of the previous turn.
                replies = self.engine.stream(
                    prompt.ids,
                    self._sampling(turn.preferences),
                    cache_key=str(turn.conversation_id),
                    messages=prompt.messages,
                )
                async with aclosing(replies) as stream:
                    async for piece in stream:
                        if not pieces:
                            record.first_piece()
                        pieces.append(piece)
                        queue.put_nowait(piece)
            status = outcome = OK
        except EngineBusy:
            outcome = ErrorKind.BUSY.value
            queue.put_nowait("I am busy with other people right now; try again in a few seconds.")
        except TimeoutError:
            status, outcome = "cancelled", TIMEOUT
            queue.put_nowait(
                f"{' …' if pieces else ''}(I stopped: the reply took longer than {self.settings.reply_timeout:g} s.)"
            )
        except asyncio.CancelledError:
            status = outcome = CANCELLED
            if self.closing:
                queue.put_nowait(f"{' …' if pieces else ''}(I stopped: I am shutting down. Ask again in a minute.)")
            raise
        except Exception:
            log.exception("generation failed for conversation %s", turn.conversation_id)
            queue.put_nowait("\n(Sorry, something went wrong while I was answering. Please try again.)")
        finally:
            reply = "".join(pieces).strip()
            elapsed_ms = int((time.perf_counter() - started) * 1000)
            tokens = len(self.engine.loaded.tokenizer.encode(reply))
            record.replied(outcome, tokens=tokens, reply=reply)
            # A task of its own, tracked by close(): a cancelled reply is still recorded, as cancelled.
            row = (turn, reply, status, elapsed_ms, len(prompt.ids), tokens)
            store = self._track(asyncio.create_task(self._keep_reply(turn, lambda: self._store_reply(*row))))
            # The reply ends once stored, but its reader waits no more than a second for a database
            # that is away; the turn (and so the place's next one) waits for the store in any case.
            await asyncio.wait({store}, timeout=1.0)
            queue.put_nowait(_END)
            await asyncio.shield(store)

    @staticmethod
    async def _keep_reply(turn: TurnContext, store: Callable[[], Awaitable[None]]) -> None:
        """Run store, waiting out a database outage of up to about 30 s; a reply it cannot store is logged."""
        try:
            await retrying(store, delays=STORE_RETRY_DELAYS, what="storing a reply")
        except Exception:
            log.exception("a reply in conversation %s was given but could not be stored", turn.conversation_id)

    async def _store_reply(
        self, turn: TurnContext, text: str, status: str, elapsed_ms: int, prompt_tokens: int, tokens: int
    ) -> None:
        async with self.sessions() as session, session.begin():
            await repository.add_message(
                session,
                conversation_id=turn.conversation_id,
                role="bot",
                text=text,
                token_count=tokens,
                model_name=self.engine.loaded.name,
                generation_ms=elapsed_ms,
                status=status,
            )
            await add_usage(session, user_id=turn.user_id, day=utcnow().date(), tokens=prompt_tokens + tokens)

    def _sampling(self, preferences: Preferences) -> SamplingParams:
        s = self.settings
        return SamplingParams(
            temperature=preferences.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            max_new_tokens=preferences.max_reply_tokens,
            stop_ids=(self.engine.loaded.tokenizer.eos_id,),
        )

    def _track(self, task: asyncio.Task[None], *, chat: bool = False) -> asyncio.Task[None]:
        for tasks in (self._tasks, self._chats) if chat else (self._tasks,):
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return task

    async def shutdown(self, grace: float) -> None:
        """Stop for good: new messages get "shutting down"; replies in progress get `grace` seconds to finish,
        then are cancelled (and stored as cancelled). Returns once every reply is stored."""
        self.closing = True
        if self._chats:
            log.info("shutting down: %d replies in progress get up to %g s", len(self._chats), grace)
            _, late = await asyncio.wait(set(self._chats), timeout=grace)
            for task in late:
                task.cancel()
        await self.close()

    async def close(self) -> None:
        """Wait for replies in progress, so every one of them is stored."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _prompt_template(settings: Settings, engine: ReplyEngine) -> PromptTemplate | ChatPrompt:
    """An admin's template file first; else the model's own chat template, where it has one; else ours."""
    tokenizer = engine.loaded.tokenizer
    if settings.prompt_template is None and tokenizer.chat_template is not None:
        return ChatPrompt.for_tokenizer(tokenizer)
    return PromptTemplate(settings.prompt_template)


def _place_key(msg: Incoming) -> tuple[str, str, str, str]:
    """Whose turn it is: one user in one place."""
    return (msg.platform, msg.workspace_id, msg.user_id, msg.place)
