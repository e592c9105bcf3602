"""The Discord adapter end to end: the real discord.py client over loopback against a fake Discord.

Everything behind the adapter is real too: the session manager, the database and
the inference engine. The model is a real GPT with hand-set weights that recites
SCRIPT (tests/fakes/reciting_model.py), so replies are known in advance: how long
they are, and that they contain "@everyone".
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from discord.gateway import DiscordWebSocket
from discord.http import Route
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.config import SHIPPED_MODEL, Settings
from bot.discord_adapter import DMS_OFF, SENT_PRIVATELY, DiscordAdapter, DiscordSetupError
from bot.discord_format import LIMIT
from bot.sessions import SessionManager
from fakes.discord_server import EPHEMERAL, MODAL, TOKEN, FakeDiscord, Json
from fakes.reciting_model import recital, reciting_model
from model.checkpoint import LoadedModel
from model.engine import InferenceEngine
from storage.db import make_engine, make_session_factory

# 13 tokens, 50 characters: a paragraph that pings everyone, if anything let it.
SCRIPT = ["Hello", " @", "everyone", "!", " This", " reply", " is", " long", " on", " purpose", "s", ".", "\n\n"]
INTERVAL = 0.05  # seconds between edits of a streamed message (Discord's one is 1 s)
BOT, ANN, BEN = FakeDiscord.BOT, FakeDiscord.ANN, FakeDiscord.BEN
MENTION = f"<@{BOT['id']}>"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reciting() -> LoadedModel:
    return reciting_model(SCRIPT)


class Bot:
    """The adapter running against the fake, with the database it writes to."""

    def __init__(self, discord: FakeDiscord, db: AsyncEngine) -> None:
        self.discord = discord
        self.db = db

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        async with self.db.connect() as connection:
            return list(await connection.execute(text(sql), params))

    async def turns(self) -> list[tuple[str, str, str]]:
        """(place, role, text) of every stored message, oldest first."""
        return [
            tuple(r)
            for r in await self.rows(
                "SELECT c.place, m.role, m.text FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "ORDER BY m.id"
            )
        ]

    async def reply_in(self, channel_id: str, expected: str, count: int = 1) -> list[Json]:
        """Wait until the bot's messages in channel read expected (split over `count` messages); return them."""

        def done() -> list[Json] | None:
            messages = self.discord.bot_messages(channel_id)
            return messages if "\n\n".join(m["content"] for m in messages[-count:]) == expected.strip() else None

        return await self.discord.wait_for(done)


@asynccontextmanager
async def core(
    discord: FakeDiscord, db_url: str, model: LoadedModel, **settings: Any
) -> AsyncIterator[tuple[Settings, SessionManager, AsyncEngine]]:
    """The settings pointing at the fake, and the session manager the adapter hands messages to."""
    config = Settings(
        _env_file=None,
        database_url=db_url,
        temperature=0,
        DISCORD_API_BASE=discord.api_base,
        DISCORD_GATEWAY_URL=discord.gateway_url,
        **{"DISCORD_TOKEN": TOKEN, "max_reply_tokens": 24, **settings},
    )
    db, engine = make_engine(db_url), InferenceEngine(model)
    manager = SessionManager(config, make_session_factory(db), engine)
    try:
        yield config, manager, db
    finally:
        await manager.close()
        engine.close()
        await db.dispose()


@asynccontextmanager
async def running(db_url: str, model: LoadedModel, **settings: Any) -> AsyncIterator[Bot]:
    """The adapter connected to a fresh fake Discord; afterwards, checks that hold for every test."""
    async with FakeDiscord() as discord, core(discord, db_url, model, **settings) as (config, manager, db):
        task = asyncio.create_task(DiscordAdapter(manager, config, edit_interval=INTERVAL).run())
        ready = asyncio.ensure_future(discord.ready())
        try:
            await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # the adapter stopped before it was ready: its exception says why
            yield Bot(discord, db)
        finally:
            ready.cancel()
            task.cancel()
            await asyncio.gather(task, ready, return_exceptions=True)
    assert not discord.errors, discord.errors
    assert Route.BASE == "https://discord.com/api/v10", "the REST base is put back when the adapter stops"
    assert str(DiscordWebSocket.DEFAULT_GATEWAY) == "wss://gateway.discord.gg/"
    for call in discord.calls:
        body = call.body if isinstance(call.body, dict) else {}  # (a command sync sends a list)
        body = body.get("data", body)  # an interaction response wraps its message
        if "content" in body:
            assert body.get("allowed_mentions") == {"parse": []}, (call.method, call.path, body)


