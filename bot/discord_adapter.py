"""The Discord adapter: messages and slash commands in, the core's replies out, streamed into Discord messages."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager, suppress
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.config import Settings
from bot.discord_commands import add_commands
from bot.discord_format import split_message
from bot.discord_stream import EMPTY_REPLY, NO_MENTIONS, MessageStream, Send
from bot.discord_views import ConfirmButton, SettingsView, confirm_view
from bot.messages import ErrorKind, Incoming, Reply
from bot.metrics import Metrics
from bot.sessions import SessionManager

log = logging.getLogger(__name__)

DMS_OFF = "I do not answer direct messages here. Mention me in a server channel instead."
NO_DMS_FROM_YOU = (
    "My answer to that is private, and I cannot send you a direct message. "
    "Use my slash command instead: its answer only you can see."
)
SENT_PRIVATELY = "\N{OPEN MAILBOX WITH RAISED FLAG}"  # reaction on a message whose answer went to the asker's DMs
FAILED = "Sorry, something went wrong on my side. Please try again."
KNOWN_THREADS = 10_000  # threads it talks in, remembered without a mention until this many newer ones
THREAD_NAME_LENGTH = 80  # Discord allows 100

# What the bot does in a server: read and answer, in channels and threads, start threads, attach files, react.
INVITE_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    read_message_history=True,
    attach_files=True,
    add_reactions=True,
)


class DiscordSetupError(Exception):
    """Discord refused the bot's set-up (token, intents); the message tells the admin what to change."""


@contextmanager
def discord_endpoints(api_base: str | None, gateway_url: str | None) -> Iterator[None]:
    """Point discord.py at a Discord-compatible server (DISCORD_API_BASE, DISCORD_GATEWAY_URL) while the client runs.

    discord.py keeps both addresses as class attributes, so they hold for the whole
    process; they are put back afterwards.
    """
    saved = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    if api_base:
        Route.BASE = api_base
    if gateway_url:
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
    try:
        yield
    finally:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved


class DiscordAdapter:
    """Runs the Discord client (advanced_startup style) until the connection ends or the task is cancelled."""

    name = "discord"

    def __init__(self, manager: SessionManager, settings: Settings, *, edit_interval: float = 1.0) -> None:
        if settings.discord_token is None:
            raise DiscordSetupError("the Discord adapter needs DISCORD_TOKEN (see README, Discord)")
        self.settings = settings
        self.client = DiscordBot(manager, settings, edit_interval=edit_interval)

    async def run(self) -> None:
        """Log in, connect every shard of this process and serve."""
        assert self.settings.discord_token is not None
        with discord_endpoints(self.settings.discord_api_base, self.settings.discord_gateway_url):
            try:
                async with self.client:
                    await self.client.start(self.settings.discord_token.get_secret_value())
            except discord.LoginFailure as exc:
                raise DiscordSetupError(
                    "Discord did not accept DISCORD_TOKEN; copy the token again from the Bot page "
                    "of your application in the Discord Developer Portal"
                ) from exc
            except discord.PrivilegedIntentsRequired as exc:
                raise DiscordSetupError(
                    "Discord refused the Message Content intent; turn on MESSAGE CONTENT INTENT under "
                    "Privileged Gateway Intents on the Bot page of your application"
                ) from exc

    async def connected(self) -> bool:
        """Signed in and receiving events: discord.py has had READY and the client is not closing."""
        return self.client.is_ready() and not self.client.is_closed()


