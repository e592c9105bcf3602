"""The session manager: every platform's messages go through here to become stored, answered turns."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import aclosing

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.commands import HELP_TEXT, KNOWN, Command, parse_command
from bot.config import Settings
from bot.messages import ErrorKind, Incoming, Reply
from bot.prompt import Turn, build_prompt
from model.engine import EngineBusy, InferenceEngine
from model.generate import SamplingParams
from storage import repository

log = logging.getLogger(__name__)


class SessionManager:
    """Maps platform accounts to users, keeps their history and asks the model for replies."""

    def __init__(
        self, settings: Settings, sessions: async_sessionmaker[AsyncSession], engine: InferenceEngine
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.engine = engine
        # One lock per user and place, so one person's messages there are answered in order.
        self._locks: defaultdict[tuple[str, str, str], asyncio.Lock] = defaultdict(asyncio.Lock)

    async def handle(self, msg: Incoming) -> Reply:
        """The reply to one incoming message: a command's answer, an error, or the model's streamed text."""
        text = msg.text.replace("\x00", "").strip()
        if not text:
            return Reply.text("I got an empty message. Type something, or /help.", error=ErrorKind.INVALID)
        if len(text) > self.settings.max_message_chars:
            return Reply.text(
                f"That message is {len(text):,} characters long; the limit is "
                f"{self.settings.max_message_chars:,}. Please send a shorter one.",
                error=ErrorKind.INVALID,
            )
        command = parse_command(text)
        if command is not None:
            return await self._command(command, msg)
        return Reply(pieces=self._answer(msg, text))

    async def _command(self, command: Command, msg: Incoming) -> Reply:
        if command.name not in KNOWN or command.name == "help":
            return Reply.text(HELP_TEXT, ephemeral=True)
        async with self.sessions() as session, session.begin():
            user = await self._user(session, msg)
            await repository.start_new_conversation(
                session, user_id=user.id, platform=msg.platform, place=msg.place, is_dm=msg.is_dm
            )
        return Reply.text("Started a new conversation. I have forgotten what we said here before.")

    @staticmethod
    async def _user(session: AsyncSession, msg: Incoming):  # -> storage.models.User
        return await repository.get_or_create_user(
            session,
            platform=msg.platform,
            workspace_id=msg.workspace_id,
            platform_user_id=msg.user_id,
            display_name=msg.display_name,
        )

    def prompt(self, history: list[Turn], text: str) -> list[int]:
        """The model's input for a new message after history."""
        return build_prompt(
            self.engine.loaded.tokenizer,
            persona=self.settings.persona,
            history=history,
            message=text,
            context_size=self.engine.context_size,
            reply_budget=self.settings.max_reply_tokens,
        )

    async def _answer(self, msg: Incoming, text: str) -> AsyncIterator[str]:
        async with self._locks[(msg.platform, msg.user_id, msg.place)]:
            conversation_id, history = await self.record_user_turn(msg, text)
            prompt = self.prompt(history, text)
            pieces: list[str] = []
            status = "failed"
            started = time.perf_counter()
            try:
                async with aclosing(self.engine.stream(prompt, self._sampling())) as stream:
                    async for piece in stream:
                        pieces.append(piece)
                        yield piece
                status = "ok"
            except EngineBusy:
                yield "I am busy with other people right now; try again in a few seconds."
            except (asyncio.CancelledError, GeneratorExit):
                status = "cancelled"
                raise
            except Exception:
                log.exception("generation failed for conversation %s", conversation_id)
                yield "\n(Sorry, something went wrong while I was answering. Please try again.)"
            finally:
                reply = "".join(pieces).strip()
                elapsed_ms = int((time.perf_counter() - started) * 1000)
                await asyncio.shield(self._store_reply(conversation_id, reply, status, elapsed_ms))

    async def record_user_turn(self, msg: Incoming, text: str) -> tuple[int, list[Turn]]:
        """Store the user's turn before generation (a failure never loses it); return the conversation and its earlier turns."""
        async with self.sessions() as session, session.begin():
            user = await self._user(session, msg)
            conversation = await repository.get_active_conversation(
                session, user_id=user.id, platform=msg.platform, place=msg.place, is_dm=msg.is_dm
            )
            stored = await repository.recent_messages(
                session, conversation_id=conversation.id, limit=self.settings.history_messages
            )
            await repository.add_message(
                session,
                conversation_id=conversation.id,
                role="user",
                text=text,
                token_count=len(self.engine.loaded.tokenizer.encode(text)),
            )
        # Failed and cancelled bot turns stay on record but are not shown to the model.
        return conversation.id, [Turn(m.role, m.text) for m in stored if m.role == "user" or m.status == "ok"]

    async def _store_reply(self, conversation_id: int, text: str, status: str, elapsed_ms: int) -> None:
        async with self.sessions() as session, session.begin():
            await repository.add_message(
                session,
                conversation_id=conversation_id,
                role="bot",
                text=text,
                token_count=len(self.engine.loaded.tokenizer.encode(text)),
                model_name=self.engine.loaded.name,
                generation_ms=elapsed_ms,
                status=status,
            )

    def _sampling(self) -> SamplingParams:
        s = self.settings
        return SamplingParams(
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            max_new_tokens=s.max_reply_tokens,
            stop_ids=(self.engine.loaded.tokenizer.eos_id,),
        )