def bodies_with(discord: FakeDiscord, needle: str) -> list[Json]:
    return [c.body.get("data", c.body) for c in discord.calls if c.body and needle in json.dumps(c.body)]


async def test_a_mention_gets_a_streamed_reply_in_that_channel(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting, max_reply_tokens=240) as bot:
        discord = bot.discord
        asked = await discord.post_message(ANN, f"{MENTION} hello there", mentions=[BOT])
        expected = recital(SCRIPT, 240)
        [reply] = await bot.reply_in(discord.channel_id, expected)

        assert str(reply["message_reference"]["message_id"]) == asked["id"], "it answers the message it was asked in"
        posted = discord.find_calls("POST", f"/channels/{discord.channel_id}/messages")[0]
        typing = discord.find_calls("POST", f"/channels/{discord.channel_id}/typing")
        assert typing and typing[0].at <= posted.at, "the typing indicator shows while the model works"
        assert len(posted.body["content"]) < len(expected.strip()), "the reply is posted before it is complete"
        times = [posted.at, *discord.edits[reply["id"]]]
        assert len(times) >= 3, "and edited as text arrives"
        assert min(b - a for a, b in zip(times, times[1:])) >= INTERVAL, "at most one edit per interval"
        assert reply["edit_bodies"][-1]["content"] == expected.strip(), "the last edit holds the whole text"

        place = f"discord:{discord.guild_id}:{discord.channel_id}"
        assert await bot.turns() == [(place, "user", "hello there"), (place, "bot", expected.strip())]


async def test_a_mention_of_the_bots_role_counts_too(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting) as bot:
        discord = bot.discord
        await discord.post_message(ANN, f"<@&{discord.bot_role_id}> hi", role_mentions=[discord.bot_role_id])
        await bot.reply_in(discord.channel_id, recital(SCRIPT, 24))
        assert (await bot.turns())[0][1:] == ("user", "hi")


async def test_a_direct_message_gets_a_reply(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting) as bot:
        asked = await bot.discord.post_dm(ANN, "hi, bot")
        await bot.reply_in(asked["channel_id"], recital(SCRIPT, 24))
        assert [t[:2] for t in await bot.turns()] == [("discord:dm", "user"), ("discord:dm", "bot")]


async def test_direct_messages_can_be_turned_off(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting, discord_allow_dms=False) as bot:
        asked = await bot.discord.post_dm(ANN, "hi, bot")
        await bot.reply_in(asked["channel_id"], DMS_OFF)
        token = await bot.discord.use_command(ANN, "chat", {"prompt": "hi"}, channel_id=asked["channel_id"])
        await bot.discord.wait_for(lambda: [m for m in bot.discord.follow_ups(token) if m["content"] == DMS_OFF])
        assert bot.discord.responses(token)[0]["data"]["flags"] == EPHEMERAL
        assert await bot.turns() == []