class DiscordBot(discord.AutoShardedClient):
    """The discord.py client: turns messages and interactions into Incoming and shows the core's Replies.

    It answers when mentioned in a server channel, in every DM (unless turned off)
    and in threads where it talks; other bots and itself it ignores.
    """

    def __init__(self, manager: SessionManager, settings: Settings, *, edit_interval: float = 1.0) -> None:
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: without it Discord sends messages without their text
        super().__init__(
            intents=intents,
            allowed_mentions=NO_MENTIONS,
            shard_count=settings.discord_shard_count or None,
            shard_ids=[int(i) for i in settings.discord_shard_ids.split(",") if i] or None,
            http_trace=rate_limit_trace(manager.metrics),
        )
        self.manager = manager
        self.settings = settings
        self.edit_interval = edit_interval  # seconds between edits of a streamed message
        places = app_commands.AppCommandContext(guild=True, dm_channel=settings.discord_allow_dms)
        self.tree = app_commands.CommandTree(self, allowed_contexts=places)
        self._threads: dict[int, None] = {}  # threads it has answered in, oldest first

    async def setup_hook(self) -> None:
        add_commands(self.tree, self.run_command, longest_reply=self.settings.max_reply_tokens)
        self.add_view(SettingsView(self.settings.max_reply_tokens))
        self.add_dynamic_items(ConfirmButton)
        await self.tree.sync()
        assert self.application_id is not None
        invite = discord.utils.oauth_url(
            self.application_id, permissions=INVITE_PERMISSIONS, scopes=("bot", "applications.commands")
        )
        log.info("Discord: slash commands registered; invite the bot to a server with %s", invite)
        if self.shard_count is None:
            # Asked here: when discord.py asks, it also takes the gateway address from the answer,
            # which would bypass DISCORD_GATEWAY_URL.
            self.shard_count, _, _ = await self.http.get_bot_gateway()

    async def on_ready(self) -> None:
        log.info(
            "Discord: signed in as %s; servers: %d; shards %s of %s",
            self.user, len(self.guilds), sorted(self.shards), self.shard_count,
        )

    # -- messages

    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        if message.guild is None and not self.settings.discord_allow_dms:
            await message.channel.send(DMS_OFF)
            return
        assert self.user is not None
        # People mention the bot itself, or the role Discord made for it in the server under the same name.
        mentioned = any(user.id == self.user.id for user in message.mentions) or (
            message.guild is not None and message.guild.self_role in message.role_mentions
        )
        if message.guild is not None and not (mentioned or self._talks_in(message.channel)):
            return
        try:
            await self._answer(message)
        except Exception:
            if self.is_closed():  # shutting down: the core stores the reply; its message stays as it was
                return
            log.exception("answering Discord message %s in channel %s failed", message.id, message.channel.id)
            with suppress(discord.HTTPException):
                await message.channel.send(FAILED)

    def _talks_in(self, channel: Any) -> bool:
        """Whether channel is a thread it started or has answered in, where it needs no mention."""
        assert self.user is not None
        return isinstance(channel, discord.Thread) and (channel.owner_id == self.user.id or channel.id in self._threads)

    async def _answer(self, message: discord.Message) -> None:
        text = self._text_of(message)
        channel_id, thread_id = _where(message.channel)
        # With BOT_DISCORD_THREADS a mention in a channel starts a thread on the message. Such a thread
        # has the message's id, so its conversation is known before the thread exists; the thread is
        # only started for an answer that everyone may see.
        new_thread = self.settings.discord_threads and isinstance(message.channel, discord.TextChannel)
        if new_thread:
            thread_id = str(message.id)
        incoming = _incoming(message.author, message.guild, channel_id, thread_id, text, event_id=str(message.id))
        async with self._asking(incoming) as asked, message.channel.typing():
            reply = await asked
        if reply.error is ErrorKind.DUPLICATE:
            return
        if reply.ephemeral and not incoming.is_dm:
            await self._answer_privately(message, reply)
            return
        channel: Any = message.channel
        reference: discord.Message | None = message
        if new_thread and (thread := await self._thread_for(message, text)) is not None:
            channel, reference = thread, None
        if isinstance(channel, discord.Thread):
            self._remember(channel)
        async with channel.typing():
            await self.show(reply, self._sender(channel, reference), asker=message.author.id)

    def _text_of(self, message: discord.Message) -> str:
        """The text for the core: the bot's own mentions dropped, other mentions as @name."""
        assert self.user is not None
        text = message.content
        for user in message.mentions:
            name = "" if user.id == self.user.id else f"@{user.display_name}"
            text = text.replace(f"<@{user.id}>", name).replace(f"<@!{user.id}>", name)
        own_role = message.guild.self_role if message.guild else None
        for role in message.role_mentions:
            text = text.replace(role.mention, "" if role == own_role else f"@{role.name}")
        return text.strip()

    async def _thread_for(self, message: discord.Message, text: str) -> discord.Thread | None:
        """A new thread on message for its conversation; None where the bot may not start one."""
        name = text.splitlines()[0][:THREAD_NAME_LENGTH] if text else f"Chat with {message.author.display_name}"
        try:
            return await message.create_thread(name=name)
        except discord.HTTPException as exc:
            log.warning("cannot start a thread in channel %s (%s); answering in the channel", message.channel.id, exc)
            return None

    def _remember(self, thread: discord.Thread) -> None:
        self._threads.pop(thread.id, None)
        self._threads[thread.id] = None
        if len(self._threads) > KNOWN_THREADS:
            del self._threads[next(iter(self._threads))]

    async def _answer_privately(self, message: discord.Message, reply: Reply) -> None:
        """A reply only the asker should see, to a message in a channel: it goes to their DMs."""
        try:
            dm = await message.author.create_dm()
            await self.show(reply, self._sender(dm, None), asker=message.author.id)
        except discord.Forbidden:  # they take no DMs from this server's members
            await message.reply(NO_DMS_FROM_YOU)
            return
        await message.add_reaction(SENT_PRIVATELY)

    @staticmethod
    def _sender(channel: Any, reference: discord.Message | None) -> Send:
        """Posts the messages of one reply in channel, the first as a reply to reference (if any)."""
        pending = [reference.to_reference(fail_if_not_exists=False)] if reference else []

        async def send(content: str, **extras: Any) -> discord.Message:
            return await channel.send(content, reference=pending.pop() if pending else None, **extras)

        return send

    # -- slash commands and controls

    async def run_command(
        self, interaction: discord.Interaction, text: str, *, public: bool = False, view: discord.ui.View | None = None
    ) -> None:
        """A slash command: defer within Discord's 3 seconds, ask the core, follow up with its reply.

        Only /chat answers in public; every other command's answer is private.
        """
        if interaction.guild_id is None and not self.settings.discord_allow_dms:
            await interaction.response.send_message(DMS_OFF, ephemeral=True)
            return
        async with self._asking(_incoming_from(interaction, text)) as asked:
            await interaction.response.defer(ephemeral=not public, thinking=True)
        try:
            reply = await asked
            if reply.error is ErrorKind.DUPLICATE:
                await interaction.delete_original_response()
                return
            ephemeral = not public
            if reply.ephemeral and public:
                # The deferred answer is public; a private reply goes in an ephemeral follow-up instead.
                await interaction.delete_original_response()
                ephemeral = True
            if isinstance(interaction.channel, discord.Thread):
                self._remember(interaction.channel)
            send = self._follow_up(interaction, ephemeral=ephemeral)
            await self.show(reply, send, asker=interaction.user.id, view=view if reply.error is None else None)
        except Exception:
            await self._failed(interaction, text)

    async def _failed(self, interaction: discord.Interaction, text: str) -> None:
        """Log a command that failed on our side, and tell the person in a short private note."""
        if self.is_closed():
            return
        log.exception("Discord command %r failed", text.split(" ")[0] if text.startswith("/") else "/chat")
        with suppress(discord.HTTPException):
            await interaction.followup.send(FAILED, ephemeral=True)

    async def run_control(self, interaction: discord.Interaction, text: str, *, finished: bool) -> None:
        """A menu, button or form was used: ask the core as that person; the answer replaces the message's text.

        finished: the control has done its job (confirm), so the message loses its controls.
        """
        async with self._asking(_incoming_from(interaction, text)) as asked:
            await interaction.response.defer()  # the answer edits the message the control is on
        try:
            reply = await asked
            if reply.error is ErrorKind.DUPLICATE:
                return
            parts = split_message(await reply.collect()) or [EMPTY_REPLY]
            controls: dict[str, Any] = {"view": None} if finished else {}
            await interaction.edit_original_response(content=parts[0], allowed_mentions=NO_MENTIONS, **controls)
            for part in parts[1:]:
                await interaction.followup.send(part, ephemeral=True, allowed_mentions=NO_MENTIONS)
        except Exception:
            await self._failed(interaction, text)

    @staticmethod
    def _follow_up(interaction: discord.Interaction, *, ephemeral: bool) -> Send:
        async def send(content: str, **extras: Any) -> discord.WebhookMessage:
            return await interaction.followup.send(content, wait=True, ephemeral=ephemeral, **extras)

        return send

    # -- shared

    @asynccontextmanager
    async def _asking(self, incoming: Incoming) -> AsyncIterator[asyncio.Task[Reply]]:
        """Hand incoming to the core at once, while the block calls Discord (typing, defer).

        The core gives each message its place in line when it arrives, so a person's
        next message cannot overtake this one while Discord answers. If the block
        fails, the question is withdrawn.
        """
        asked = asyncio.create_task(self.manager.handle(incoming))
        try:
            yield asked
        except BaseException:
            asked.cancel()
            raise

    async def show(self, reply: Reply, send: Send, *, asker: int, view: discord.ui.View | None = None) -> None:
        """Stream reply into messages made by send; its file and buttons go with the last one."""
        extras: dict[str, Any] = {}
        if reply.attachment is not None:
            extras["file"] = discord.File(io.BytesIO(reply.attachment.content), filename=reply.attachment.filename)
        if reply.confirm_command:
            view = confirm_view(asker, reply.confirm_command)
        if view is not None:
            extras["view"] = view
        stream = MessageStream(send, interval=self.edit_interval)
        async with aclosing(reply.pieces) as pieces:
            await stream.write(pieces, **extras)


