"""A fake Discord on loopback: the REST routes and the gateway websocket that discord.py uses.

One guild with one text channel, the bot and two people. Tests start it, point the
real discord.py client of the adapter at it (DISCORD_API_BASE, DISCORD_GATEWAY_URL),
push gateway dispatches as Discord would (MESSAGE_CREATE, INTERACTION_CREATE) and
wait for the REST calls the bot makes in answer. The gateway speaks Discord's
protocol: HELLO, IDENTIFY, READY, GUILD_CREATE, heartbeats, RECONNECT and RESUME
with replay of missed events, zlib-stream compression when asked for; REST answers
carry Discord's rate-limit headers and can be told to answer 429.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

Json = dict[str, Any]
T = TypeVar("T")

DISCORD_EPOCH_MS = 1_420_070_400_000
EPHEMERAL = 1 << 6
LOADING = 1 << 7
# Interaction callback types (Discord API "interaction response types")
TOKEN = "test-token"
MESSAGE_CONTENT = 1 << 15  # the privileged intent that brings the text of messages
MESSAGE, DEFERRED_MESSAGE, DEFERRED_UPDATE, MODAL = 4, 5, 6, 9


def _user(id: int, name: str, *, bot: bool = False) -> Json:
    return {"id": str(id), "username": name, "global_name": name, "discriminator": "0", "avatar": None, "bot": bot}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


@dataclass
class Call:
    """One REST request the bot made."""

    method: str
    path: str  # below the API base, e.g. /channels/123/messages
    query: dict[str, str]
    body: Any  # the JSON body (an object; a list for the command sync), or a multipart request's payload_json
    files: list[tuple[str, bytes]]
    at: float  # the event loop's clock


@dataclass
class _Session:
    """One shard's gateway session: its events in order, so a RESUME can replay what was missed."""

    id: str
    shard: list[int]
    events: list[Json] = field(default_factory=list)
    socket: web.WebSocketResponse | None = None
    compressor: Any = None