async def test_a_thread_continues_its_conversation(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting, discord_threads=True) as bot:
        discord = bot.discord
        await discord.post_message(ANN, f"{MENTION} tell me a story", mentions=[BOT])
        [thread] = await discord.wait_for(lambda: [c for c in discord.channels.values() if c["type"] == 11])
        assert thread["name"] == "tell me a story" and thread["parent_id"] == discord.channel_id
        await bot.reply_in(thread["id"], recital(SCRIPT, 24))
        assert discord.bot_messages(discord.channel_id) == [], "the answer is in the thread, not the channel"

        await discord.post_message(ANN, "and then?", channel_id=thread["id"])  # no mention needed in its thread
        await discord.wait_for(lambda: len(discord.bot_messages(thread["id"])) == 2)
        await bot.reply_in(thread["id"], recital(SCRIPT, 24))
        place = f"discord:{discord.guild_id}:{discord.channel_id}:{thread['id']}"
        assert (await bot.turns())[:3] == [
            (place, "user", "tell me a story"),
            (place, "bot", recital(SCRIPT, 24).strip()),
            (place, "user", "and then?"),
        ]
        conversations = await bot.rows("SELECT DISTINCT conversation_id FROM messages")
        assert len(conversations) == 1, "both turns belong to one conversation"


async def test_chat_command_defers_then_follows_up(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting) as bot:
        discord = bot.discord
        started = asyncio.get_running_loop().time()
        token = await discord.use_command(ANN, "chat", {"prompt": "hello"})
        expected = recital(SCRIPT, 24).strip()
        await discord.wait_for(lambda: [m for m in discord.follow_ups(token) if m["content"] == expected])

        [deferred] = discord.responses(token)
        assert deferred["type"] == 5 and not deferred.get("data", {}).get("flags", 0) & EPHEMERAL
        [callback] = [c for c in discord.calls if c.path.endswith(f"/{token}/callback")]
        assert callback.at - started < 3, "Discord's 3-second limit"
        [answer] = discord.follow_ups(token)
        assert not answer["flags"] & EPHEMERAL, "/chat answers in public"
        assert [t[1:] for t in await bot.turns()] == [("user", "hello"), ("bot", expected)]


async def test_private_commands_answer_only_the_asker(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting) as bot:
        discord = bot.discord
        await discord.post_message(ANN, f"{MENTION} remember me", mentions=[BOT])
        await bot.reply_in(discord.channel_id, recital(SCRIPT, 24))

        token = await discord.use_command(ANN, "history")
        [answer] = await discord.wait_for(
            lambda: [m for m in discord.follow_ups(token) if "remember me" in m["content"]]
        )
        assert discord.responses(token)[0] == {"type": 5, "data": {"flags": EPHEMERAL}}
        assert answer["flags"] & EPHEMERAL

        token = await discord.use_command(ANN, "export")
        [answer] = await discord.wait_for(lambda: [m for m in discord.follow_ups(token) if m.get("files")])
        [(name, content)] = answer["files"]
        assert name.endswith(".json") and "remember me" in content.decode()
        assert answer["flags"] & EPHEMERAL


async def test_forget_asks_and_the_confirm_button_does_it(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting) as bot:
        discord = bot.discord
        await discord.post_message(ANN, f"{MENTION} remember me", mentions=[BOT])
        await bot.reply_in(discord.channel_id, recital(SCRIPT, 24))

        token = await discord.use_command(ANN, "forget")
        [asking] = await discord.wait_for(lambda: [m for m in discord.follow_ups(token) if m["components"]])
        [button] = asking["components"][0]["components"]
        assert button["label"] == "Confirm" and len(await bot.turns()) == 2

        await discord.use_component(BEN, asking, button["custom_id"])  # someone else's click does nothing
        await discord.wait_for(
            lambda: [m for m in discord.messages.values() if "for the person who asked" in m["content"]]
        )
        assert len(await bot.turns()) == 2

        click = await discord.use_component(ANN, asking, button["custom_id"])
        done = await discord.wait_for(lambda: asking["components"] == [] and asking)
        assert discord.responses(click) == [{"type": 6}], "the answer replaces the question"
        assert "deleted 2 messages" in done["content"]
        assert await bot.turns() == []