def rate_limit_trace(metrics: Metrics) -> aiohttp.TraceConfig:
    """Counts Discord's 429 answers, which discord.py waits out and retries without telling the client."""

    async def on_request_end(
        session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestEndParams
    ) -> None:
        if params.response.status == 429:
            metrics.rate_limit_hit("discord")

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    return trace


def _where(channel: Any) -> tuple[str, str]:
    """(channel id, thread id) of a channel; a thread's channel is its parent."""
    if isinstance(channel, discord.Thread):
        return str(channel.parent_id), str(channel.id)
    return str(channel.id), ""


def _incoming_from(interaction: discord.Interaction, text: str) -> Incoming:
    channel_id, thread_id = _where(interaction.channel)
    guild = discord.Object(interaction.guild_id) if interaction.guild_id else None
    return _incoming(interaction.user, guild, channel_id, thread_id, text, event_id=str(interaction.id))


def _incoming(
    author: discord.abc.User,
    guild: discord.abc.Snowflake | None,
    channel_id: str,
    thread_id: str,
    text: str,
    *,
    event_id: str,
) -> Incoming:
    return Incoming(
        platform="discord",
        user_id=str(author.id),
        display_name=author.display_name,
        text=text,
        channel_id=channel_id,
        workspace_id=str(guild.id) if guild else "",
        thread_id=thread_id,
        is_dm=guild is None,
        event_id=event_id,
    )