class FakeDiscord:
    """The fake server; `async with FakeDiscord() as discord:` runs it on a free port of 127.0.0.1."""

    BOT = _user(1_000_001, "gptbot", bot=True)
    ANN = _user(3_000_001, "ann")
    BEN = _user(3_000_002, "ben")
    OTHER_BOT = _user(3_000_099, "otherbot", bot=True)
    APPLICATION_ID = BOT["id"]

    def __init__(self, *, message_content_intent: bool = True) -> None:
        self.message_content_intent = message_content_intent  # as switched on in the Developer Portal
        self._ids = itertools.count(1)
        self.guild_id = self.snowflake()
        self.bot_role_id = self.snowflake()  # the role Discord gives a bot in each server it joins
        self.channel_id = self.snowflake()
        self.channels: dict[str, Json] = {
            self.channel_id: {
                "id": self.channel_id, "type": 0, "guild_id": self.guild_id, "name": "general", "position": 0,
                "permission_overwrites": [], "nsfw": False, "parent_id": None, "topic": None,
                "last_message_id": None, "rate_limit_per_user": 0,
            }
        }
        self.messages: dict[str, Json] = {}  # every message, by id, as Discord holds it now
        self.edits: dict[str, list[float]] = {}  # message id -> clock of each edit
        self.calls: list[Call] = []
        self.errors: list[str] = []  # requests this Discord refused (404, 400): a test expects none
        self.commands: dict[str, Json] = {}  # synced application commands by name
        self.identified: list[Json] = []  # IDENTIFY payloads
        self.sessions: dict[int, _Session] = {}  # by shard id
        self.interactions: dict[str, Json] = {}  # by token: the interaction and its responses
        self._rate_limited: list[tuple[str, str]] = []
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- life cycle and addresses

    async def __aenter__(self) -> FakeDiscord:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in self.sessions.values():
            if session.socket is not None:
                await session.socket.close()
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def snowflake(self) -> str:
        """A new id shaped like Discord's: milliseconds since 2015 above 22 bits of counter."""
        return str(((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | next(self._ids))

    # -- what tests do

    async def wait_for(self, check: Callable[[], T | None], timeout: float = 20.0) -> T:
        """Wait until check() returns something other than None or False, and return it."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                while not (found := check()):
                    await self._changed.wait()
                return found

    async def ready(self, shards: int = 1) -> None:
        """Wait until the bot has identified on this many shards and has been sent its guild."""
        await self.wait_for(lambda: sum(bool(s.events) for s in self.sessions.values()) >= shards)

    def find_calls(self, method: str, path: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.path == path]

    def bot_messages(self, channel_id: str) -> list[Json]:
        """What the bot has posted in a channel, oldest first, as it reads now."""
        return [
            m for m in self.messages.values() if m["channel_id"] == channel_id and m["author"]["id"] == self.BOT["id"]
        ]

    def rate_limit_next(self, method: str, path: str) -> None:
        """Answer the next such request with 429 Too Many Requests, as Discord does when a bucket is empty."""
        self._rate_limited.append((method, path))

    async def post_message(
        self,
        author: Json,
        content: str,
        *,
        channel_id: str | None = None,
        mentions: Sequence[Json] = (),
        role_mentions: Sequence[str] = (),
    ) -> Json:
        """A person (or another bot) writes in a guild channel or thread: MESSAGE_CREATE."""
        channel = self.channels[channel_id or self.channel_id]
        message = self._message(channel["id"], author, content, guild_id=channel.get("guild_id"), mentions=mentions)
        message["mention_roles"] = list(role_mentions)
        await self.dispatch("MESSAGE_CREATE", message, guild_id=channel.get("guild_id"))
        return message

    async def post_dm(self, author: Json, content: str) -> Json:
        """A person writes to the bot directly: MESSAGE_CREATE in their DM channel."""
        channel = self.dm_channel(author)
        message = self._message(channel["id"], author, content)
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    async def use_command(
        self, user: Json, name: str, options: dict[str, str] | None = None, *, channel_id: str | None = None
    ) -> str:
        """A person runs a slash command the bot registered; returns the interaction token."""
        command = self.commands[name]  # KeyError: the bot never synced this command
        known = {o["name"] for o in command.get("options", [])}
        assert set(options or {}) <= known, f"/{name} has options {known}"
        data = {
            "id": command["id"], "name": name, "type": 1,
            "options": [{"name": k, "type": 3, "value": v} for k, v in (options or {}).items()],
        }
        return await self._interact(user, 2, data, channel_id=channel_id)

    async def use_component(self, user: Json, message: Json, custom_id: str, values: list[str] | None = None) -> str:
        """A person clicks a button (or picks in a select menu) on a message; returns the interaction token."""
        component = next(c for row in message["components"] for c in row["components"] if c["custom_id"] == custom_id)
        data: Json = {"custom_id": custom_id, "component_type": component["type"]}
        if values is not None:
            data["values"] = values
        return await self._interact(user, 3, data, channel_id=message["channel_id"], message=message)

    async def submit_modal(self, user: Json, token: str, values: dict[str, str]) -> str:
        """A person fills in and submits the modal the bot opened in answer to interaction `token`."""
        opened = self.interactions[token]
        modal = next(r["data"] for r in opened["responses"] if r["type"] == MODAL)
        rows = [
            {"type": 1, "components": [{"type": 4, "custom_id": c["custom_id"], "value": values[c["custom_id"]]}
                                       for c in row["components"]]}
            for row in modal["components"]
        ]
        data = {"custom_id": modal["custom_id"], "components": rows}
        return await self._interact(
            user, 5, data, channel_id=opened["interaction"]["channel_id"], message=opened["interaction"].get("message")
        )

    def responses(self, token: str) -> list[Json]:
        """The interaction callbacks (defer, modal, ...) the bot sent for an interaction."""
        return self.interactions[token]["responses"]

    def follow_ups(self, token: str) -> list[Json]:
        """The messages the bot posted through an interaction's webhook, as they read now."""
        return [m for m in self.messages.values() if m.get("interaction_token") == token]

    async def reconnect(self, shard: int = 0) -> None:
        """Ask the bot to reconnect (op 7 RECONNECT), as Discord does when it moves a session."""
        socket = self.sessions[shard].socket
        assert socket is not None
        await self._send(self.sessions[shard], {"op": 7, "d": None})
        self.sessions[shard].socket = None

    async def dispatch(self, event: str, data: Json, *, guild_id: str | None = None) -> None:
        """Send a dispatch on the shard that holds the guild (DMs go to shard 0)."""
        await self._dispatch_on(self.sessions[self._shard_of(guild_id)], event, data)

    async def _dispatch_on(self, session: _Session, event: str, data: Json) -> None:
        """Number the event and send it if the shard is connected; it is kept for a RESUME either way."""
        payload = {"op": 0, "t": event, "s": len(session.events) + 1, "d": data}
        session.events.append(payload)
        if session.socket is not None:
            await self._send(session, payload)

    # -- gateway

    def _shard_of(self, guild_id: str | None) -> int:
        count = next(iter(self.sessions.values())).shard[1]
        return (int(guild_id) >> 22) % count if guild_id else 0

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        assert request.query.get("v") == "10" and request.query.get("encoding") == "json", request.query
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        # zlib-stream: one compression context for the whole connection, each message ends with a sync flush.
        compressor = zlib.compressobj() if request.query.get("compress") == "zlib-stream" else None
        connection = _Session(id="", shard=[0, 1], socket=socket, compressor=compressor)
        await self._send(connection, {"op": 10, "d": {"heartbeat_interval": 41_250}})
        async for frame in socket:
            if frame.type != WSMsgType.TEXT:
                break
            payload = json.loads(frame.data)
            if payload["op"] == 1:
                await self._send(connection, {"op": 11})
            elif payload["op"] == 2:
                connection = await self._identify(payload["d"], socket, compressor) or connection
            elif payload["op"] == 6:
                connection = await self._resume(payload["d"], socket, compressor)
        return socket

    async def _identify(self, identify: Json, socket: web.WebSocketResponse, compressor: Any) -> _Session | None:
        assert identify["token"] == TOKEN
        if identify["intents"] & MESSAGE_CONTENT and not self.message_content_intent:
            await socket.close(code=4014, message=b"Disallowed intent(s).")
            return None
        shard = identify.get("shard", [0, 1])
        session_id = f"session-{shard[0]}-{self.snowflake()}"
        session = _Session(id=session_id, shard=shard, socket=socket, compressor=compressor)
        self.sessions[shard[0]] = session
        on_shard = (int(self.guild_id) >> 22) % shard[1] == shard[0]
        ready = {
            "v": 10, "user": self.BOT, "session_id": session.id, "resume_gateway_url": self.gateway_url,
            "shard": shard, "application": {"id": self.APPLICATION_ID, "flags": 0},
            "guilds": [{"id": self.guild_id, "unavailable": True}] if on_shard else [],
        }
        async with self._changed:
            self.identified.append(identify)
            await self._dispatch_on(session, "READY", ready)
            if on_shard:
                await self._dispatch_on(session, "GUILD_CREATE", self._guild())
            self._changed.notify_all()
        return session

    async def _resume(self, resume: Json, socket: web.WebSocketResponse, compressor: Any) -> _Session:
        session = next(s for s in self.sessions.values() if s.id == resume["session_id"])
        session.socket, session.compressor = socket, compressor
        for payload in session.events[resume["seq"]:]:
            await self._send(session, payload)
        await self._dispatch_on(session, "RESUMED", {})
        return session

    async def _send(self, session: _Session, payload: Json) -> None:
        assert session.socket is not None
        text = json.dumps(payload)
        if session.compressor is None:
            await session.socket.send_str(text)
        else:
            data = session.compressor.compress(text.encode()) + session.compressor.flush(zlib.Z_SYNC_FLUSH)
            await session.socket.send_bytes(data)

    def _guild(self) -> Json:
        everyone = {
            "id": self.guild_id, "name": "@everyone", "permissions": str((1 << 41) - 1), "position": 0,
            "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0,
        }
        bot_role = {**everyone, "id": self.bot_role_id, "name": "gptbot", "permissions": "0", "position": 1,
                    "managed": True, "mentionable": True, "tags": {"bot_id": self.BOT["id"]}}
        return {
            "id": self.guild_id, "name": "Test guild", "icon": None, "owner_id": self.ANN["id"],
            "roles": [everyone, bot_role],
            "emojis": [], "stickers": [], "features": [], "member_count": 4, "large": False, "unavailable": False,
            "joined_at": _now(), "members": [{**self._member(self.BOT), "roles": [self.bot_role_id]}],
            "presences": [], "voice_states": [],
            "channels": [c for c in self.channels.values() if c.get("guild_id") == self.guild_id and c["type"] == 0],
            "threads": [c for c in self.channels.values() if c["type"] == 11],
        }

    @staticmethod
    def _member(user: Json) -> Json:
        return {"user": user, "roles": [], "joined_at": _now(), "deaf": False, "mute": False, "flags": 0}

    # -- building messages, channels and interactions

    def _message(
        self, channel_id: str, author: Json, content: str, *, guild_id: str | None = None, mentions: Sequence[Json] = ()
    ) -> Json:
        message = {
            "id": self.snowflake(), "channel_id": channel_id, "author": author, "content": content,
            "timestamp": _now(), "edited_timestamp": None, "tts": False, "mention_everyone": False,
            "mentions": list(mentions), "mention_roles": [], "attachments": [], "embeds": [], "pinned": False,
            "type": 0, "flags": 0, "components": [],
        }
        if guild_id is not None:
            message["guild_id"] = guild_id
            message["member"] = {k: v for k, v in self._member(author).items() if k != "user"}
        self.messages[message["id"]] = message
        return message

    def dm_channel(self, user: Json) -> Json:
        """The DM channel between the bot and user, opened on first use."""
        for channel in self.channels.values():
            if channel["type"] == 1 and channel["recipients"][0]["id"] == user["id"]:
                return channel
        channel = {"id": self.snowflake(), "type": 1, "recipients": [user], "last_message_id": None}
        self.channels[channel["id"]] = channel
        return channel

    async def _interact(
        self, user: Json, kind: int, data: Json, *, channel_id: str | None, message: Json | None = None
    ) -> str:
        channel = self.channels[channel_id or self.channel_id]
        guild_id = channel.get("guild_id")
        interaction = {
            "id": self.snowflake(), "application_id": self.APPLICATION_ID, "type": kind, "data": data,
            "token": f"token-{self.snowflake()}", "version": 1, "channel_id": channel["id"], "channel": channel,
            "locale": "en-US", "app_permissions": str((1 << 41) - 1), "entitlements": [],
            "attachment_size_limit": 8 << 20, "context": 0 if guild_id else 1,
        }
        if guild_id:
            member = {**self._member(user), "permissions": "0"}
            interaction.update(guild_id=guild_id, guild_locale="en-US", member=member)
        else:
            interaction["user"] = user
        if message is not None:
            interaction["message"] = self.messages[message["id"]]
        self.interactions[interaction["token"]] = {"interaction": interaction, "responses": [], "original": None}
        await self.dispatch("INTERACTION_CREATE", interaction, guild_id=guild_id)
        return interaction["token"]

    # -- REST

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        body, files = await self._read_body(request)
        call = Call(request.method, path, dict(request.query), body, files, asyncio.get_running_loop().time())
        # Interaction responses and follow-ups are authorised by the interaction's token in the path.
        signed = path.startswith(("/webhooks/", "/interactions/"))
        if not signed and request.headers.get("Authorization") != f"Bot {TOKEN}":
            status, answer = 401, {"message": "401: Unauthorized", "code": 0}
        elif (request.method, path) in self._rate_limited:
            self._rate_limited.remove((request.method, path))
            await self._record(call)
            return self._too_many_requests()
        else:
            try:
                status, answer = await self._route(request.method, path.split("/")[1:], body or {}, files)
            except (KeyError, StopIteration) as exc:  # a request about something this Discord never had
                status, answer = 400, {"message": f"unknown object: {exc!r}", "code": 10_000}
        await self._record(call, f"{request.method} {path}: {answer['message']}" if status >= 400 else None)
        if status == 204:
            return web.Response(status=204, headers=self._limit_headers())
        return _json(answer, status, self._limit_headers())

    async def _record(self, call: Call, error: str | None = None) -> None:
        async with self._changed:
            self.calls.append(call)
            if error is not None:
                self.errors.append(error)
            self._changed.notify_all()

    @staticmethod
    async def _read_body(request: web.Request) -> tuple[Any, list[tuple[str, bytes]]]:
        if request.content_type == "application/json":
            return await request.json(), []
        if request.content_type != "multipart/form-data":
            return None, []
        body, files = None, []
        async for part in await request.multipart():
            if part.name == "payload_json":
                body = json.loads(await part.text())
            else:
                files.append((part.filename or "", await part.read()))
        return body, files

    @staticmethod
    def _limit_headers() -> dict[str, str]:
        # Discord's answers pass through a proxy (discord.py checks for Via) and carry the bucket's state.
        return {
            "Via": "1.1 google", "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "4",
            "X-RateLimit-Reset-After": "1.0", "X-RateLimit-Bucket": "fake-bucket",
        }

    def _too_many_requests(self) -> web.Response:
        headers = {**self._limit_headers(), "X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": "0.2",
                   "X-RateLimit-Scope": "user", "Retry-After": "1"}
        body = {"message": "You are being rate limited.", "retry_after": 0.2, "global": False}
        return _json(body, 429, headers)

    async def _route(
        self, method: str, parts: list[str], body: Any, files: list[tuple[str, bytes]]
    ) -> tuple[int, Any]:
        """Status and answer of one REST request; body is the JSON sent (a list for the command sync)."""
        match method, parts:
            case "GET", ["users", "@me"]:
                return 200, self.BOT
            case "GET", ["oauth2", "applications", "@me"]:
                return 200, {
                    "id": self.APPLICATION_ID, "name": "gptbot", "icon": None, "description": "", "bot_public": True,
                    "bot_require_code_grant": False, "owner": self.ANN, "verify_key": "0" * 64, "flags": 0,
                    "team": None, "summary": "", "rpc_origins": [],
                }
            case "GET", ["gateway", "bot"]:
                return 200, {
                    "url": self.gateway_url, "shards": 1,
                    "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1},
                }
            case "PUT", ["applications", _, "commands"]:
                return 200, self._register(body)
            case "POST", ["channels", channel_id, "typing"]:
                return 204, None
            case "POST", ["channels", channel_id, "messages"]:
                return 200, await self._bot_posts(channel_id, body, files)
            case "PATCH", ["channels", channel_id, "messages", message_id]:
                return 200, self._edit(message_id, body)
            case "PUT", ["channels", channel_id, "messages", message_id, "reactions", emoji, "@me"]:
                self.messages[message_id].setdefault("reactions_by_bot", []).append(emoji)
                return 204, None
            case "POST", ["channels", channel_id, "messages", message_id, "threads"]:
                return 201, await self._start_thread(channel_id, message_id, body["name"])
            case "POST", ["users", "@me", "channels"]:
                return 200, self.dm_channel(self._known_user(body["recipient_id"]))
            case "POST", ["interactions", _, token, "callback"]:
                return 200, self._respond(token, body)
            case "POST", ["webhooks", _, token]:
                return 200, self._follow_up(token, body, files)
            case "PATCH", ["webhooks", _, token, "messages", message_id]:
                return 200, self._edit(self._webhook_message(token, message_id), body)
            case "DELETE", ["webhooks", _, token, "messages", message_id]:
                del self.messages[self._webhook_message(token, message_id)]
                return 204, None
        return 404, {"message": f"the fake Discord has no route {method} /{'/'.join(parts)}", "code": 0}

    def _register(self, commands: list[Json]) -> list[Json]:
        """The bulk overwrite of the global slash commands that the bot makes at start-up."""
        self.commands = {
            c["name"]: {**c, "id": self.snowflake(), "application_id": self.APPLICATION_ID, "version": "1"}
            for c in commands
        }
        return list(self.commands.values())

    def _known_user(self, user_id: str) -> Json:
        return next(u for u in (self.ANN, self.BEN, self.OTHER_BOT) if u["id"] == str(user_id))

    async def _bot_posts(self, channel_id: str, body: Json, files: list[tuple[str, bytes]]) -> Json:
        channel = self.channels[channel_id]
        message = self._message(channel_id, self.BOT, body.get("content") or "", guild_id=channel.get("guild_id"))
        message.update(components=body.get("components", []), sent=body, files=files)
        if body.get("message_reference"):
            message["message_reference"] = body["message_reference"]
        # Discord tells the bot about its own messages too; it must not answer them.
        await self.dispatch("MESSAGE_CREATE", _public(message), guild_id=channel.get("guild_id"))
        return _public(message)

    def _edit(self, message_id: str, body: Json) -> Json:
        message = self.messages[message_id]
        if "content" in body:
            message["content"] = body["content"]
        if "components" in body:
            message["components"] = body["components"]
        message["edited_timestamp"] = _now()
        message.setdefault("edit_bodies", []).append(body)
        self.edits.setdefault(message_id, []).append(asyncio.get_running_loop().time())
        return _public(message)

    async def _start_thread(self, channel_id: str, message_id: str, name: str) -> Json:
        # A thread started on a message has the message's id.
        thread = {
            "id": message_id, "type": 11, "guild_id": self.guild_id, "parent_id": channel_id,
            "owner_id": self.BOT["id"], "name": name, "message_count": 0, "member_count": 1,
            "rate_limit_per_user": 0, "flags": 0,
            "thread_metadata": {"archived": False, "auto_archive_duration": 1440, "archive_timestamp": _now(),
                                "locked": False},
        }
        self.channels[thread["id"]] = thread
        await self.dispatch("THREAD_CREATE", {**thread, "newly_created": True}, guild_id=self.guild_id)
        return thread

    def _respond(self, token: str, body: Json) -> Json:
        record = self.interactions[token]
        record["responses"].append(body)
        interaction = record["interaction"]
        answer: Json = {"interaction": {"id": interaction["id"], "type": interaction["type"]},
                        "resource": {"type": body["type"]}}
        if body["type"] == DEFERRED_MESSAGE:
            flags = LOADING | (body.get("data", {}).get("flags", 0) & EPHEMERAL)
            original = self._message(interaction["channel_id"], self.BOT, "", guild_id=interaction.get("guild_id"))
            original.update(flags=flags, interaction_token=token)
            record["original"] = original["id"]
            answer["interaction"].update(response_message_id=original["id"], response_message_loading=True,
                                         response_message_ephemeral=bool(flags & EPHEMERAL))
            answer["resource"]["message"] = _public(original)
        elif body["type"] == MESSAGE:
            data = body["data"]
            message = self._message(interaction["channel_id"], self.BOT, data.get("content") or "",
                                    guild_id=interaction.get("guild_id"))
            message.update(flags=data.get("flags", 0) & EPHEMERAL, components=data.get("components", []), sent=data,
                           interaction_token=token)
            record["original"] = message["id"]
        elif body["type"] == DEFERRED_UPDATE:
            record["original"] = interaction["message"]["id"]
        return answer

    def _follow_up(self, token: str, body: Json, files: list[tuple[str, bytes]]) -> Json:
        record = self.interactions[token]
        original = self.messages.get(record["original"] or "")
        if original is not None and original["flags"] & LOADING:
            # The first follow-up after a deferred response takes the place of "thinking…", flags and all.
            message = original
            message["flags"] &= ~LOADING
        else:
            interaction = record["interaction"]
            message = self._message(interaction["channel_id"], self.BOT, "", guild_id=interaction.get("guild_id"))
            message.update(flags=body.get("flags", 0) & EPHEMERAL, interaction_token=token)
        message.update(content=body.get("content") or "", components=body.get("components", []), sent=body, files=files,
                       webhook_id=self.APPLICATION_ID)
        return _public(message)

    def _webhook_message(self, token: str, message_id: str) -> str:
        return self.interactions[token]["original"] if message_id == "@original" else message_id


def _json(data: Any, status: int, headers: dict[str, str]) -> web.Response:
    # Exactly "application/json", as Discord sends it: discord.py reads anything else as text.
    headers = {**headers, "Content-Type": "application/json"}
    return web.Response(body=json.dumps(data).encode(), status=status, headers=headers)


def _public(message: Json) -> Json:
    """A message as Discord returns it, without what the fake keeps for tests."""
    hidden = {"sent", "files", "edit_bodies", "interaction_token", "reactions_by_bot"}
    return {k: v for k, v in message.items() if k not in hidden}