async def test_settings_change_through_the_view(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting) as bot:
        discord = bot.discord
        token = await discord.use_command(ANN, "settings")
        [view] = await discord.wait_for(lambda: [m for m in discord.follow_ups(token) if m["components"]])
        assert discord.responses(token)[0]["data"]["flags"] == EPHEMERAL and view["flags"] & EPHEMERAL
        controls = {c["custom_id"]: c for row in view["components"] for c in row["components"]}
        temperature = controls["gptbot:settings:temperature"]
        assert "0.4" in [o["value"] for o in temperature["options"]]

        click = await discord.use_component(ANN, view, "gptbot:settings:temperature", ["0.4"])
        await discord.wait_for(lambda: "Changed" in view["content"])
        assert discord.responses(click) == [{"type": 6}], "the answer updates the settings message"
        assert await bot.rows("SELECT temperature FROM user_settings") == [(0.4,)]

        opened = await discord.use_component(ANN, view, "gptbot:settings:persona")
        await discord.wait_for(lambda: discord.responses(opened))
        assert discord.responses(opened)[0]["type"] == MODAL
        await discord.submit_modal(ANN, opened, {"value": "@everyone's pirate friend"})
        await discord.wait_for(lambda: "pirate" in view["content"])
        assert await bot.rows("SELECT persona FROM user_settings") == [("@everyone's pirate friend",)]
        assert view["components"], "the controls stay for the next change"


async def test_a_5000_character_reply_arrives_as_3_messages_in_order(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting, max_reply_tokens=1300) as bot:
        discord = bot.discord
        expected = recital(SCRIPT, 1300)
        assert len(expected) == 5000
        await discord.post_message(ANN, f"{MENTION} a long one, please", mentions=[BOT])
        messages = await bot.reply_in(discord.channel_id, expected, count=3)

        assert len(messages) == 3 and all(len(m["content"]) <= LIMIT for m in messages)
        assert all(m["content"].endswith("purposes.") for m in messages), "cut between paragraphs"
        assert [int(m["id"]) for m in messages] == sorted(int(m["id"]) for m in messages), "posted in order"
        assert "message_reference" in messages[0] and "message_reference" not in messages[1]


async def test_model_output_with_everyone_pings_no_one(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting) as bot:
        discord = bot.discord
        await discord.post_message(ANN, f"{MENTION} say hello to all", mentions=[BOT])
        await bot.reply_in(discord.channel_id, recital(SCRIPT, 24))
        sent = bodies_with(discord, "@everyone")
        assert sent, "the model's @everyone reached Discord"
        assert all(body["allowed_mentions"] == {"parse": []} for body in sent if "content" in body)


async def test_messages_of_bots_get_no_answer(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting) as bot:
        discord = bot.discord
        await discord.post_message(FakeDiscord.OTHER_BOT, f"{MENTION} answer me, fellow bot", mentions=[BOT])
        await discord.post_message(BEN, "people talking among themselves")  # no mention: not for the bot
        await discord.post_message(ANN, f"{MENTION} and me?", mentions=[BOT])
        # Dispatches are handled in order, so once Ann has her answer, the others have had their chance;
        # the fake also tells the bot about its own answer, as Discord does, and that gets none either.
        await bot.reply_in(discord.channel_id, recital(SCRIPT, 24))
        assert len(discord.bot_messages(discord.channel_id)) == 1
        assert [t[1:] for t in await bot.turns()][0] == ("user", "and me?")


async def test_a_private_answer_to_a_channel_message_goes_to_dms(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting) as bot:
        discord = bot.discord
        asked = await discord.post_message(ANN, f"{MENTION} /link", mentions=[BOT])
        await discord.wait_for(lambda: asked.get("reactions_by_bot"))
        [dm] = discord.bot_messages(discord.dm_channel(ANN)["id"])
        assert "code" in dm["content"].lower()
        assert discord.bot_messages(discord.channel_id) == [], "a link code never shows in a channel"
        assert asked["reactions_by_bot"] == [SENT_PRIVATELY]


async def test_rate_limits_and_a_reconnect_lose_no_reply(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting, max_reply_tokens=300) as bot:
        discord = bot.discord
        path = f"/channels/{discord.channel_id}/messages"
        discord.rate_limit_next("POST", path)
        await discord.post_message(ANN, f"{MENTION} a longer one", mentions=[BOT])
        await discord.wait_for(lambda: len(discord.find_calls("POST", path)) == 2)  # 429, then the retry
        await discord.reconnect()
        await discord.post_message(BEN, f"{MENTION} me too", mentions=[BOT])  # sent while the bot is away
        expected = recital(SCRIPT, 300).strip()
        await discord.wait_for(
            lambda: [m["content"] for m in discord.bot_messages(discord.channel_id)] == [expected] * 2
        )
        assert len(discord.identified) == 1, "the bot resumed its session rather than starting a new one"


async def test_a_subset_of_shards_runs_in_this_process(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting, discord_shard_count=4, discord_shard_ids="2") as bot:
        assert [i["shard"] for i in bot.discord.identified] == [[2, 4]]


async def test_a_refused_chat_command_answers_privately(db_url: str, reciting: LoadedModel) -> None:
    async with running(db_url, reciting, deny_users=f"discord:{ANN['id']}") as bot:
        discord = bot.discord
        token = await discord.use_command(ANN, "chat", {"prompt": "hello"})
        [answer] = await discord.wait_for(lambda: [m for m in discord.follow_ups(token) if m["content"]])
        assert "not allowed" in answer["content"] and answer["flags"] & EPHEMERAL
        assert discord.find_calls("DELETE", f"/webhooks/{BOT['id']}/{token}/messages/@original"), (
            "the public 'thinking…' gives way to a private answer"
        )


async def test_outside_the_allowed_channels_it_starts_nothing_and_answers_privately(
    db_url: str, reciting: LoadedModel
) -> None:
    async with running(db_url, reciting, allow_channels="discord:1", discord_threads=True) as bot:
        discord = bot.discord
        asked = await discord.post_message(ANN, f"{MENTION} hello", mentions=[BOT])
        await discord.wait_for(lambda: asked.get("reactions_by_bot"))
        [refusal] = discord.bot_messages(discord.dm_channel(ANN)["id"])
        assert "not allowed to answer in this channel" in refusal["content"]
        assert discord.bot_messages(discord.channel_id) == []
        assert not [c for c in discord.channels.values() if c["type"] == 11], "and started no thread"


@pytest.mark.parametrize(
    ("token", "portal", "hint"),
    [("not-the-token", {}, "DISCORD_TOKEN"), (TOKEN, {"message_content_intent": False}, "MESSAGE CONTENT INTENT")],
)
async def test_a_wrong_token_or_a_missing_intent_says_what_to_fix(
    db_url: str, reciting: LoadedModel, token: str, portal: dict[str, bool], hint: str
) -> None:
    async with FakeDiscord(**portal) as discord, core(discord, db_url, reciting, DISCORD_TOKEN=token) as parts:
        config, manager, _ = parts
        with pytest.raises(DiscordSetupError, match=hint):
            await asyncio.wait_for(DiscordAdapter(manager, config).run(), timeout=20)


async def test_run_bot_starts_the_discord_adapter_when_the_token_is_set(tmp_path: Path) -> None:
    """As the README says: DISCORD_TOKEN set, `python run_bot.py`, and the bot answers in Discord."""
    async with FakeDiscord() as discord:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BOT_", "DISCORD_", "SLACK_"))}
        env.update(
            DISCORD_TOKEN=TOKEN,
            DISCORD_API_BASE=discord.api_base,
            DISCORD_GATEWAY_URL=discord.gateway_url,
            BOT_MODEL_PATH=str(SHIPPED_MODEL),
            BOT_MAX_REPLY_TOKENS="8",
            BOT_HTTP_PORT="0",  # no HTTP server: no port to share with other tests
        )
        bot = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "run_bot.py"), cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE
        )
        try:
            await asyncio.wait_for(discord.ready(), timeout=60)
            await discord.post_message(ANN, f"{MENTION} hello", mentions=[BOT])
            await discord.wait_for(lambda: discord.bot_messages(discord.channel_id), timeout=60)
        finally:
            bot.send_signal(signal.SIGINT)
            _, stderr = await bot.communicate()
        assert bot.returncode == 0, stderr.decode()
